"""Where keys come from and when they are fetched again: files, URLs, OIDC discovery,
the refetch limits, rotation, and a key endpoint that is down. Real HTTP on loopback."""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tokens_support import (
    ISSUER,
    NOW,
    FakeClock,
    JWKSServer,
    MemorySource,
    merged_jwks,
    mint,
    shared_issuer,
    token_settings,
)

from identityd.errors import ConfigError, InvalidToken, KeysUnavailable
from identityd.keys.issuer import TokenIssuer
from identityd.tokens import (
    DiscoveryKeySource,
    FileKeySource,
    JWKSVerifier,
    URLKeySource,
    key_source_from_settings,
)
from identityd.tokens.claims import TokenReason
from identityd.tokens.jwk import parse_jwks
from identityd.tokens.key_sources import DISCOVERY_PATH, is_api_server_url

INTERVAL = 30.0
MAX_AGE = 600.0


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def verifier_for(url: str, clock: FakeClock, **settings: Any) -> JWKSVerifier:
    values: dict[str, Any] = {
        "jwks": url,
        "refetch_interval_seconds": INTERVAL,
        "max_key_age_seconds": MAX_AGE,
    }
    values.update(settings)
    return JWKSVerifier(token_settings(**values), clock=clock)


async def unknown_kid(verifier: JWKSVerifier, kid: str = "no-such-kid") -> None:
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(mint(shared_issuer("RSA"), extra_headers={"kid": kid}), now=NOW)
    assert caught.value.code == TokenReason.UNKNOWN_KID


# --- refetching ----------------------------------------------------------------------


async def test_unknown_kid_refetches_at_most_once_per_interval() -> None:
    issuer = shared_issuer("RSA")
    clock = FakeClock()
    async with (
        JWKSServer({"/jwks": issuer.jwks()}) as server,
        verifier_for(server.url("/jwks"), clock) as verifier,
    ):
        await verifier.verify(mint(issuer), now=NOW)
        assert server.count("/jwks") == 1
        clock.advance(INTERVAL - 1)
        for n in range(5):
            await unknown_kid(verifier, f"kid-{n}")
        assert server.count("/jwks") == 1  # still inside the interval of the first fetch
        clock.advance(1)
        for n in range(5):
            await unknown_kid(verifier, f"kid-{n}")
        assert server.count("/jwks") == 2  # one refetch for the whole burst
        await verifier.verify(mint(issuer), now=NOW)  # known kids never refetch
        assert server.count("/jwks") == 2


async def test_concurrent_callers_share_one_fetch() -> None:
    issuer = shared_issuer("EC")
    clock = FakeClock()
    async with (
        JWKSServer({"/jwks": issuer.jwks()}) as server,
        verifier_for(server.url("/jwks"), clock) as verifier,
    ):
        server.delay = 0.05
        results = await asyncio.gather(*(verifier.verify(mint(issuer), now=NOW) for _ in range(20)))
        assert {claims.pod_uid for claims in results} == {"pod-uid-1"}
        assert server.count("/jwks") == 1
        clock.advance(INTERVAL)
        tokens = [mint(issuer, extra_headers={"kid": f"k{n}"}) for n in range(20)]
        outcomes = await asyncio.gather(
            *(verifier.verify(t, now=NOW) for t in tokens), return_exceptions=True
        )
        assert {getattr(o, "code", o) for o in outcomes} == {TokenReason.UNKNOWN_KID}
        assert server.count("/jwks") == 2


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch() -> None:
    issuer = shared_issuer("EC")
    async with (
        JWKSServer({"/jwks": issuer.jwks()}) as server,
        verifier_for(server.url("/jwks"), FakeClock()) as verifier,
    ):
        server.delay = 0.1
        first = asyncio.create_task(verifier.verify(mint(issuer), now=NOW))
        second = asyncio.create_task(verifier.verify(mint(issuer), now=NOW))
        await asyncio.sleep(0.02)
        first.cancel()
        assert (await second).pod_uid == "pod-uid-1"
        with pytest.raises(asyncio.CancelledError):
            await first
        assert server.count("/jwks") == 1


