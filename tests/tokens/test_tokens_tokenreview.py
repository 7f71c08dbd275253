"""TokenReviewVerifier through the real kubernetes_asyncio client against the API-server
double: allow, the API server's denies, audiences it did not grant, a review that
disagrees with the token, the success cache, and an API server that is down or slow."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s
from prometheus_client import CollectorRegistry

from identityd.errors import ConfigError, InvalidToken, Unavailable
from identityd.keys.issuer import TokenIssuer
from identityd.kubeapi import KubeConnection, new_api_client
from identityd.settings import TokenSettings
from identityd.tokens.claims import TokenReason
from identityd.tokens.tokenreview import (
    EXTRA_POD_UID,
    ReviewReason,
    TokenReviewMetrics,
    TokenReviewUnavailable,
    TokenReviewVerifier,
    unverified_claims,
)
from tests.doubles.kube_apiserver import KubeAPIServer
from tests.doubles.kube_inventory import connection_to
from tests.doubles.kube_store import JSON

AUDIENCE = "identityd"
LEEWAY = 30


class FakeClock:
    """The verifier's monotonic clock (cache deadlines), moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def api() -> AsyncIterator[KubeAPIServer]:
    async with KubeAPIServer() as server:
        server.add_pod("sports-web", "api-1", service_account="api", node="node-7")
        server.add_pod("sports-web", "api-2", service_account="api", node="node-8")
        yield server


def settings_for(api: KubeAPIServer, **overrides: Any) -> TokenSettings:
    values: dict[str, Any] = {"issuer": api.tokens.issuer, "audiences": (AUDIENCE,),
                              "leeway_seconds": LEEWAY}
    return TokenSettings(**values | overrides)


async def connect(
    api: KubeAPIServer, *, connection: KubeConnection | None = None, **options: Any,
) -> TokenReviewVerifier:
    return await TokenReviewVerifier.connect(
        settings_for(api, **options.pop("settings", {})), connection or connection_to(api),
        **options)


async def request_token(
    api: KubeAPIServer, name: str = "api-1", *, audiences: list[str] | None = None,
    seconds: int = 3600,
) -> str:
    """A bound token from the double's TokenRequest API, through the real client."""
    uid = api.pod("sports-web", name)["metadata"]["uid"]
    body = k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(
        audiences=audiences or [AUDIENCE], expiration_seconds=seconds,
        bound_object_ref=k8s.V1BoundObjectReference(
            kind="Pod", api_version="v1", name=name, uid=uid)))
    async with await new_api_client(connection_to(api)) as client:
        answer = await k8s.CoreV1Api(client).create_namespaced_service_account_token(
            "api", "sports-web", body)
    token: str = answer.status.token
    return token


def reviews(api: KubeAPIServer) -> int:
    return sum(1 for r in api.requests if r.path.endswith("/tokenreviews"))


async def denied(verifier: TokenReviewVerifier, token: str, now: float | None = None,
                 ) -> InvalidToken:
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token, now=time.time() if now is None else now)
    assert token not in str(caught.value) and token not in caught.value.detail
    return caught.value


# --- allow -------------------------------------------------------------------------


async def test_a_bound_token_is_verified_by_the_api_server(api: KubeAPIServer) -> None:
    pod = api.pod("sports-web", "api-1")
    token = await request_token(api, audiences=[AUDIENCE, "vault"])
    async with await connect(api) as verifier:
        claims = await verifier.verify(token, now=time.time())
    assert claims.verified_by == "tokenreview"
    assert claims.issuer == api.tokens.issuer
    assert claims.audience == (AUDIENCE,)  # what the API server granted, not the token's aud
    assert claims.subject == "system:serviceaccount:sports-web:api"
    assert (claims.namespace, claims.service_account) == ("sports-web", "api")
    assert claims.service_account_uid == api.tokens.account_uid("sports-web", "api")
    assert (claims.pod_name, claims.pod_uid) == ("api-1", pod["metadata"]["uid"])
    assert (claims.node_name, claims.node_uid) == ("node-7", api.tokens.node_uid("node-7"))
    assert claims.expires_at - claims.issued_at == 3600
    assert reviews(api) == 1


