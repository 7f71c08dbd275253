"""Tokens checked against the cluster: the TokenReview verifier, and the API server's keys.

:class:`TokenReviewVerifier` (DESIGN §4, mode ``tokenreview``)::

    token ─ read_header, unverified payload ─▶ shape, alg; iss/aud/time    pure, can only deny
          ─ success cache (SHA-256 of token) ─▶ the claims of a recent review
          ─ POST tokenreviews {token, audiences} ─▶ authenticated, user, audiences, error
          ─ claims_from_review ─────────────────▶ TokenClaims(verified_by="tokenreview")

What is trusted is the API server's answer: ``status.authenticated``, the user
it names (namespace and service account from ``system:serviceaccount:<ns>:<sa>``,
the service account uid, the pod name and uid from ``extra``, and the node from
``extra`` on Kubernetes 1.30+) and the audiences it granted. TokenReview does not
return ``iat``/``exp`` (nor the node before 1.30); those are read from the
token's payload *without* verifying its signature. Unverified claims only ever
narrow: they can make a token fail (expired, too old, another issuer or
audience, or naming another subject than the review: TOKEN_SUBJECT_MISMATCH),
never make one pass or name another pod. (Once the API server authenticated the
token through its service-account authenticator, that payload is in fact the
one it verified; the comparison checks that it did.)

:class:`ClusterKeySource` (mode ``jwks`` without ``--jwks``, or with a ``--jwks`` URL
of the in-cluster API server): the API server's own JWK Set, ``/openid/v1/jwks`` on
the client's host (after checking the issuer through OIDC discovery, if asked),
fetched with the client's credentials (CA bundle, and a bearer token asked for
again before every fetch: in cluster it is the rotated projected token), for
:class:`~identityd.tokens.jwks.JWKSVerifier`. :func:`jwks_key_source` picks the
source of mode ``jwks`` from the settings.

Only this module of :mod:`identityd.tokens` uses kubernetes_asyncio; its
errors leave here as :class:`TokenReviewUnavailable`, :class:`InvalidToken`
or :class:`~identityd.errors.KeysUnavailable`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Protocol, Self
from urllib.parse import urlsplit

import aiohttp
import jwt
from jwt.types import Options
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException
from prometheus_client import CollectorRegistry, Counter, Histogram

from identityd.errors import ConfigError, InvalidToken, KeysUnavailable, Unavailable
from identityd.kubeapi import KubeConnection, new_api_client
from identityd.metrics import LATENCY_BUCKETS
from identityd.settings import JWKS_FETCH_TIMEOUT_SECONDS, MAX_TOKEN_BYTES, TokenSettings
from identityd.tokens.base import TokenClaims
from identityd.tokens.claims import SUBJECT_PREFIX, TokenReason, validate_claims
from identityd.tokens.jwks import check_settings
from identityd.tokens.jws import read_header
from identityd.tokens.key_sources import (
    DISCOVERY_PATH,
    DiscoveryKeySource,
    KeySource,
    URLKeySource,
    is_api_server_url,
    key_source_from_settings,
    redacted,
)

log = logging.getLogger(__name__)

# One review must come back well inside the decision timeout (2 s by default), so
# a slow API server shows as its own reason, not as a generic decision timeout.
REVIEW_TIMEOUT_SECONDS = 1.0
# A success is reused this long (never past the token's exp): the CA retries and
# /instance + /refresh bursts then cost one review. Short, because a review also
# says "the bound pod still exists" and a cached one cannot.
REVIEW_CACHE_SECONDS = 10.0
# Entries kept; the least recently used goes first. ~1 KiB each.
REVIEW_CACHE_SIZE = 10_000
# A TokenReview answer is ~2 KiB (it echoes the token); anything near this is not one.
MAX_REVIEW_BYTES = 64 * 1024
JWKS_PATH = "/openid/v1/jwks"

EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
EXTRA_NODE_UID = "authentication.kubernetes.io/node-uid"

# Characters of an API server message that go into a detail.
_MAX_DETAIL = 200
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# The signature is the API server's business; the payload is read, not trusted.
# Time, audience and issuer are checked by validate_claims with an explicit `now`,
# so pyjwt must not check them against its own clock.
_UNVERIFIED: Options = {
    "verify_signature": False,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}


class ReviewReason(StrEnum):
    """Reason codes only the TokenReview mode gives (the rest are TokenReason's)."""

    DENIED = "TOKEN_REVIEW_DENIED"
    UNAVAILABLE = "TOKEN_REVIEW_UNAVAILABLE"


class TokenReviewUnavailable(Unavailable):
    """The API server did not answer the review (down, slow, refused us, or nonsense): 503."""

    default_code = ReviewReason.UNAVAILABLE


# --- pure: the review's answer and what it proves ------------------------------


@dataclass(frozen=True, slots=True)
class ReviewStatus:
    """``status`` of a TokenReview answer."""

    authenticated: bool
    username: str
    uid: str | None
    groups: tuple[str, ...]
    extra: Mapping[str, tuple[str, ...]]
    audiences: tuple[str, ...]
    error: str


def parse_review(body: object) -> ReviewStatus:
    """The status of a TokenReview document; TokenReviewUnavailable when it is none
    (a broken answer is a broken dependency, not a verdict on the token)."""
    status = body.get("status") if isinstance(body, Mapping) else None
    if not isinstance(status, Mapping):
        raise TokenReviewUnavailable(None, "the answer is not a TokenReview with a status")
    user = status.get("user", {})
    extra = user.get("extra", {}) if isinstance(user, Mapping) else None
    authenticated = status.get("authenticated", False)  # omitempty: absent = false
    if not isinstance(user, Mapping) or not isinstance(extra, Mapping) \
            or not isinstance(authenticated, bool):
        raise TokenReviewUnavailable(None, "the TokenReview status is malformed")
    uid = user.get("uid")
    return ReviewStatus(
        authenticated=authenticated,
        username=_string(user.get("username", ""), "user.username"),
        uid=None if uid is None else _string(uid, "user.uid"),
        groups=_strings(user.get("groups"), "user.groups"),
        extra={_string(k, "user.extra"): _strings(v, "user.extra") for k, v in extra.items()},
        audiences=_strings(status.get("audiences"), "audiences"),
        error=_string(status.get("error", ""), "error"),
    )


def claims_from_review(
    review: ReviewStatus, token: TokenClaims, *, audiences: Sequence[str]
) -> TokenClaims:
    """The claims the review vouches for. ``token`` holds the (already checked, never
    trusted) claims of the token's payload; they must agree with the review, and only
    add what it does not say: iat, exp, nbf, and the node before Kubernetes 1.30."""
    if not review.authenticated:
        detail = _clean(review.error) or "the API server did not authenticate the token"
        raise InvalidToken(ReviewReason.DENIED, detail)
    granted = tuple(audience for audience in review.audiences if audience in audiences)
    if not granted:
        raise InvalidToken(
            TokenReason.AUDIENCE_MISMATCH, "the API server granted none of the configured audiences"
        )
    namespace, account = _service_account(review.username)
    pod_name, pod_uid = _one(review, EXTRA_POD_NAME), _one(review, EXTRA_POD_UID)
    if pod_name is None or pod_uid is None or not review.uid:
        raise InvalidToken(
            TokenReason.CLAIMS_MISSING, "the review names no pod or no service account uid"
        )
    node_name, node_uid = _one(review, EXTRA_NODE_NAME), _one(review, EXTRA_NODE_UID)
    differ = [
        what
        for what, trusted, unverified in (
            ("namespace", namespace, token.namespace),
            ("service account", account, token.service_account),
            ("service account uid", review.uid, token.service_account_uid),
            ("pod name", pod_name, token.pod_name),
            ("pod uid", pod_uid, token.pod_uid),
            ("node name", node_name, token.node_name if node_name is not None else None),
            ("node uid", node_uid, token.node_uid if node_uid is not None else None),
        )
        if trusted != unverified
    ]
    if differ:
        raise InvalidToken(
            TokenReason.SUBJECT_MISMATCH,
            f"the token's claims disagree with the review: {', '.join(differ)}",
        )
    return replace(
        token,
        audience=granted,
        subject=review.username,
        namespace=namespace,
        service_account=account,
        service_account_uid=review.uid,
        pod_name=pod_name,
        pod_uid=pod_uid,
        node_name=node_name if node_name is not None else token.node_name,
        node_uid=node_uid if node_uid is not None else token.node_uid,
        verified_by="tokenreview",
    )


def _service_account(username: str) -> tuple[str, str]:
    namespace, _, account = username.removeprefix(SUBJECT_PREFIX).partition(":")
    if not username.startswith(SUBJECT_PREFIX) or not namespace or not account \
            or ":" in account:
        raise InvalidToken(
            TokenReason.SUBJECT_MISMATCH, "the reviewed user is not a service account"
        )
    return namespace, account


def _one(review: ReviewStatus, key: str) -> str | None:
    values = review.extra.get(key)
    if values is None:
        return None
    if len(values) != 1 or not values[0]:
        raise InvalidToken(TokenReason.SUBJECT_MISMATCH, f"review extra {key} is not one value")
    return values[0]


def _string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TokenReviewUnavailable(None, f"TokenReview status {name} is not a string")
    return value


def _strings(value: object, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TokenReviewUnavailable(None, f"TokenReview status {name} is not a string list")
    return tuple(value)


def _clean(text: str, token: str | None = None) -> str:
    """An API server message fit for a detail: no token, no control characters, short."""
    if token:
        text = text.replace(token, "<token>")
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "..."


def unverified_claims(token: str, *, max_bytes: int = MAX_TOKEN_BYTES) -> dict[str, Any]:
    """The payload of a token of acceptable shape and alg, signature NOT checked."""
    read_header(token, max_bytes=max_bytes)  # size, three segments, alg allow-list
    try:
        claims: dict[str, Any] = jwt.decode(token, options=_UNVERIFIED)
    except jwt.PyJWTError as exc:
        raise InvalidToken(TokenReason.MALFORMED, "payload is not a base64url JSON object") from exc
    return claims


# --- the success cache -------------------------------------------------------------


class _SuccessCache:
    """Claims of recent successful reviews by SHA-256 of the token; bounded, LRU.

    An entry lives ``seconds`` on the monotonic ``clock``, and never past the
    token's own exp on the wall clock of the request (``now``)."""

    def __init__(self, *, seconds: float, size: int, clock: Callable[[], float]) -> None:
        self._seconds = seconds
        self._size = size
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[TokenClaims, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> TokenClaims | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        claims, until = entry
        if self._clock() >= until or now >= claims.expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return claims

    def put(self, key: bytes, claims: TokenClaims) -> None:
        if self._seconds <= 0 or self._size <= 0:
            return
        self._entries[key] = (claims, self._clock() + self._seconds)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


# --- the edge: POST tokenreviews -----------------------------------------------------


class ReviewAPI(Protocol):
    async def review(self, token: str, audiences: Sequence[str], *, limit: float) -> object:
        """The TokenReview the API server answers (parsed JSON) within ``limit``
        seconds; TokenReviewUnavailable otherwise."""
        ...

    async def aclose(self) -> None: ...


class TokenReviewAPI:
    """``POST /apis/authentication.k8s.io/v1/tokenreviews`` through one kubernetes_asyncio
    ApiClient: its auth (a rotated token is re-read), TLS, and one connection pool for
    every review. Needs RBAC ``create`` on ``tokenreviews.authentication.k8s.io``."""

    def __init__(self, api_client: k8s.ApiClient, *, max_bytes: int = MAX_REVIEW_BYTES) -> None:
        self._client = api_client
        self._api = k8s.AuthenticationV1Api(api_client)
        self._max_bytes = max_bytes

    @classmethod
    async def connect(cls, connection: KubeConnection) -> TokenReviewAPI:
        return cls(await new_api_client(connection))

    async def review(self, token: str, audiences: Sequence[str], *, limit: float) -> object:
        body = k8s.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=k8s.V1TokenReviewSpec(token=token, audiences=list(audiences)),
        )
        try:
            async with asyncio.timeout(limit):
                # Raw response: status and JSON as sent, no model (its repr has the token).
                response: Any = await self._api.create_token_review(
                    body,
                    _preload_content=False,
                    _request_timeout=aiohttp.ClientTimeout(total=limit),
                )
                try:
                    raw = await self._read(response)
                finally:
                    response.release()  # back to the pool
        except TimeoutError as exc:
            raise TokenReviewUnavailable(None, f"no answer within {limit:g}s") from exc
        except (aiohttp.ClientError, OSError, ApiException, ConfigException, ValueError) as exc:
            raise TokenReviewUnavailable(None, _clean(f"{type(exc).__name__}: {exc}", token)) \
                from exc
        document = _json(raw)
        if response.status not in (200, 201):
            # 401/403: our own credentials or RBAC, 429/5xx: the API server. Never the token.
            message = document.get("message", "") if isinstance(document, Mapping) else ""
            detail = _clean(f"HTTP {response.status}: {message}", token)
            raise TokenReviewUnavailable(None, detail)
        return document

    async def _read(self, response: Any) -> bytes:
        body = bytearray()
        async for chunk in response.content.iter_chunked(16 * 1024):
            body += chunk
            if len(body) > self._max_bytes:
                raise TokenReviewUnavailable(None, f"answer larger than {self._max_bytes} bytes")
        return bytes(body)

    async def aclose(self) -> None:
        await self._client.close()


def _json(raw: bytes) -> object:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        return None


# --- metrics ---------------------------------------------------------------------------


class TokenReviewMetrics:
    """TokenReview latency and cache use, on the registry given (the app's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram(
            "identityd_token_review_seconds",
            "TokenReview round trips to the API server, by result (authenticated, denied, "
            "error = no usable answer).",
            ["result"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.cache = Counter(
            "identityd_token_review_cache_total",
            "Token verifications answered from the success cache (hit) or sent to the API "
            "server (miss).",
            ["result"],
            registry=registry,
        )


# --- the verifier ---------------------------------------------------------------------


class TokenReviewVerifier:
    """The TokenVerifier of DESIGN §4 that asks the API server (mode ``tokenreview``).

    ``settings`` gives issuer, audiences (sent as ``spec.audiences``), leeway and
    max age. ``clock`` is the monotonic clock of the cache, apart from the token
    time ``now`` passed to :meth:`verify`. Build with :meth:`connect`."""

    def __init__(
        self,
        settings: TokenSettings,
        api: ReviewAPI,
        *,
        timeout: float = REVIEW_TIMEOUT_SECONDS,
        cache_seconds: float = REVIEW_CACHE_SECONDS,
        cache_size: int = REVIEW_CACHE_SIZE,
        metrics: TokenReviewMetrics | None = None,
        max_token_bytes: int = MAX_TOKEN_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_settings(settings)
        if timeout <= 0:
            raise ValueError(f"timeout: must be positive, got {timeout}")
        if cache_seconds < 0 or cache_size < 0:
            raise ValueError("cache_seconds/cache_size: must not be negative")
        self._settings = settings
        self._api = api
        self._timeout = timeout
        self._metrics = metrics
        self._max_token_bytes = max_token_bytes
        self._clock = clock
        self._cache = _SuccessCache(seconds=cache_seconds, size=cache_size, clock=clock)

    @classmethod
    async def connect(
        cls, settings: TokenSettings, connection: KubeConnection, **options: Any
    ) -> TokenReviewVerifier:
        """A verifier with its own API client for ``connection`` (ConfigError if unusable)."""
        api = await TokenReviewAPI.connect(connection)
        try:
            return cls(settings, api, **options)
        except BaseException:
            await api.aclose()
            raise

    @property
    def cached(self) -> int:
        return len(self._cache)

    async def start(self) -> None:
        """Nothing to fetch ahead: every review is a call to the API server."""

    @property
    def ready(self) -> bool:
        """Always True: nothing is held that could be missing. A review needs only the
        API server, which the pod watch's readiness already reports on (in a cluster);
        a review that fails is a 503 of its own."""
        return True

    async def verify(self, token: str, *, now: float) -> TokenClaims:
        settings = self._settings
        claims = validate_claims(
            unverified_claims(token, max_bytes=self._max_token_bytes),
            issuer=settings.issuer,
            audiences=settings.audiences,
            now=now,
            leeway=settings.leeway_seconds,
            max_age=settings.max_age_seconds,
        )
        # The checks above run on a hit too: max age and leeway hold for cached claims.
        key = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(key, now)
        if cached is not None:
            self._count("hit")
            return cached
        self._count("miss")
        verified = claims_from_review(
            await self._review(token), claims, audiences=settings.audiences
        )
        self._cache.put(key, verified)
        return verified

    async def _review(self, token: str) -> ReviewStatus:
        started = self._clock()
        result = "error"
        try:
            status = parse_review(
                await self._api.review(token, self._settings.audiences, limit=self._timeout)
            )
            result = "authenticated" if status.authenticated else "denied"
            # status.error goes into a detail: make sure the token is not in it.
            return replace(status, error=_clean(status.error, token))
        except TokenReviewUnavailable as exc:
            log.warning("TokenReview failed: %s", exc.detail)
            raise
        finally:
            if self._metrics is not None:
                self._metrics.latency.labels(result).observe(self._clock() - started)

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.cache.labels(result).inc()

    async def aclose(self) -> None:
        await self._api.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# --- the API server's keys, for JWKSVerifier ---------------------------------------


class ClusterKeySource:
    """The API server's JWK Set (a :class:`~identityd.tokens.key_sources.KeySource`), fetched
    from ``{host}/openid/v1/jwks`` over one kubernetes_asyncio ApiClient's session (its
    CA bundle and client certificate) with its bearer token, asked for again before
    each fetch.

    ``discovery=True``: each fetch first GETs ``{host}/.well-known/openid-configuration``
    the same way, and its ``issuer`` must equal ``issuer``. Its ``jwks_uri`` is NOT
    followed: a real API server names its external address there (the advertise
    address, ``--external-hostname`` or ``--service-account-jwks-uri``), which a pod
    may not reach or trust, and where the service-account token must not go. The API
    server serves the same key set on the host we talk to. Both paths are open to
    every service account by default (the ClusterRoleBinding
    ``system:service-account-issuer-discovery``). Owns ``api_client``."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        *,
        discovery: bool = False,
        issuer: str | None = None,
        timeout: float = JWKS_FETCH_TIMEOUT_SECONDS,
    ) -> None:
        self._client = api_client
        configuration = api_client.configuration
        host = str(configuration.host).rstrip("/")

        def session() -> aiohttp.ClientSession:
            return api_client.rest_client.pool_manager

        try:
            self._keys = URLKeySource(
                host + JWKS_PATH, session_factory=session, headers=self._headers,
                timeout=timeout,
            )
            self._discovery = (
                DiscoveryKeySource(
                    host + DISCOVERY_PATH, issuer=issuer, session_factory=session,
                    headers=self._headers, timeout=timeout,
                )
                if discovery
                else None
            )
        except ValueError as exc:
            raise ConfigError(None, f"API server JWKS: {exc}") from exc
        self._host = host

    @classmethod
    async def connect(cls, connection: KubeConnection, **options: Any) -> ClusterKeySource:
        api_client = await new_api_client(connection)
        try:
            return cls(api_client, **options)
        except BaseException:
            await api_client.close()
            raise

    async def _headers(self) -> Mapping[str, str]:
        try:
            # Runs the client's refresh hook: in cluster, the rotated token file.
            auth = await self._client.configuration.auth_settings()
        except (ConfigException, OSError) as exc:
            raise KeysUnavailable(None, f"API server credentials: {type(exc).__name__}") from exc
        return {
            setting["key"]: setting["value"]
            for setting in auth.values()
            if setting.get("in") == "header" and setting.get("value")
        }

    async def fetch(self) -> object:
        if self._discovery is not None:
            await self._discovery.document()  # the issuer check; jwks_uri is not used
        return await self._keys.fetch()

    async def aclose(self) -> None:
        # Both sources share the client's session: closing it once is enough, and
        # closing a closed one is harmless.
        if self._discovery is not None:
            await self._discovery.aclose()
        await self._keys.aclose()
        await self._client.close()

    def __repr__(self) -> str:
        mode = ", discovery" if self._discovery is not None else ""
        return f"ClusterKeySource({redacted(self._host)!r}{mode})"