async def test_rotation_is_picked_up_by_refetch() -> None:
    issuer = TokenIssuer(ISSUER, key_type="RSA")
    clock = FakeClock()
    async with (
        JWKSServer({"/jwks": issuer.jwks()}) as server,
        verifier_for(server.url("/jwks"), clock) as verifier,
    ):
        old_token = mint(issuer)
        await verifier.verify(old_token, now=NOW)
        issuer.rotate()
        server.routes["/jwks"] = issuer.jwks()
        new_token = mint(issuer)
        # Right after a fetch the new kid is unknown: the interval protects the endpoint.
        with pytest.raises(InvalidToken) as caught:
            await verifier.verify(new_token, now=NOW)
        assert caught.value.code == TokenReason.UNKNOWN_KID
        clock.advance(INTERVAL)
        assert (await verifier.verify(new_token, now=NOW)).pod_uid == "pod-uid-1"
        assert (await verifier.verify(old_token, now=NOW)).pod_uid == "pod-uid-1"
        issuer.drop_old()
        server.routes["/jwks"] = issuer.jwks()
        clock.advance(MAX_AGE)
        await verifier.verify(new_token, now=NOW)  # stale: refreshes in the background
        for _ in range(100):
            if server.count("/jwks") == 3:
                break
            await asyncio.sleep(0.01)
        assert server.count("/jwks") == 3
        with pytest.raises(InvalidToken) as caught:
            await verifier.verify(old_token, now=NOW)
        assert caught.value.code == TokenReason.UNKNOWN_KID


async def test_stale_keys_answer_while_the_refresh_runs() -> None:
    issuer = shared_issuer("RSA")
    clock = FakeClock()
    async with (
        JWKSServer({"/jwks": issuer.jwks()}) as server,
        verifier_for(server.url("/jwks"), clock) as verifier,
    ):
        await verifier.verify(mint(issuer), now=NOW)
        clock.advance(MAX_AGE)
        server.delay = 1.0
        # Returns at once from the cache, without waiting for the slow refresh.
        claims = await asyncio.wait_for(verifier.verify(mint(issuer), now=NOW), timeout=0.5)
        assert claims.pod_uid == "pod-uid-1"


async def test_file_source_is_reread_on_refetch(tmp_path: Path) -> None:
    issuer = TokenIssuer(ISSUER, key_type="EC")
    path = tmp_path / "jwks.json"
    issuer.write_jwks(path)
    clock = FakeClock()
    async with verifier_for(str(path), clock) as verifier:
        await verifier.verify(mint(issuer), now=NOW)
        issuer.rotate()
        issuer.write_jwks(path)
        clock.advance(INTERVAL)
        assert (await verifier.verify(mint(issuer), now=NOW)).pod_uid == "pod-uid-1"


# --- the key endpoint is down -----------------------------------------------------------


async def test_endpoint_down_with_cached_keys_keeps_verifying() -> None:
    issuer = shared_issuer("RSA")
    clock = FakeClock()
    server = await JWKSServer({"/jwks": issuer.jwks()}).start()
    url = server.url("/jwks")
    async with verifier_for(url, clock) as verifier:
        try:
            await verifier.verify(mint(issuer), now=NOW)
        finally:
            await server.close()
        clock.advance(MAX_AGE + INTERVAL)
        for _ in range(3):
            assert (await verifier.verify(mint(issuer), now=NOW)).pod_uid == "pod-uid-1"
            await asyncio.sleep(0.01)  # let the background refresh fail
        clock.advance(INTERVAL)
        await unknown_kid(verifier)  # a denial, not a 503: the cached set answers


