"""When the agent refreshes and how it backs off, and its command-line wrapper."""

from __future__ import annotations

import datetime
import random
from pathlib import Path

import pytest

from identityd.errors import ConfigError, Denied, Unavailable
from identityd.keys.ca_pem import CertFacts
from identityd.sia.agent import Agent
from identityd.sia.config import AgentConfig
from identityd.sia.main import EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE, agent_once, outcome

START = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def facts(hours: float) -> CertFacts:
    return CertFacts(
        common_name="sports.web.api",
        serial=1,
        not_before=START,
        not_after=START + datetime.timedelta(hours=hours),
        dns=(),
        ips=(),
        uris=(),
        public_key_sha256="",
    )


def agent(**overrides: object) -> Agent:
    config = AgentConfig(ca_url="https://ca.example", **overrides)  # type: ignore[arg-type]
    return Agent(config, rng=random.Random(7))


def test_refresh_at_the_fraction_minus_jitter() -> None:
    a = agent(refresh_fraction=0.7, jitter_fraction=0.1)
    times = [a.refresh_at(facts(24)) - START.timestamp() for _ in range(500)]
    hour = 3600.0
    assert all(0.6 * 24 * hour <= t <= 0.7 * 24 * hour for t in times)
    assert max(times) - min(times) > 2 * hour  # the jitter spreads a fleet out


def test_no_jitter_is_exact() -> None:
    a = agent(refresh_fraction=0.5, jitter_fraction=0.0)
    assert a.refresh_at(facts(10)) == START.timestamp() + 5 * 3600


def test_lifetime_counts_from_receipt_not_from_a_backdated_not_before() -> None:
    a = agent(refresh_fraction=0.5, jitter_fraction=0.0)
    # A 1-hour certificate backdated by 5 minutes, received at START + 5 min.
    received = START.timestamp() + 300
    assert a.refresh_at(facts(1.0), received) == received + (3600 - 300) / 2
    assert a.refresh_at(facts(1.0), START.timestamp() - 60) == START.timestamp() + 1800


def test_backoff_doubles_within_jitter_and_is_capped() -> None:
    a = agent(retry_initial=1.0, retry_max=30.0)
    for failures, step in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (40, 30.0)]:
        delays = [a.retry_delay(failures) for _ in range(50)]
        assert all(step / 2 <= d <= step for d in delays), (failures, delays)


@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (Denied("CA_REFUSED", "403: PROVIDER_DENIED: x"), EXIT_REFUSED, "refused by the CA: 403"),
        (Unavailable("CA_UNREACHABLE", "down"), EXIT_UNAVAILABLE, "CA unavailable"),
        (ConfigError("SIA_TOKEN_UNREADABLE", "/t: gone"), EXIT_USAGE, "SIA_TOKEN_UNREADABLE"),
    ],
)
def test_outcome_maps_failures_to_exit_codes(
    exc: Denied | Unavailable | ConfigError, code: int, text: str
) -> None:
    got_code, message = outcome(exc)
    assert got_code == code
    assert text in message


async def test_agent_once_reports_bad_flags_and_a_missing_token(tmp_path: Path) -> None:
    code, message = await agent_once(["--key-type", "DSA", "--ca-url", "https://x"], {})
    assert code == EXIT_USAGE
    assert "key-type" in message
    code, message = await agent_once([], {})
    assert code == EXIT_USAGE
    assert "--ca-url" in message
    code, message = await agent_once(
        ["--ca-url", "https://127.0.0.1:9", "--token-file", str(tmp_path / "none")], {}
    )
    assert (code, message.split(":")[0]) == (EXIT_USAGE, "SIA_TOKEN_UNREADABLE")
