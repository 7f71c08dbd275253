"""JWKS mode with the keys of the API server: the double's TokenRequest, OIDC discovery
and JWKS endpoints through the real kubernetes_asyncio client, key rotation picked up
through the refetch on an unknown kid, the client's (rotating) credentials, discovery
whose jwks_uri is on the API server's external address (as on a real one), and a
``--jwks`` URL of the in-cluster API server going through the cluster key source."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from tokens_support import JWKSServer

from identityd.app import build_verifier
from identityd.errors import ConfigError, InvalidToken, KeysUnavailable
from identityd.kubeapi import KubeConnection, new_api_client
from identityd.settings import ClusterSettings, Settings, TokenSettings
from identityd.tokens.claims import TokenReason
from identityd.tokens.jwks import JWKSVerifier
from identityd.tokens.key_sources import URLKeySource
from identityd.tokens.tokenreview import ClusterKeySource, cluster_key_source, jwks_key_source
from tests.doubles.kube_apiserver import KubeAPIServer
from tests.doubles.kube_inventory import connection_to, write_kubeconfig

AUDIENCE = "identityd"


@pytest.fixture
async def api() -> AsyncIterator[KubeAPIServer]:
    async with KubeAPIServer() as server:
        server.add_pod("sports-web", "api-1", service_account="api", node="node-7")
        yield server


def settings_for(api: KubeAPIServer, **overrides: Any) -> TokenSettings:
    values: dict[str, Any] = {"issuer": api.tokens.issuer, "audiences": (AUDIENCE,),
                              "refetch_interval_seconds": 0.0}
    return TokenSettings(**values | overrides)


async def request_token(
    api: KubeAPIServer, name: str = "api-1", *, namespace: str = "sports-web",
    account: str = "api", uid: str | None = None, audiences: list[str] | None = None,
    seconds: int = 3600,
) -> str:
    """A bound token from the double's TokenRequest API, through the real client."""
    pod_uid = uid if uid is not None else api.pod(namespace, name)["metadata"]["uid"]
    body = k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(
        audiences=audiences or [AUDIENCE], expiration_seconds=seconds,
        bound_object_ref=k8s.V1BoundObjectReference(
            kind="Pod", api_version="v1", name=name, uid=pod_uid)))
    async with await new_api_client(connection_to(api)) as client:
        answer = await k8s.CoreV1Api(client).create_namespaced_service_account_token(
            account, namespace, body)
    token: str = answer.status.token
    return token


def jwks_gets(api: KubeAPIServer) -> int:
    return sum(1 for r in api.requests if r.path == "/openid/v1/jwks")


def decoded(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _ = token.split(".")
    def part(text: str) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        return value
    return part(header), part(payload)


# --- the double's TokenRequest, as the real API server answers it --------------------


async def test_token_request_signs_a_bound_token_in_the_api_server_format(
    api: KubeAPIServer,
) -> None:
    pod = api.pod("sports-web", "api-1")
    before = int(time.time())
    token = await request_token(api, audiences=[AUDIENCE, "vault"], seconds=900)
    header, claims = decoded(token)
    assert header == {"alg": "RS256", "kid": api.tokens.signer.kid}
    assert claims["iss"] == api.tokens.issuer
    assert claims["aud"] == [AUDIENCE, "vault"]
    assert claims["sub"] == "system:serviceaccount:sports-web:api"
    assert before <= claims["iat"] == claims["nbf"] <= int(time.time())
    assert claims["exp"] - claims["iat"] == 900
    assert claims["jti"]
    assert claims["kubernetes.io"] == {
        "namespace": "sports-web",
        "pod": {"name": "api-1", "uid": pod["metadata"]["uid"]},
        "serviceaccount": {"name": "api", "uid": api.tokens.account_uid("sports-web", "api")},
        "node": {"name": "node-7", "uid": api.tokens.node_uid("node-7")},
    }


async def test_token_request_answer_carries_the_expiration(api: KubeAPIServer) -> None:
    body = {"spec": {"audiences": [AUDIENCE], "expirationSeconds": 600, "boundObjectRef": {
        "kind": "Pod", "apiVersion": "v1", "name": "api-1"}}}
    url = f"{api.url}/api/v1/namespaces/sports-web/serviceaccounts/api/token"
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {api.token}"}) as http,
        http.post(url, json=body) as response,
    ):
        assert response.status == 201
        answer = await response.json()
    assert answer["kind"] == "TokenRequest"
    assert answer["apiVersion"] == "authentication.k8s.io/v1"
    exp = decoded(answer["status"]["token"])[1]["exp"]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))
    assert answer["status"]["expirationTimestamp"] == stamp


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"name": "no-such-pod"}, 404),  # the bound pod must exist
        ({"uid": "00000000-0000-0000-0000-000000000000"}, 409),  # ...with that uid
        ({"account": "billing"}, 400),  # ...and run as that service account
        ({"seconds": 599}, 422),  # at least 10 minutes
    ],
)
async def test_token_request_is_refused_as_the_api_server_refuses_it(
    api: KubeAPIServer, change: dict[str, Any], status: int,
) -> None:
    args: dict[str, Any] = {"name": "api-1"}
    if "name" in change:
        args |= {"name": change["name"], "uid": "x"}
    if "uid" in change:
        args["uid"] = change["uid"]
    if "account" in change:
        args["account"] = change["account"]
    if "seconds" in change:
        args["seconds"] = change["seconds"]
    with pytest.raises(ApiException) as caught:
        await request_token(api, **args)
    assert caught.value.status == status
    assert json.loads(caught.value.body or b"")["kind"] == "Status"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/v1/namespaces/sports-web/serviceaccounts/api/token"),
        ("POST", "/apis/authentication.k8s.io/v1/tokenreviews"),
        ("GET", "/.well-known/openid-configuration"),
        ("GET", "/openid/v1/jwks"),
    ],
)
async def test_token_endpoints_need_the_bearer_token(
    api: KubeAPIServer, method: str, path: str,
) -> None:
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with http.request(method, api.url + path, json={}, headers=headers) as resp:
                assert resp.status == 401
        async with http.request(method, api.url + path, json={},
                                headers={"Authorization": f"Bearer {api.token}"}) as resp:
            assert resp.status != 401