async def test_endpoint_error_with_cached_keys_keeps_verifying() -> None:
    issuer = shared_issuer("EC")
    clock = FakeClock()
    async with (
        JWKSServer({"/jwks": issuer.jwks()}) as server,
        verifier_for(server.url("/jwks"), clock) as verifier,
    ):
        await verifier.verify(mint(issuer), now=NOW)
        server.status = 500
        clock.advance(INTERVAL)
        await unknown_kid(verifier)
        assert server.count("/jwks") == 2
        # A broken set (no usable key) does not replace the good one either.
        server.status = 200
        server.routes["/jwks"] = {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}
        clock.advance(INTERVAL)
        await unknown_kid(verifier)
        assert server.count("/jwks") == 3
        assert (await verifier.verify(mint(issuer), now=NOW)).pod_uid == "pod-uid-1"


@pytest.mark.parametrize(
    "failure",
    ["refused", "http 500", "http 404", "not json", "no keys", "weak keys only", "redirect"],
)
async def test_no_keys_ever_loaded_is_unavailable(failure: str) -> None:
    weak = (
        rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_numbers()
    )
    weak_jwk = {
        "kty": "RSA",
        "kid": "weak",
        "n": base64.urlsafe_b64encode(weak.n.to_bytes(128, "big")).rstrip(b"=").decode(),
        "e": "AQAB",
    }
    async with JWKSServer() as server:
        url = server.url("/jwks")
        if failure == "refused":
            url = f"http://127.0.0.1:{unused_port()}/jwks"
        elif failure == "http 500":
            server.status = 500
        elif failure == "not json":
            server.routes["/jwks"] = b"<html>"
        elif failure == "no keys":
            server.routes["/jwks"] = {"keys": []}
        elif failure == "weak keys only":
            server.routes["/jwks"] = {"keys": [weak_jwk]}
        elif failure == "redirect":
            server.routes["/elsewhere"] = shared_issuer("RSA").jwks()
            server.redirects["/jwks"] = "/elsewhere"
        async with verifier_for(url, FakeClock()) as verifier:
            with pytest.raises(KeysUnavailable) as caught:
                await verifier.verify(mint(shared_issuer("RSA")), now=NOW)
        assert caught.value.status == 503
        assert caught.value.code == "TOKEN_KEYS_UNAVAILABLE"
        assert "/elsewhere" not in server.hits


async def test_cold_retries_are_rate_limited_and_recover() -> None:
    issuer = shared_issuer("RSA")
    clock = FakeClock()
    async with (
        JWKSServer({"/jwks": issuer.jwks()}) as server,
        verifier_for(server.url("/jwks"), clock) as verifier,
    ):
        server.status = 503
        for _ in range(5):
            with pytest.raises(KeysUnavailable):
                await verifier.verify(mint(issuer), now=NOW)
        assert server.count("/jwks") == 1
        clock.advance(1.0)
        server.status = 200
        assert (await verifier.verify(mint(issuer), now=NOW)).pod_uid == "pod-uid-1"
        assert server.count("/jwks") == 2


async def test_response_size_is_bounded() -> None:
    async with JWKSServer({"/jwks": {"keys": [], "pad": "x" * 5000}}) as server:
        source = URLKeySource(server.url("/jwks"), max_bytes=4096)
        with pytest.raises(KeysUnavailable, match="larger than"):
            await source.fetch()
        await source.aclose()


async def test_file_size_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": [], "pad": "' + "x" * 5000 + '"}')
    with pytest.raises(KeysUnavailable, match="larger than"):
        await FileKeySource(path, max_bytes=4096).fetch()


async def test_headers_provider_sync_and_async() -> None:
    issuer = shared_issuer("RSA")
    async with JWKSServer({"/jwks": issuer.jwks()}) as server:
        calls = 0

        def sync_headers() -> dict[str, str]:
            nonlocal calls
            calls += 1
            return {"Authorization": f"Bearer token-{calls}"}

        async def async_headers() -> dict[str, str]:
            return {"Authorization": "Bearer async"}

        for provider in (sync_headers, sync_headers, async_headers):
            source = URLKeySource(server.url("/jwks"), headers=provider)
            assert parse_jwks(await source.fetch())
            await source.aclose()
        assert server.authorization == ["Bearer token-1", "Bearer token-2", "Bearer async"]


