"""JWKSVerifier: bound service-account tokens checked against a JSON Web Key Set (DESIGN §4).

    token ─ parse_token ──────────▶ alg, kid,    pure: size, shape, canonical base64url,
                                    segments     alg allow-list, crit
          ─ _KeyCache.candidates ─▶ key(s)       fetch when cold, on unknown kid, when stale
          ─ pyjwt's alg, verify ──▶ claims       signature only; the key type must fit alg
          ─ validate_claims ──────▶ TokenClaims  pure, explicit ``now``

The compact form is split and decoded once, by :func:`~identityd.tokens.jws.parse_token`,
and the signature checked here with pyjwt's implementation of the algorithm
(``jwt.algorithms``), not ``jwt.decode`` (:mod:`identityd.tokens.jws` says why).

Keys come only from the configured :class:`~identityd.tokens.key_sources.KeySource`
(a file, a URL, or OIDC discovery), read by :func:`~identityd.tokens.jwk.parse_jwks`;
``jku``/``x5u``/``x5c``/``jwk`` headers are never looked at and ``kid`` is nothing
but a dictionary key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl as ssl_module
import time
from collections.abc import Callable
from typing import Any, Self

import jwt

from identityd.errors import InvalidToken, KeysUnavailable
from identityd.settings import MAX_TOKEN_BYTES, TokenSettings
from identityd.tokens.base import TokenClaims
from identityd.tokens.claims import TokenReason, validate_claims
from identityd.tokens.jwk import VerificationKey, parse_jwks
from identityd.tokens.jws import ALLOWED_ALGORITHMS, TokenParts, parse_token
from identityd.tokens.key_sources import (
    HeadersProvider,
    KeySource,
    SessionFactory,
    key_source_from_settings,
)

log = logging.getLogger(__name__)

# A token without kid is tried against at most this many keys (each try costs a
# signature check; Kubernetes tokens always carry a kid).
MAX_KIDLESS_CANDIDATES = 4
# While no key set has ever loaded, retry the source at most this often.
COLD_RETRY_SECONDS = 0.5
# The background prefetch pauses at least this long between tries (refetch_interval may be 0).
_MIN_PREFETCH_PAUSE_SECONDS = 0.05
# The prefetch retries a broken source twice a second: the same failure is warned
# about again only after this long (debug in between), a new one at once.
_REPEAT_WARNING_SECONDS = 60.0
# pyjwt's implementations of the allowed algorithms (RSA PKCS#1 v1.5, RSA-PSS,
# ECDSA with its raw r||s signature form).
_ALGORITHMS = {
    name: algorithm
    for name, algorithm in jwt.algorithms.get_default_algorithms().items()
    if name in ALLOWED_ALGORITHMS
}


# --- the cache ----------------------------------------------------------------


class _KeyCache:
    """The key set of one source, fetched when first needed (or ahead of that, by
    :meth:`start`), on an unknown kid (at most once per ``refetch_interval``), and in
    the background when older than ``max_age``. One fetch at a time: concurrent
    callers await the same one. A failed fetch keeps the keys already loaded."""

    def __init__(
        self,
        source: KeySource,
        *,
        refetch_interval: float,
        max_age: float,
        clock: Callable[[], float],
    ) -> None:
        self._source = source
        self._refetch_interval = refetch_interval
        self._max_age = max_age
        self._clock = clock
        self._keys: tuple[VerificationKey, ...] | None = None
        self._by_kid: dict[str, VerificationKey] = {}
        self._loaded_at = 0.0
        self._last_attempt: float | None = None
        self._last_error = "no key set loaded yet"
        self._warned: tuple[str, float] | None = None  # the failure last warned about, when
        self._inflight: asyncio.Task[None] | None = None
        self._prefetch: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def loaded(self) -> bool:
        """Whether a key set is held. Only a set with a usable key is ever stored, and
        a failed refetch keeps it, so this never turns False again."""
        return self._keys is not None

    def start(self) -> None:
        """Fetch in the background until a first key set is held; a no-op when one is
        held, the prefetch is already running, or the cache is closed."""
        if self._keys is None and self._prefetch is None and not self._closed:
            self._prefetch = asyncio.create_task(self._prefetch_keys(), name="jwks-prefetch")

    async def _prefetch_keys(self) -> None:
        # The cadence of the cold path in _ensure_loaded: a callback arriving meanwhile
        # joins the fetch under way instead of adding one.
        interval = min(COLD_RETRY_SECONDS, self._refetch_interval)
        while self._keys is None:
            if self._may_fetch(interval):
                try:
                    await self._refresh()
                except Exception as exc:  # noqa: BLE001 - a source's bug must not end the retries
                    # The type only: a foreign message may carry a URL or a header.
                    log.error("JWKS prefetch from %r: %s", self._source, type(exc).__name__)
            if self._keys is None:
                since = self._clock() - (self._last_attempt or 0.0)
                await asyncio.sleep(max(interval - since, _MIN_PREFETCH_PAUSE_SECONDS))

    async def candidates(self, kid: str | None, alg: str) -> tuple[VerificationKey, ...]:
        """The key named ``kid``, or without a kid the keys fitting ``alg``."""
        await self._ensure_loaded()
        found = self._select(kid, alg)
        if not found and self._may_fetch(self._refetch_interval):
            await self._refresh()
            found = self._select(kid, alg)
        if not found:
            what = f"kid {kid!r:.80}" if kid is not None else f"no kid and no {alg} key"
            raise InvalidToken(TokenReason.UNKNOWN_KID, f"{what} in the key set")
        return found

    async def _ensure_loaded(self) -> None:
        if self._keys is None:
            if self._may_fetch(min(COLD_RETRY_SECONDS, self._refetch_interval)):
                await self._refresh()
            if self._keys is None:
                raise KeysUnavailable(None, self._last_error)
        elif self._clock() - self._loaded_at >= self._max_age and self._may_fetch(
            self._refetch_interval
        ):
            self._start()  # stale: the cached keys answer while it runs

    def _select(self, kid: str | None, alg: str) -> tuple[VerificationKey, ...]:
        if kid is not None:
            key = self._by_kid.get(kid)
            return () if key is None else (key,)
        fitting = [key for key in self._keys or () if key.fits(alg)]
        return tuple(fitting[:MAX_KIDLESS_CANDIDATES])

    def _may_fetch(self, interval: float) -> bool:
        if self._inflight is not None:
            return True  # join the fetch under way
        return self._last_attempt is None or self._clock() - self._last_attempt >= interval

    async def _refresh(self) -> None:
        # shield: a caller that is cancelled must not cancel the others' fetch.
        await asyncio.shield(self._start())

    def _start(self) -> asyncio.Task[None]:
        if self._inflight is None:
            self._last_attempt = self._clock()
            self._inflight = asyncio.create_task(self._fetch(), name="jwks-fetch")
        return self._inflight

    async def _fetch(self) -> None:
        try:
            try:
                keys = parse_jwks(await self._source.fetch())
                if not keys:
                    raise ValueError("no usable signature key in the set")
            except (KeysUnavailable, ValueError) as exc:
                detail = exc.detail if isinstance(exc, KeysUnavailable) else str(exc)
                self._last_error = f"{self._source!r}: {detail}"
                self._log_failure()
                return
            self._keys = keys
            self._warned = None
            self._by_kid = {key.kid: key for key in keys if key.kid is not None}
            self._loaded_at = self._clock()
            log.info("JWKS loaded from %r: %d keys", self._source, len(keys))
        finally:
            self._inflight = None

    def _log_failure(self) -> None:
        kept = "; keeping the cached keys" if self._keys else ""
        now = self._clock()
        if self._warned is not None and self._warned[0] == self._last_error \
                and now - self._warned[1] < _REPEAT_WARNING_SECONDS:
            log.debug("JWKS fetch failed again: %s%s", self._last_error, kept)
            return
        self._warned = (self._last_error, now)
        log.warning("JWKS fetch failed: %s%s", self._last_error, kept)

    async def aclose(self) -> None:
        self._closed = True
        # The prefetch first: it may be waiting on the fetch cancelled next.
        prefetch, self._prefetch = self._prefetch, None
        await _cancel(prefetch)
        inflight, self._inflight = self._inflight, None
        await _cancel(inflight)
        await self._source.aclose()


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --- the verifier -------------------------------------------------------------


class JWKSVerifier:
    """The TokenVerifier of DESIGN §4 over a JWK Set.

    ``source`` defaults to what ``settings.jwks`` names (see
    :func:`key_source_from_settings`; ``session_factory``, ``ssl`` and ``headers``
    are handed to it). ``clock`` is the monotonic clock of the key cache, apart
    from the token time ``now`` passed to :meth:`verify`."""

    def __init__(
        self,
        settings: TokenSettings,
        *,
        source: KeySource | None = None,
        session_factory: SessionFactory | None = None,
        ssl: ssl_module.SSLContext | None = None,
        headers: HeadersProvider | None = None,
        max_token_bytes: int = MAX_TOKEN_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_settings(settings)
        self._settings = settings
        self._max_token_bytes = max_token_bytes
        if source is None:
            source = key_source_from_settings(
                settings, session_factory=session_factory, ssl=ssl, headers=headers
            )
        self._cache = _KeyCache(
            source,
            refetch_interval=settings.refetch_interval_seconds,
            max_age=settings.max_key_age_seconds,
            clock=clock,
        )

    async def start(self) -> None:
        """Fetch the key set in the background, retried like the first token would
        (at most every ``COLD_RETRY_SECONDS``) until one loads; returns at once."""
        self._cache.start()

    @property
    def ready(self) -> bool:
        """True once a key set with a usable key is held; it stays True while later
        refetches fail (the cached keys still verify)."""
        return self._cache.loaded

    async def verify(self, token: str, *, now: float) -> TokenClaims:
        parts = parse_token(token, max_bytes=self._max_token_bytes)
        keys = await self._cache.candidates(parts.header.kid, parts.header.alg)
        claims = _verified_claims(parts, keys)
        return validate_claims(
            claims,
            issuer=self._settings.issuer,
            audiences=self._settings.audiences,
            now=now,
            leeway=self._settings.leeway_seconds,
            max_age=self._settings.max_age_seconds,
        )

    async def aclose(self) -> None:
        await self._cache.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _verified_claims(parts: TokenParts, keys: tuple[VerificationKey, ...]) -> dict[str, Any]:
    header = parts.header
    usable = [key for key in keys if key.fits(header.alg)]
    if not usable:
        raise InvalidToken(
            TokenReason.ALG_NOT_ALLOWED, f"alg {header.alg} does not fit key {header.kid!r:.80}"
        )
    algorithm = _ALGORITHMS[header.alg]
    for key in usable:
        try:
            verified = algorithm.verify(parts.signing_input, key.public_key, parts.signature)
        except Exception as exc:  # noqa: BLE001  (a signature the backend cannot even read)
            raise InvalidToken(TokenReason.SIGNATURE_INVALID, type(exc).__name__) from None
        if verified:
            break
    else:
        raise InvalidToken(TokenReason.SIGNATURE_INVALID, "signature does not verify")
    not_an_object = InvalidToken(TokenReason.MALFORMED, "payload is not a base64url JSON object")
    try:
        claims = json.loads(parts.payload)
    except (ValueError, RecursionError):
        raise not_an_object from None
    if not isinstance(claims, dict):
        raise not_an_object
    return claims


def check_settings(settings: TokenSettings) -> None:
    if not settings.issuer:
        raise ValueError("settings.issuer: must not be empty")
    if isinstance(settings.audiences, str) or not settings.audiences:
        raise ValueError("settings.audiences: expected a non-empty tuple of strings")
    if settings.leeway_seconds < 0 or settings.max_age_seconds < 0:
        raise ValueError("settings.leeway_seconds/max_age_seconds: must not be negative")
    if settings.refetch_interval_seconds < 0 or settings.max_key_age_seconds <= 0:
        raise ValueError("settings.refetch_interval_seconds/max_key_age_seconds: out of range")