async def test_the_node_comes_from_the_token_when_the_review_has_none(
    api: KubeAPIServer,
) -> None:
    """API servers before 1.30 put no node in the review; the token's claim fills it."""
    def drop_node(status: JSON) -> None:
        for key in ("node-name", "node-uid"):
            status["user"]["extra"].pop(f"authentication.kubernetes.io/{key}")

    api.tokens.tamper = drop_node
    async with await connect(api) as verifier:
        claims = await verifier.verify(await request_token(api), now=time.time())
    assert claims.node_name == "node-7"


# --- the API server says no ----------------------------------------------------------


async def test_a_token_signed_by_another_key_is_denied(api: KubeAPIServer) -> None:
    impostor = TokenIssuer(api.tokens.issuer, key_type="EC")  # our issuer's name, not its key
    uid = api.pod("sports-web", "api-1")["metadata"]["uid"]
    token = impostor.mint("sports-web", "api", "api-1", uid, audiences=[AUDIENCE],
                          sa_uid=api.tokens.account_uid("sports-web", "api"))
    async with await connect(api) as verifier:
        error = await denied(verifier, token)
    assert error.code == ReviewReason.DENIED
    assert "invalid bearer token" in error.detail
    assert reviews(api) == 1


async def test_a_token_of_another_issuer_is_denied_without_a_review(
    api: KubeAPIServer,
) -> None:
    other = TokenIssuer("https://other.example", key_type="EC")
    token = other.mint("sports-web", "api", "api-1", "uid", audiences=[AUDIENCE])
    async with await connect(api) as verifier:
        assert (await denied(verifier, token)).code == TokenReason.ISSUER_MISMATCH
    assert reviews(api) == 0


async def test_the_token_of_a_deleted_pod_is_denied(api: KubeAPIServer) -> None:
    token = await request_token(api)
    api.delete_pod("sports-web", "api-1")
    async with await connect(api) as verifier:
        error = await denied(verifier, token)
    assert error.code == ReviewReason.DENIED
    assert "invalidated" in error.detail


async def test_the_token_of_a_pod_recreated_under_its_name_is_denied(
    api: KubeAPIServer,
) -> None:
    token = await request_token(api)
    api.delete_pod("sports-web", "api-1")
    api.add_pod("sports-web", "api-1", service_account="api")  # same name, new uid
    async with await connect(api) as verifier:
        error = await denied(verifier, token)
    assert error.code == ReviewReason.DENIED
    assert "pod UID" in error.detail


async def test_a_token_the_api_server_finds_expired_is_denied(api: KubeAPIServer) -> None:
    token = await request_token(api, seconds=600)
    api.tokens.clock = lambda: time.time() + 3600  # the API server's clock is ahead
    async with await connect(api) as verifier:
        error = await denied(verifier, token)
    assert error.code == ReviewReason.DENIED
    assert "expired" in error.detail


async def test_an_expired_token_is_denied_without_a_review(api: KubeAPIServer) -> None:
    token = await request_token(api, seconds=600)
    async with await connect(api) as verifier:
        error = await denied(verifier, token, now=time.time() + 600 + LEEWAY + 5)
    assert error.code == TokenReason.EXPIRED
    assert reviews(api) == 0


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("not-a-jwt", TokenReason.MALFORMED),
        ("eyJhbGciOiJub25lIn0.eyJpc3MiOiJ4In0.", TokenReason.ALG_NOT_ALLOWED),  # alg none
    ],
)
async def test_garbage_is_denied_without_a_review(
    api: KubeAPIServer, token: str, code: str,
) -> None:
    async with await connect(api) as verifier:
        assert (await denied(verifier, token)).code == code
    assert reviews(api) == 0


# --- audiences ------------------------------------------------------------------------


async def test_an_audience_the_api_server_did_not_grant_is_denied(api: KubeAPIServer) -> None:
    """An API server that checks tokens against its own audiences (ignoring
    spec.audiences) authenticates this token for the issuer audience only."""
    token = await request_token(api, audiences=[AUDIENCE, api.tokens.issuer])
    api.tokens.ignore_audiences = True
    async with await connect(api) as verifier:
        error = await denied(verifier, token)
    assert error.code == TokenReason.AUDIENCE_MISMATCH
    assert reviews(api) == 1