async def test_headers_provider_failure_is_unavailable() -> None:
    def broken() -> dict[str, str]:
        raise FileNotFoundError("/var/run/secrets/token")

    source = URLKeySource("https://127.0.0.1:1/jwks", headers=broken)
    with pytest.raises(KeysUnavailable, match="FileNotFoundError"):
        await source.fetch()
    await source.aclose()


async def test_session_factory_is_used_and_its_session_closed() -> None:
    sessions: list[aiohttp.ClientSession] = []

    def factory() -> aiohttp.ClientSession:
        sessions.append(aiohttp.ClientSession(headers={"User-Agent": "identityd-test"}))
        return sessions[-1]

    async with JWKSServer({"/jwks": shared_issuer("EC").jwks()}) as server:
        source = URLKeySource(server.url("/jwks"), session_factory=factory)
        await source.fetch()
        await source.fetch()
        assert len(sessions) == 1
        await source.aclose()
        assert sessions[0].closed


# --- OIDC discovery -----------------------------------------------------------------


async def test_discovery() -> None:
    issuer = shared_issuer("EC")
    async with JWKSServer() as server:
        server.routes = {
            DISCOVERY_PATH: {"issuer": ISSUER, "jwks_uri": server.url("/openid/v1/jwks")},
            "/openid/v1/jwks": issuer.jwks(),
        }
        settings = token_settings(jwks=server.url(DISCOVERY_PATH))
        async with JWKSVerifier(settings, headers=lambda: {"Authorization": "Bearer sa"}) as v:
            assert (await v.verify(mint(issuer), now=NOW)).pod_uid == "pod-uid-1"
        assert server.hits == [DISCOVERY_PATH, "/openid/v1/jwks"]
        assert server.authorization == ["Bearer sa", "Bearer sa"]  # same origin


async def test_discovery_base_url_and_foreign_jwks_uri_gets_no_credentials() -> None:
    issuer = shared_issuer("RSA")
    async with JWKSServer() as api, JWKSServer({"/keys": issuer.jwks()}) as other:
        api.routes = {DISCOVERY_PATH: {"issuer": ISSUER, "jwks_uri": other.url("/keys")}}
        source = DiscoveryKeySource(
            api.url("/"), issuer=ISSUER, headers=lambda: {"Authorization": "Bearer sa"}
        )
        assert parse_jwks(await source.fetch())
        await source.aclose()
        assert api.authorization == ["Bearer sa"]
        assert other.authorization == [None]


@pytest.mark.parametrize(
    ("document", "detail"),
    [
        ({"issuer": "https://other", "jwks_uri": "{jwks}"}, "issuer"),
        ({"issuer": ISSUER}, "jwks_uri"),
        ({"issuer": ISSUER, "jwks_uri": 5}, "jwks_uri"),
        ({"issuer": ISSUER, "jwks_uri": "http://example.com/jwks"}, "https"),
        ({"issuer": ISSUER, "jwks_uri": "file:///etc/passwd"}, "https"),
        (["not", "an", "object"], "object"),
    ],
)
async def test_bad_discovery_document(document: Any, detail: str) -> None:
    async with JWKSServer() as server:
        if isinstance(document, dict) and document.get("jwks_uri") == "{jwks}":
            document["jwks_uri"] = server.url("/jwks")
        server.routes = {DISCOVERY_PATH: document, "/jwks": shared_issuer("RSA").jwks()}
        source = DiscoveryKeySource(server.url(""), issuer=ISSUER)
        with pytest.raises(KeysUnavailable, match=detail):
            await source.fetch()
        await source.aclose()
        assert server.hits == [DISCOVERY_PATH]


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("jwks", "kind"),
    [
        ("/etc/identityd/jwks.json", FileKeySource),
        ("jwks.json", FileKeySource),
        ("file:///etc/identityd/jwks.json", FileKeySource),
        ("https://oidc.example.com/openid/v1/jwks", URLKeySource),
        ("http://127.0.0.1:6443/openid/v1/jwks", URLKeySource),
        ("http://[::1]:6443/openid/v1/jwks", URLKeySource),
        ("http://localhost:6443/openid/v1/jwks", URLKeySource),
        ("https://oidc.example.com/.well-known/openid-configuration", DiscoveryKeySource),
        # Looks like the API server's name, is not: a bare fetch is right for it.
        ("https://kubernetes.example.com/openid/v1/jwks", URLKeySource),
        ("https://10.96.0.2/openid/v1/jwks", URLKeySource),
    ],
)
def test_source_from_settings(jwks: str, kind: type) -> None:
    source = key_source_from_settings(token_settings(jwks=jwks), service_host="10.96.0.1")
    assert isinstance(source, kind)