async def test_discovery_names_the_issuer_and_an_external_jwks_uri(api: KubeAPIServer) -> None:
    """As a real API server: jwks_uri is on its external address (the advertise address
    or --service-account-jwks-uri), never on the URL a pod talks to; the same keys are
    served on the in-cluster host."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {api.token}"}) as http:
        async with http.get(f"{api.url}/.well-known/openid-configuration") as response:
            document = await response.json()
        async with http.get(f"{api.url}/openid/v1/jwks") as response:
            assert response.content_type == "application/jwk-set+json"
            keys = await response.json(content_type=None)
    assert document["issuer"] == api.tokens.issuer
    assert document["jwks_uri"] == "https://192.0.2.10:6443/openid/v1/jwks"
    assert not document["jwks_uri"].startswith(api.url)
    assert [key["kid"] for key in keys["keys"]] == [api.tokens.signer.kid]


# --- JWKSVerifier with the API server's keys -----------------------------------------


async def test_jwks_from_the_api_server_verifies_a_token_request_token(
    api: KubeAPIServer,
) -> None:
    token = await request_token(api)
    pod_uid = api.pod("sports-web", "api-1")["metadata"]["uid"]
    async with JWKSVerifier(settings_for(api), source=await cluster_key_source(
            connection_to(api))) as verifier:
        claims = await verifier.verify(token, now=time.time())
    assert (claims.namespace, claims.service_account, claims.pod_name, claims.pod_uid,
            claims.node_name) == ("sports-web", "api", "api-1", pod_uid, "node-7")
    assert claims.verified_by == "jwks"
    fetches = [r for r in api.requests if r.path == "/openid/v1/jwks"]
    assert len(fetches) == 1
    assert fetches[0].headers["Authorization"] == f"Bearer {api.token}"


async def test_discovery_mode_checks_the_issuer(api: KubeAPIServer) -> None:
    token = await request_token(api)
    source = await cluster_key_source(connection_to(api), discovery=True,
                                      issuer=api.tokens.issuer, fetch_timeout=1.0)
    async with JWKSVerifier(settings_for(api), source=source) as verifier:
        assert (await verifier.verify(token, now=time.time())).pod_name == "api-1"
    gets = [r for r in api.requests if r.method == "GET"]
    assert [r.path for r in gets] == ["/.well-known/openid-configuration", "/openid/v1/jwks"]
    # The keys come from the host we talk to, with the token: not from the advertised
    # jwks_uri (192.0.2.10:6443, unreachable from here, as it often is from a pod).
    assert all(r.headers["Authorization"] == f"Bearer {api.token}" for r in gets)

    source = await cluster_key_source(connection_to(api), discovery=True,
                                      issuer="https://elsewhere.example")
    async with JWKSVerifier(settings_for(api), source=source) as verifier:
        with pytest.raises(KeysUnavailable, match="issuer"):
            await verifier.verify(token, now=time.time())


async def test_discovery_never_sends_the_token_to_the_advertised_jwks_uri() -> None:
    """jwks_uri on another origin that would serve the keys to anyone holding the token:
    it gets no request at all, so the service-account token cannot leak there."""
    async with JWKSServer() as elsewhere:
        uri = elsewhere.url("/openid/v1/jwks")
        async with KubeAPIServer(service_account_jwks_uri=uri) as api:
            api.add_pod("sports-web", "api-1", service_account="api")
            elsewhere.routes = {"/openid/v1/jwks": api.tokens.jwks()}
            token = await request_token(api)
            source = await cluster_key_source(connection_to(api), discovery=True,
                                              issuer=api.tokens.issuer)
            async with JWKSVerifier(settings_for(api), source=source) as verifier:
                assert (await verifier.verify(token, now=time.time())).pod_name == "api-1"
            paths = [r.path for r in api.requests if r.method == "GET"]
    assert paths == ["/.well-known/openid-configuration", "/openid/v1/jwks"]
    assert elsewhere.hits == []


async def test_discovery_mode_fails_closed_on_a_broken_document(api: KubeAPIServer) -> None:
    api.fail_next(1, 500, path="openid-configuration")
    source = await cluster_key_source(connection_to(api), discovery=True,
                                      issuer=api.tokens.issuer)
    try:
        with pytest.raises(KeysUnavailable, match="HTTP 500"):
            await source.fetch()
    finally:
        await source.aclose()
    assert jwks_gets(api) == 0  # no keys without the issuer checked


# --- which source mode jwks uses (jwks_key_source, build_verifier) --------------------


async def test_a_jwks_url_of_the_in_cluster_api_server_gets_the_cluster_ca_and_token(
    api: KubeAPIServer, tmp_path: Path,
) -> None:
    """The old Deployment's --jwks=https://kubernetes.default.svc/openid/v1/jwks: fetched
    bare it never loads (no such host here; in a cluster the CA and the 401/403). Now it
    goes through the cluster connection (here a kubeconfig naming the double)."""
    token = await request_token(api)
    settings = Settings(
        tokens=settings_for(api, jwks="https://kubernetes.default.svc/openid/v1/jwks",
                            fetch_timeout_seconds=1.0),
        cluster=ClusterSettings(kubeconfig=write_kubeconfig(tmp_path / "config", api)),
    )
    api.requests.clear()
    verifier = await build_verifier(settings, None)
    try:
        assert (await verifier.verify(token, now=time.time())).pod_name == "api-1"
    finally:
        await verifier.aclose()
    (fetch,) = [r for r in api.requests if r.path == "/openid/v1/jwks"]
    assert fetch.headers["Authorization"] == f"Bearer {api.token}"


@pytest.mark.parametrize(
    ("jwks", "paths"),
    [
        (None, ["/openid/v1/jwks"]),
        ("https://kubernetes.default.svc/openid/v1/jwks", ["/openid/v1/jwks"]),
        ("https://kubernetes.default.svc.cluster.local:443/.well-known/openid-configuration",
         ["/.well-known/openid-configuration", "/openid/v1/jwks"]),
        ("https://10.96.0.1/openid/v1/jwks/", ["/openid/v1/jwks"]),
    ],
)
async def test_jwks_key_source_uses_the_cluster_for_the_api_server(
    api: KubeAPIServer, jwks: str | None, paths: list[str],
) -> None:
    token = await request_token(api)
    settings = settings_for(api, jwks=jwks)
    source = await jwks_key_source(settings, connection_to(api), service_host="10.96.0.1")
    assert isinstance(source, ClusterKeySource)
    api.requests.clear()
    async with JWKSVerifier(settings, source=source) as verifier:
        await verifier.verify(token, now=time.time())
    assert [r.path for r in api.requests] == paths
    assert {r.headers["Authorization"] for r in api.requests} == {f"Bearer {api.token}"}


async def test_jwks_key_source_discovery_follows_the_setting(api: KubeAPIServer) -> None:
    settings = settings_for(api, jwks_discovery=True, issuer="https://elsewhere.example")
    source = await jwks_key_source(settings, connection_to(api))
    try:
        with pytest.raises(KeysUnavailable, match="issuer"):
            await source.fetch()
    finally:
        await source.aclose()


async def test_jwks_key_source_leaves_other_urls_alone(api: KubeAPIServer) -> None:
    settings = settings_for(api, jwks="https://oidc.example.com/openid/v1/jwks")
    source = await jwks_key_source(settings, connection_to(api), service_host="10.96.0.1")
    assert isinstance(source, URLKeySource)
    await source.aclose()
    assert api.requests == []  # no client was built for the cluster


async def test_jwks_key_source_refuses_another_path_on_the_api_server(
    api: KubeAPIServer,
) -> None:
    settings = settings_for(api, jwks="https://kubernetes.default.svc/api/v1/secrets")
    with pytest.raises(ConfigError) as caught:
        await jwks_key_source(settings, connection_to(api))
    assert caught.value.code == "TOKENS_JWKS_API_SERVER"


async def test_key_rotation_is_picked_up_through_the_refetch(api: KubeAPIServer) -> None:
    old_token = await request_token(api)
    source = await cluster_key_source(connection_to(api))
    async with JWKSVerifier(settings_for(api), source=source) as verifier:
        await verifier.verify(old_token, now=time.time())
        assert jwks_gets(api) == 1

        new_kid = api.tokens.rotate(keep_old=False)
        new_token = await request_token(api)
        assert decoded(new_token)[0]["kid"] == new_kid
        claims = await verifier.verify(new_token, now=time.time())  # unknown kid: refetch
        assert claims.pod_name == "api-1"
        assert jwks_gets(api) == 2
        await verifier.verify(new_token, now=time.time())  # known now: no fetch
        assert jwks_gets(api) == 2

        with pytest.raises(InvalidToken) as caught:  # its key is no longer published
            await verifier.verify(old_token, now=time.time())
        assert caught.value.code == TokenReason.UNKNOWN_KID


async def test_refetch_on_unknown_kid_is_limited_per_interval(api: KubeAPIServer) -> None:
    source = await cluster_key_source(connection_to(api))
    settings = settings_for(api, refetch_interval_seconds=3600.0)
    async with JWKSVerifier(settings, source=source) as verifier:
        await verifier.verify(await request_token(api), now=time.time())
        api.tokens.rotate()
        rotated = await request_token(api)
        for _ in range(3):
            with pytest.raises(InvalidToken) as caught:
                await verifier.verify(rotated, now=time.time())
            assert caught.value.code == TokenReason.UNKNOWN_KID
        assert jwks_gets(api) == 1  # the first fetch was under an hour ago


async def test_the_bearer_token_is_asked_for_before_every_fetch(
    api: KubeAPIServer, tmp_path: Path,
) -> None:
    """In cluster the client's refresh hook re-reads the rotated projected token; every
    fetch asks the client for its current credentials."""
    token_file = tmp_path / "token"
    token_file.write_text(api.token)
    client = await new_api_client(KubeConnection(host=api.url, token="unused"))

    def reread(configuration: Any) -> None:
        configuration.api_key["BearerToken"] = token_file.read_text()

    client.configuration.refresh_api_key_hook = reread
    source = ClusterKeySource(client)
    try:
        assert "keys" in await source.fetch()  # type: ignore[operator]
        api.token = "rotated-token"  # the API server now expects the new one
        with pytest.raises(KeysUnavailable, match="401"):
            await source.fetch()
        token_file.write_text("rotated-token")  # kubelet wrote the new token
        assert "keys" in await source.fetch()  # type: ignore[operator]
    finally:
        await source.aclose()
    assert [r.headers.get("Authorization") for r in api.requests] == [
        "Bearer double-token", "Bearer double-token", "Bearer rotated-token"]


async def test_wrong_credentials_leave_the_keys_unavailable(api: KubeAPIServer) -> None:
    token = await request_token(api)
    source = await cluster_key_source(KubeConnection(host=api.url, token="wrong"))
    async with JWKSVerifier(settings_for(api), source=source) as verifier:
        with pytest.raises(KeysUnavailable) as caught:
            await verifier.verify(token, now=time.time())
    assert caught.value.status == 503
    assert "401" in caught.value.detail


async def test_a_plain_http_api_server_off_loopback_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="https"):
        await cluster_key_source(KubeConnection(host="http://10.0.0.1:6443", token="t"))


async def test_a_token_of_another_issuer_is_refused(api: KubeAPIServer) -> None:
    other = KubeAPIServer(issuer="https://other.example")  # never started: only its signer
    foreign = other.tokens.signer.mint("sports-web", "api", "api-1", "uid", audiences=[AUDIENCE])
    async with JWKSVerifier(settings_for(api), source=await cluster_key_source(
            connection_to(api))) as verifier:
        with pytest.raises(InvalidToken) as caught:
            await verifier.verify(foreign, now=time.time())
    assert caught.value.code == TokenReason.UNKNOWN_KID
    # Same kid namespace, other key: forged with the other signer under our kid.
    forged = jwt.encode(decoded(foreign)[1], other.tokens.signer.private_key, algorithm="RS256",
                        headers={"kid": api.tokens.signer.kid})
    async with JWKSVerifier(settings_for(api), source=await cluster_key_source(
            connection_to(api))) as verifier:
        with pytest.raises(InvalidToken) as caught:
            await verifier.verify(forged, now=time.time())
    assert caught.value.code == TokenReason.SIGNATURE_INVALID