async def test_granted_audiences_are_rechecked_against_the_configuration(
    api: KubeAPIServer,
) -> None:
    token = await request_token(api)

    def grant(*audiences: str) -> None:
        def tamper(status: JSON) -> None:
            status["audiences"] = list(audiences)
        api.tokens.tamper = tamper

    async with await connect(api, cache_seconds=0) as verifier:
        grant("vault")
        assert (await denied(verifier, token)).code == TokenReason.AUDIENCE_MISMATCH
        grant()
        assert (await denied(verifier, token)).code == TokenReason.AUDIENCE_MISMATCH
        grant("vault", AUDIENCE, "other")  # more than asked for: only ours are kept
        assert (await verifier.verify(token, now=time.time())).audience == (AUDIENCE,)


async def test_a_token_for_another_audience_is_denied_without_a_review(
    api: KubeAPIServer,
) -> None:
    token = await request_token(api, audiences=["vault"])
    async with await connect(api) as verifier:
        assert (await denied(verifier, token)).code == TokenReason.AUDIENCE_MISMATCH
    assert reviews(api) == 0


# --- a review that disagrees with the token ------------------------------------------


@pytest.mark.parametrize(
    ("tamper", "code"),
    [
        (lambda s: s["user"].update(username="system:serviceaccount:payments:billing"),
         TokenReason.SUBJECT_MISMATCH),
        (lambda s: s["user"].update(username="alice@example.com"), TokenReason.SUBJECT_MISMATCH),
        (lambda s: s["user"].update(uid="another-sa-uid"), TokenReason.SUBJECT_MISMATCH),
        (lambda s: s["user"]["extra"].update({EXTRA_POD_UID: ["another-pod-uid"]}),
         TokenReason.SUBJECT_MISMATCH),
        (lambda s: s["user"]["extra"].update(
            {"authentication.kubernetes.io/node-name": ["node-9"]}), TokenReason.SUBJECT_MISMATCH),
        (lambda s: s["user"]["extra"].pop(EXTRA_POD_UID), TokenReason.CLAIMS_MISSING),
    ],
    ids=["other-sa", "not-a-sa", "sa-uid", "pod-uid", "node", "no-pod"],
)
async def test_a_review_that_disagrees_with_the_token_is_denied(
    api: KubeAPIServer, tamper: Any, code: str,
) -> None:
    """Unverified claims never widen: they must agree with what the API server says."""
    api.tokens.tamper = tamper
    async with await connect(api) as verifier:
        assert (await denied(verifier, await request_token(api))).code == code


async def test_the_token_never_reaches_a_detail(api: KubeAPIServer) -> None:
    token = await request_token(api)

    def echo(status: JSON) -> None:
        status.clear()
        status.update(user={}, error=f"invalid bearer token {token}\nsecond line")

    api.tokens.tamper = echo
    async with await connect(api) as verifier:
        error = await denied(verifier, token)
    assert error.detail == "invalid bearer token <token> second line"


# --- the success cache ----------------------------------------------------------------


async def test_a_cache_hit_avoids_a_second_review(api: KubeAPIServer) -> None:
    registry = CollectorRegistry()
    clock = FakeClock()
    token = await request_token(api)
    async with await connect(api, clock=clock, cache_seconds=10,
                             metrics=TokenReviewMetrics(registry)) as verifier:
        first = await verifier.verify(token, now=time.time())
        clock.now += 9
        assert await verifier.verify(token, now=time.time()) == first
        assert reviews(api) == 1
        clock.now += 1  # the entry's 10 s are up
        await verifier.verify(token, now=time.time())
        assert reviews(api) == 2
    sample = registry.get_sample_value
    assert sample("identityd_token_review_cache_total", {"result": "hit"}) == 1
    assert sample("identityd_token_review_cache_total", {"result": "miss"}) == 2
    assert sample("identityd_token_review_seconds_count", {"result": "authenticated"}) == 2


async def test_a_cached_success_never_outlives_the_token(api: KubeAPIServer) -> None:
    clock = FakeClock()
    token = await request_token(api, seconds=600)
    almost = unverified_claims(token)["exp"] - 4
    async with await connect(api, clock=clock, cache_seconds=10) as verifier:
        await verifier.verify(token, now=almost)  # 4 s of life left: cached 4 s, not 10
        clock.now += 3
        await verifier.verify(token, now=almost + 3)
        assert reviews(api) == 1
        clock.now += 2
        await verifier.verify(token, now=almost + 5)  # past exp, within the leeway
        assert reviews(api) == 2