API_SERVER_URLS = [
    "https://kubernetes.default.svc/openid/v1/jwks",
    "https://kubernetes.default.svc.cluster.local/openid/v1/jwks",
    "https://kubernetes.default.svc.corp.internal./openid/v1/jwks",
    "https://KUBERNETES.default.SVC:443/.well-known/openid-configuration",
    "https://kubernetes.default/openid/v1/jwks",
    "https://kubernetes/openid/v1/jwks",
    "https://10.96.0.1/openid/v1/jwks",  # $KUBERNETES_SERVICE_HOST
    "https://10.96.0.1:443/.well-known/openid-configuration",
]


@pytest.mark.parametrize("jwks", API_SERVER_URLS)
def test_a_bare_fetch_from_the_in_cluster_api_server_is_refused(jwks: str) -> None:
    """Without the cluster CA and a token the fetch could only fail (TLS, then 401/403):
    refused at start-up, naming the way that works."""
    with pytest.raises(ConfigError) as caught:
        key_source_from_settings(token_settings(jwks=jwks), service_host="10.96.0.1")
    assert caught.value.code == "TOKENS_JWKS_API_SERVER"
    assert "--jwks unset" in caught.value.detail


@pytest.mark.parametrize("jwks", API_SERVER_URLS[:2])
def test_the_in_cluster_api_server_with_a_ca_and_a_token_is_allowed(jwks: str) -> None:
    source = key_source_from_settings(
        token_settings(jwks=jwks), ssl=ssl.create_default_context(),
        headers=lambda: {"Authorization": "Bearer t"}, service_host="10.96.0.1")
    assert isinstance(source, URLKeySource)


def test_the_service_host_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = token_settings(jwks="https://[fd00::1]:443/openid/v1/jwks")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert isinstance(key_source_from_settings(settings), URLKeySource)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00:0::1")
    with pytest.raises(ConfigError, match="in-cluster API server"):
        key_source_from_settings(settings)


@pytest.mark.parametrize(
    ("url", "service_host", "expected"),
    [
        ("https://kubernetes.default.svc/openid/v1/jwks", None, True),
        ("http://kubernetes.default.svc.cluster.local:6443/x", None, True),
        ("https://10.96.0.1/openid/v1/jwks", "10.96.0.1", True),
        ("https://[fd00::1]/openid/v1/jwks", "fd00::1", True),
        ("https://[fd00::1]/openid/v1/jwks", "[fd00::1]", True),
        ("https://api.internal/openid/v1/jwks", "API.internal", True),
        ("https://10.96.0.1/openid/v1/jwks", None, False),
        ("https://10.96.0.2/openid/v1/jwks", "10.96.0.1", False),
        # Under any cluster domain: treated as the API server, so the keys come from the
        # client's own host with its token, never from whoever holds that name elsewhere.
        ("https://kubernetes.default.svc.evil.example/jwks", None, True),
        ("https://evil.example/kubernetes.default.svc", None, False),
        ("https://kubernetesxdefault.svc/jwks", None, False),
        ("file:///kubernetes.default.svc/jwks", None, False),
        ("/etc/identityd/jwks.json", "10.96.0.1", False),
    ],
)
def test_is_api_server_url(url: str, service_host: str | None, expected: bool) -> None:
    assert is_api_server_url(url, service_host=service_host) is expected


