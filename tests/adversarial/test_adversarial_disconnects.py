"""Clients that go away mid-body, over real HTTP: each is one decision record
``client_closed`` / 499 and nothing else (no traceback, no warning, no error or 500 in
the metrics, no latency observed), and the service keeps allowing legitimate pods."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.adversarial.adversarial_disconnects import Disconnect, disconnect, disconnects
from tests.adversarial.adversarial_world import (
    Wire,
    World,
    send,
    serve_world_as_in_production,
)
from tests.conftest import Service
from tests.doubles.waiting import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

CASES = disconnects()
RECORD_TIMEOUT_SECONDS = 5.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def production_service(
    world: World, tmp_path_factory: pytest.TempPathFactory, short_body_timeout: None
) -> AsyncIterator[Service]:
    async with serve_world_as_in_production(world, tmp_path_factory.mktemp("runner")) as svc:
        yield svc


SERVERS = {
    "body-read-fails": "production_service",  # identityd serve: the handler runs on
    "handler-cancelled": "corpus_service",  # aiohttp's TestServer cancels the handler
}


@pytest.fixture(params=list(SERVERS))
def target(request: pytest.FixtureRequest) -> Service:
    service: Service = request.getfixturevalue(SERVERS[request.param])
    return service


def _port(service: Service) -> int:
    return int(service.url.rsplit(":", 1)[1])


def _sample(service: Service, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


def _records(caplog: pytest.LogCaptureFixture, request_id: str) -> list[dict[str, Any]]:
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "identityd.decision"]
    return [r for r in records if r["request_id"] == request_id]


async def _record_of(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    await eventually(lambda: _records(caplog, request_id), within=RECORD_TIMEOUT_SECONDS)
    await asyncio.sleep(0.05)  # a second record would be a bug: give it time to show
    [record] = _records(caplog, request_id)
    return record


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_client_gone_mid_body_is_one_client_closed_record(
    target: Service, world: World, caplog: pytest.LogCaptureFixture, case: Disconnect
) -> None:
    request_id = f"gone-{CASES.index(case)}"
    counted = {
        result: _sample(target, "identityd_decisions_total", kind="instance", result=result)
        for result in ("client_closed", "error")
    }
    answered = _sample(target, "identityd_decision_seconds_count", kind="instance")
    with caplog.at_level(logging.DEBUG):
        sent_back = await disconnect(_port(target), case.build(world, request_id), case.how)
        record = await _record_of(caplog, request_id)
    assert sent_back == b""  # nobody to answer
    assert (record["decision"], record["status"]) == ("client_closed", 499)
    assert [r.split(":", 1)[0] for r in record["reasons"]] == ["CLIENT_CLOSED"]
    assert record["kind"] == "instance"
    noisy = [
        f"{r.name} {r.levelname} {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING or r.exc_info
    ]
    assert noisy == []
    assert "Traceback" not in caplog.text
    assert (
        _sample(target, "identityd_decisions_total", kind="instance", result="client_closed")
        == counted["client_closed"] + 1
    )
    assert (
        _sample(target, "identityd_decisions_total", kind="instance", result="error")
        == counted["error"]
    )
    assert _sample(target, "identityd_decision_seconds_count", kind="instance") == answered


async def test_the_service_still_allows_after_the_disconnects(
    target: Service, world: World
) -> None:
    for case in CASES:
        await disconnect(_port(target), case.build(world, "again"), case.how)
    answer = await send(target.http, target.url, Wire(body=world.confirmation()))
    assert answer.status == 200, answer.json_body