async def test_a_cached_success_still_obeys_the_maximum_age(api: KubeAPIServer) -> None:
    token = await request_token(api)
    issued = unverified_claims(token)["iat"]
    async with await connect(api, settings={"max_age_seconds": 60}) as verifier:
        await verifier.verify(token, now=issued + 60)
        error = await denied(verifier, token, now=issued + 60 + LEEWAY + 1)
    assert error.code == TokenReason.TOO_OLD
    assert reviews(api) == 1


async def test_the_cache_is_keyed_by_token_and_bounded(api: KubeAPIServer) -> None:
    tokens = [await request_token(api, name) for name in ("api-1", "api-2")]
    tokens.append(await request_token(api, "api-1"))  # same pod, another token
    async with await connect(api, cache_size=2) as verifier:
        for token in tokens:
            await verifier.verify(token, now=time.time())
        assert reviews(api) == 3
        assert verifier.cached == 2
        await verifier.verify(tokens[2], now=time.time())  # still cached
        assert reviews(api) == 3
        await verifier.verify(tokens[0], now=time.time())  # evicted first
        assert reviews(api) == 4


async def test_denials_are_not_cached(api: KubeAPIServer) -> None:
    token = await request_token(api)
    api.tokens.ignore_audiences = True
    async with await connect(api) as verifier:
        await denied(verifier, token)
        await denied(verifier, token)
        assert reviews(api) == 2
        api.tokens.ignore_audiences = False
        assert (await verifier.verify(token, now=time.time())).pod_name == "api-1"


async def test_reviews_reuse_one_connection(api: KubeAPIServer) -> None:
    token = await request_token(api)
    async with await connect(api, cache_seconds=0) as verifier:
        for _ in range(5):
            await verifier.verify(token, now=time.time())
    assert len(api.review_peers) == 5
    assert len(set(api.review_peers)) == 1


# --- the API server cannot answer -------------------------------------------------------


async def unavailable(verifier: TokenReviewVerifier, token: str) -> TokenReviewUnavailable:
    with pytest.raises(TokenReviewUnavailable) as caught:
        await verifier.verify(token, now=time.time())
    error = caught.value
    assert isinstance(error, Unavailable) and error.status == 503
    assert error.code == "TOKEN_REVIEW_UNAVAILABLE"
    assert token not in str(error)
    return error


@pytest.mark.parametrize("status", [500, 503, 429, 403])
async def test_an_api_server_error_is_unavailable_then_recovers(
    api: KubeAPIServer, status: int,
) -> None:
    registry = CollectorRegistry()
    token = await request_token(api)
    api.fail_next(status=status, path="tokenreviews")
    async with await connect(api, metrics=TokenReviewMetrics(registry)) as verifier:
        assert str(status) in (await unavailable(verifier, token)).detail
        assert (await verifier.verify(token, now=time.time())).pod_name == "api-1"
    sample = registry.get_sample_value
    assert sample("identityd_token_review_seconds_count", {"result": "error"}) == 1
    assert sample("identityd_token_review_seconds_count", {"result": "authenticated"}) == 1


async def test_a_slow_review_times_out(api: KubeAPIServer) -> None:
    token = await request_token(api)
    api.set_delay(5.0, path="tokenreviews")
    async with await connect(api, timeout=0.2) as verifier:
        started = time.monotonic()
        assert "0.2s" in (await unavailable(verifier, token)).detail
        assert time.monotonic() - started < 2.0


async def test_an_api_server_that_is_down_is_unavailable(api: KubeAPIServer) -> None:
    token = await request_token(api)
    async with await connect(api) as verifier:
        await api.pause()
        await unavailable(verifier, token)
        await api.resume()
        assert (await verifier.verify(token, now=time.time())).pod_name == "api-1"


async def test_our_own_bad_credentials_are_unavailable_not_a_deny(api: KubeAPIServer) -> None:
    token = await request_token(api)
    wrong = KubeConnection(host=api.url, token="wrong")
    async with await connect(api, connection=wrong) as verifier:
        assert "401" in (await unavailable(verifier, token)).detail


async def test_an_unusable_configuration_fails_at_start(
    api: KubeAPIServer, tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as caught:
        await TokenReviewVerifier.connect(settings_for(api), KubeConnection(
            kubeconfig=str(tmp_path / "missing")))
    assert caught.value.code == "KUBE_CONFIG_INVALID"
    with pytest.raises(ValueError, match="timeout"):  # and its client is closed again
        await connect(api, timeout=0)
    with pytest.raises(ValueError, match="audiences"):
        await connect(api, settings={"audiences": ()})