@pytest.mark.parametrize(
    "jwks",
    [
        None,
        "",
        "http://example.com/jwks",
        "http://10.0.0.1/jwks",
        "ftp://example.com/jwks",
        "https:///jwks",
    ],
)
def test_bad_source_settings(jwks: str | None) -> None:
    with pytest.raises(ConfigError):
        key_source_from_settings(token_settings(jwks=jwks))


# --- parsing a JWK Set -----------------------------------------------------------------


def b64(n: int, length: int | None = None) -> str:
    data = n.to_bytes(length or (n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rsa_jwk(bits: int = 2048, **extra: Any) -> dict[str, Any]:
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    public = numbers.public_numbers()
    return {"kty": "RSA", "n": b64(public.n), "e": b64(public.e), **extra}


def ec_jwk(curve: ec.EllipticCurve | None = None, **extra: Any) -> dict[str, Any]:
    curve = curve or ec.SECP256R1()
    size = (curve.key_size + 7) // 8
    point = ec.generate_private_key(curve).public_key().public_numbers()
    crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[curve.name]
    return {"kty": "EC", "crv": crv, "x": b64(point.x, size), "y": b64(point.y, size), **extra}


GOOD_RSA = rsa_jwk(kid="good-rsa", alg="RS256", use="sig")
GOOD_EC = ec_jwk(kid="good-ec")

SKIPPED: list[tuple[str, Any]] = [
    ("not an object", "RSA"),
    ("RSA 1024", rsa_jwk(1024, kid="weak")),
    ("encryption key", rsa_jwk(kid="enc", use="enc")),
    ("symmetric", {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}),
    (
        "Ed25519",
        {
            "kty": "OKP",
            "crv": "Ed25519",
            "kid": "ed",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
        },
    ),
    ("secp256k1", {**ec_jwk(kid="k1"), "crv": "secp256k1"}),
    ("ES512 on P-384", ec_jwk(ec.SECP384R1(), kid="mix-521", alg="ES512")),
    ("HS256 alg on RSA", rsa_jwk(kid="hs", alg="HS256")),
    ("alg is a list", rsa_jwk(kid="list", alg=["RS256"])),
    ("alg of the other family", rsa_jwk(kid="mix", alg="ES256")),
    ("ES384 on P-256", ec_jwk(kid="mix-ec", alg="ES384")),
    ("private RSA", rsa_jwk(kid="private", d="AQAB")),
    ("kid not a string", rsa_jwk(kid=7)),
    ("n missing", {"kty": "RSA", "kid": "n", "e": "AQAB"}),
    ("n not base64url", {**rsa_jwk(kid="b64"), "n": "not base64!"}),
    ("n a number", {**rsa_jwk(kid="num"), "n": 12345}),
    ("even exponent", {**rsa_jwk(kid="even"), "e": b64(65536)}),
    ("huge exponent", {**rsa_jwk(kid="hugee"), "e": b64(2**80 + 1)}),
    ("EC off the curve", {**ec_jwk(kid="off"), "y": b64(1, 32)}),
    ("EC short coordinate", {**ec_jwk(kid="short"), "x": b64(5)}),
    ("EC crv missing", {k: v for k, v in ec_jwk(kid="nocrv").items() if k != "crv"}),
    ("duplicate kid", rsa_jwk(kid="good-rsa")),
]


@pytest.mark.parametrize("entry", [pytest.param(e, id=i) for i, e in SKIPPED])
def test_bad_keys_are_skipped_not_fatal(entry: Any) -> None:
    keys = parse_jwks({"keys": [GOOD_RSA, entry, GOOD_EC]})
    assert [key.kid for key in keys] == ["good-rsa", "good-ec"]


def test_good_keys() -> None:
    keys = parse_jwks(
        {
            "keys": [
                GOOD_RSA,
                GOOD_EC,
                ec_jwk(ec.SECP384R1(), kid="p384", alg="ES384"),
                rsa_jwk(4096, kid="big"),
                rsa_jwk(kid="no-use"),
                {**rsa_jwk(kid="pad"), "e": "AQAB=="},
                rsa_jwk(kid=None),
                ec_jwk(ec.SECP521R1(), kid="p521"),
            ]
        }
    )
    assert [key.kid for key in keys] == [
        "good-rsa",
        "good-ec",
        "p384",
        "big",
        "no-use",
        "pad",
        None,
        "p521",
    ]
    assert [key.fits("RS256") for key in keys] == [True, False, False, True, True, True, True,
                                                   False]
    assert [key.fits("PS256") for key in keys] == [False, False, False, True, True, True, True,
                                                   False]
    assert [key.fits("ES384") for key in keys] == [False, False, True, False, False, False, False,
                                                   False]
    assert [key.fits("ES512") for key in keys] == [False] * 7 + [True]


def test_a_p521_coordinate_of_the_wrong_length_is_skipped() -> None:
    short = {**ec_jwk(ec.SECP521R1(), kid="p521"), "x": b64(5, 65)}
    assert [key.kid for key in parse_jwks({"keys": [GOOD_RSA, short]})] == ["good-rsa"]


@pytest.mark.parametrize("document", [None, [], "keys", {"keys": "x"}, {"keys": {}}, {}])
def test_not_a_jwk_set(document: Any) -> None:
    with pytest.raises(ValueError, match="JWK Set"):
        parse_jwks(document)


async def test_zero_usable_keys_is_unavailable() -> None:
    source = MemorySource({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})
    async with JWKSVerifier(token_settings(), source=source) as verifier:
        with pytest.raises(KeysUnavailable, match="no usable"):
            await verifier.verify(mint(shared_issuer("RSA")), now=NOW)


async def test_kidless_tokens_try_a_bounded_number_of_keys() -> None:
    issuers = [TokenIssuer(ISSUER, key_type="EC") for _ in range(6)]
    source = MemorySource(merged_jwks(*issuers))
    async with JWKSVerifier(token_settings(), source=source) as verifier:
        assert await verifier.verify(mint(issuers[3], extra_headers={"kid": None}), now=NOW)
        with pytest.raises(InvalidToken) as caught:
            await verifier.verify(mint(issuers[5], extra_headers={"kid": None}), now=NOW)
        assert caught.value.code == TokenReason.SIGNATURE_INVALID
        # With a kid, any of them.
        assert await verifier.verify(mint(issuers[5]), now=NOW)


async def test_pyjwt_never_sees_a_key_it_would_warn_about() -> None:
    # filterwarnings=error: a short key reaching pyjwt would raise InsecureKeyLengthWarning.
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.warns(jwt.warnings.InsecureKeyLengthWarning):
        token = jwt.encode({"sub": "x"}, short, algorithm="RS256", headers={"kid": "weak"})
    public = short.public_key().public_numbers()
    source = MemorySource(
        {"keys": [{"kty": "RSA", "kid": "weak", "n": b64(public.n), "e": b64(public.e)}, GOOD_RSA]}
    )
    async with JWKSVerifier(token_settings(), source=source) as verifier:
        with pytest.raises(InvalidToken) as caught:
            await verifier.verify(token, now=NOW)
    assert caught.value.code == TokenReason.UNKNOWN_KID


async def test_a_closed_url_source_does_not_reopen() -> None:
    async with JWKSServer({"/jwks": shared_issuer("EC").jwks()}) as server:
        source = URLKeySource(server.url("/jwks"))
        await source.fetch()
        await source.aclose()
        with pytest.raises(KeysUnavailable, match="closed"):
            await source.fetch()
        assert server.count("/jwks") == 1
