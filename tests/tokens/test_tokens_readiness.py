"""Verifier readiness: JWKSVerifier.start() fetches the key set in the background and
``ready`` says whether one is held; a key endpoint down at start keeps it not ready
until it is back, and keys once held keep it ready while the endpoint is down.

Keys come from a real file or a real HTTP server on loopback (tests/doubles/jwks_server).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tokens_support import ISSUER, NOW, MemorySource, mint, shared_issuer, token_settings

from identityd.errors import InvalidToken, KeysUnavailable
from identityd.tokens import JWKSVerifier
from identityd.tokens.claims import TokenReason
from identityd.tokens.jwks import COLD_RETRY_SECONDS
from identityd.tokens.tokenreview import TokenReviewVerifier
from tests.doubles.jwks_server import JWKSDouble
from tests.doubles.kube_apiserver import KubeAPIServer
from tests.doubles.kube_inventory import connection_to
from tests.doubles.waiting import eventually

FETCH_TIMEOUT = 0.3
# "Ready within about a second of the endpoint coming back": one cold retry interval
# (0.5 s) plus a fetch, with room for a loaded test machine.
RECOVERY_SECONDS = 1.0
JWKS_LOGGER = "identityd.tokens.jwks"


def rs_jwks() -> dict[str, Any]:
    return shared_issuer("RSA").jwks()


def failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("JWKS fetch failed")]


def prefetch_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "jwks-prefetch" and not t.done()]


@pytest.fixture
async def keys() -> AsyncIterator[JWKSDouble]:
    async with JWKSDouble(rs_jwks()) as double:
        yield double


def url_verifier(keys: JWKSDouble, **overrides: Any) -> JWKSVerifier:
    return JWKSVerifier(
        token_settings(jwks=keys.url, fetch_timeout_seconds=FETCH_TIMEOUT, **overrides)
    )


# --- a file ----------------------------------------------------------------------------


async def test_not_ready_before_keys_and_ready_once_the_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(rs_jwks()))
    async with JWKSVerifier(token_settings(jwks=str(path))) as verifier:
        assert not verifier.ready
        await verifier.start()
        await eventually(lambda: verifier.ready, within=RECOVERY_SECONDS)
        claims = await verifier.verify(mint(shared_issuer("RSA")), now=NOW + 10)
        assert claims.issuer == ISSUER


async def test_a_missing_file_is_not_ready_until_it_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=JWKS_LOGGER)
    path = tmp_path / "jwks.json"
    settings = token_settings(jwks=str(path), refetch_interval_seconds=0.1)
    async with JWKSVerifier(settings) as verifier:
        await verifier.start()
        await eventually(lambda: len(failures(caplog)) >= 2)  # retried, still nothing
        assert not verifier.ready
        with pytest.raises(KeysUnavailable):
            await verifier.verify(mint(shared_issuer("RSA")), now=NOW + 10)

        path.write_text(json.dumps(rs_jwks()))
        await eventually(lambda: verifier.ready, within=RECOVERY_SECONDS)


async def test_a_set_without_a_usable_key_is_not_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jwks.json"
    # An HMAC key is no signature key of ours: the set holds nothing usable.
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}))
    async with JWKSVerifier(token_settings(jwks=str(path))) as verifier:
        await verifier.start()
        await eventually(lambda: failures(caplog))
        assert "no usable signature key" in failures(caplog)[0].getMessage()
        assert not verifier.ready


async def test_without_start_nothing_is_fetched_until_the_first_token(
    keys: JWKSDouble,
) -> None:
    async with url_verifier(keys) as verifier:
        await asyncio.sleep(COLD_RETRY_SECONDS)  # time a prefetch would have used
        assert keys.fetches == 0 and not verifier.ready
        await verifier.verify(mint(shared_issuer("RSA")), now=NOW + 10)
        assert verifier.ready and keys.fetches == 1


# --- a URL -----------------------------------------------------------------------------


async def test_ready_after_the_prefetch_with_one_fetch(keys: JWKSDouble) -> None:
    async with url_verifier(keys) as verifier:
        await verifier.start()
        await verifier.start()  # idempotent: one prefetch
        await eventually(lambda: verifier.ready, within=RECOVERY_SECONDS)
        # The first token uses the prefetched set: no fetch of its own.
        await verifier.verify(mint(shared_issuer("RSA")), now=NOW + 10)
        assert keys.fetches == 1


@pytest.mark.parametrize("fault", ["refused", "http_503"])
async def test_url_down_at_start_is_not_ready_then_ready_within_a_second_of_recovery(
    keys: JWKSDouble, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    caplog.set_level(logging.DEBUG, logger=JWKS_LOGGER)
    if fault == "refused":
        await keys.refuse()
    else:
        keys.set_status(503)
    async with url_verifier(keys) as verifier:
        await verifier.start()
        # Two failed tries: the first, and a retry on its own (no token asked for it).
        await eventually(lambda: len(failures(caplog)) >= 2, within=3 * COLD_RETRY_SECONDS)
        assert not verifier.ready

        if fault == "refused":
            await keys.accept()
        else:
            keys.set_status(200)
        since = time.monotonic()
        await eventually(lambda: verifier.ready, within=2 * RECOVERY_SECONDS)
        assert time.monotonic() - since <= RECOVERY_SECONDS
        claims = await verifier.verify(mint(shared_issuer("RSA")), now=NOW + 10)
        assert claims.verified_by == "jwks"


async def test_keys_cached_stay_ready_while_the_url_is_down(
    keys: JWKSDouble, caplog: pytest.LogCaptureFixture
) -> None:
    # No refetch interval: the unknown kid below refetches at once.
    async with url_verifier(keys, refetch_interval_seconds=0) as verifier:
        await verifier.start()
        await eventually(lambda: verifier.ready, within=RECOVERY_SECONDS)
        await keys.refuse()

        # A kid the set lacks makes the verifier refetch, which fails.
        with pytest.raises(InvalidToken) as caught:
            await verifier.verify(mint(shared_issuer("EC")), now=NOW + 10)
        assert caught.value.code == TokenReason.UNKNOWN_KID
        assert failures(caplog) and "keeping the cached keys" in failures(caplog)[-1].getMessage()

        assert verifier.ready
        claims = await verifier.verify(mint(shared_issuer("RSA")), now=NOW + 10)
        assert claims.issuer == ISSUER


async def test_start_returns_at_once_while_the_endpoint_hangs(keys: JWKSDouble) -> None:
    keys.set_delay(2.0)
    async with JWKSVerifier(token_settings(jwks=keys.url)) as verifier:  # 5 s fetch timeout
        started = time.monotonic()
        await verifier.start()
        assert time.monotonic() - started < 0.1
        await eventually(lambda: keys.fetches == 1)
        assert not verifier.ready


async def test_failures_are_logged_without_credentials_and_not_repeated(
    keys: JWKSDouble, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=JWKS_LOGGER)
    await keys.refuse()
    url = keys.url.replace("http://", "http://reader:pw-in-url@") + "?access_token=tok-in-query"
    async with JWKSVerifier(
        token_settings(jwks=url, fetch_timeout_seconds=FETCH_TIMEOUT, refetch_interval_seconds=0.1)
    ) as verifier:
        await verifier.start()
        await eventually(lambda: len(failures(caplog)) >= 3, within=4 * COLD_RETRY_SECONDS)
    logged = failures(caplog)
    # The same failure twice a second: one warning, the repeats at debug.
    assert [r.levelno for r in logged[:3]] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "127.0.0.1" in logged[0].getMessage()
    assert "pw-in-url" not in caplog.text and "tok-in-query" not in caplog.text


# --- the prefetch task -------------------------------------------------------------------


class BrokenOnceSource(MemorySource):
    """A source with a bug on its first fetch (an exception no adapter translated)."""

    async def fetch(self) -> object:
        self.fetches += 1
        if self.fetches == 1:
            raise RuntimeError("bug with detail-not-to-log")
        return self.document


async def test_an_unexpected_error_does_not_end_the_prefetch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = BrokenOnceSource(rs_jwks())
    async with JWKSVerifier(token_settings(), source=source) as verifier:
        await verifier.start()
        await eventually(lambda: verifier.ready, within=RECOVERY_SECONDS)
    assert source.fetches == 2
    assert "RuntimeError" in caplog.text and "detail-not-to-log" not in caplog.text


async def test_without_a_refetch_interval_the_prefetch_still_paces_itself() -> None:
    source = MemorySource(rs_jwks())
    source.fail = True
    async with JWKSVerifier(
        token_settings(refetch_interval_seconds=0), source=source
    ) as verifier:
        await verifier.start()
        await eventually(lambda: source.fetches >= 2)
        before = source.fetches
        await asyncio.sleep(0.3)
        # Paused at least 50 ms between tries: no busy loop against a failing source.
        assert source.fetches - before <= 0.3 / 0.05 + 1
        source.fail = False
        await eventually(lambda: verifier.ready, within=RECOVERY_SECONDS)


async def test_aclose_ends_the_prefetch_and_start_after_it_does_nothing() -> None:
    source = MemorySource(rs_jwks())
    source.fail = True
    verifier = JWKSVerifier(token_settings(), source=source)
    await verifier.start()
    await eventually(lambda: source.fetches >= 1)
    assert len(prefetch_tasks()) == 1
    await verifier.aclose()
    assert prefetch_tasks() == [] and source.closed
    await verifier.start()
    assert prefetch_tasks() == []
    assert not verifier.ready


async def test_start_when_keys_are_held_starts_nothing() -> None:
    source = MemorySource(rs_jwks())
    async with JWKSVerifier(token_settings(), source=source) as verifier:
        await verifier.verify(mint(shared_issuer("RSA")), now=NOW + 10)
        await verifier.start()
        assert prefetch_tasks() == [] and verifier.ready and source.fetches == 1


# --- TokenReview ---------------------------------------------------------------------------


async def test_tokenreview_is_ready_without_anything_to_fetch() -> None:
    async with KubeAPIServer() as api:
        settings = token_settings(issuer=api.tokens.issuer)
        async with await TokenReviewVerifier.connect(settings, connection_to(api)) as verifier:
            await verifier.start()
            assert verifier.ready