async def cluster_key_source(
    connection: KubeConnection,
    *,
    discovery: bool = False,
    issuer: str | None = None,
    fetch_timeout: float = JWKS_FETCH_TIMEOUT_SECONDS,
) -> ClusterKeySource:
    """The API server's keys for ``JWKSVerifier(settings, source=...)``; see
    :class:`ClusterKeySource`. ConfigError when ``connection`` is unusable."""
    return await ClusterKeySource.connect(
        connection, discovery=discovery, issuer=issuer, timeout=fetch_timeout
    )


async def jwks_key_source(
    settings: TokenSettings,
    connection: KubeConnection,
    *,
    service_host: str | None = None,
) -> KeySource:
    """The key source of mode ``jwks``: the file or URL ``settings.jwks`` names, or
    the API server's own keys through :class:`ClusterKeySource` (CA bundle and
    service-account token of ``connection``) when ``settings.jwks`` is unset or is a
    URL of the in-cluster API server (``https://kubernetes.default.svc/...``, or the
    host ``service_host``, by default ``$KUBERNETES_SERVICE_HOST``). Such a URL may
    name ``/openid/v1/jwks`` (discovery as ``settings.jwks_discovery`` says) or the
    discovery document (discovery on); its host is not dialled as written: the keys
    come from the host of ``connection``, the same API server. Another path is a
    ConfigError, as is an unusable ``connection``."""
    location = settings.jwks
    if service_host is None:
        service_host = os.environ.get("KUBERNETES_SERVICE_HOST")
    discovery = settings.jwks_discovery
    if location:
        if not is_api_server_url(location, service_host=service_host):
            return key_source_from_settings(settings, service_host=service_host)
        path = urlsplit(location).path.rstrip("/")
        if path == DISCOVERY_PATH:
            discovery = True
        elif path != JWKS_PATH:
            raise ConfigError(
                "TOKENS_JWKS_API_SERVER",
                f"tokens.jwks: {redacted(location)} is the in-cluster API server, which "
                f"serves its keys at {JWKS_PATH} and {DISCOVERY_PATH} only",
            )
    source = await cluster_key_source(
        connection,
        discovery=discovery,
        issuer=settings.issuer,
        fetch_timeout=settings.fetch_timeout_seconds,
    )
    if location:
        log.info(
            "tokens.jwks %s is the in-cluster API server: its keys are fetched from %r "
            "with the cluster CA and the service-account token",
            redacted(location),
            source,
        )
    return source
