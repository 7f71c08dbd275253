"""The OPA REST double speaks OPA's documented wire format (docs/rest-api): bodies and
status codes a client depends on, over real HTTP, plus its test controls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.doubles.opa_server import OPADouble

HEADER = "package identityd\n\nimport rego.v1\n\n"
DECIDE = HEADER + 'decision := {"allow": input.ok == true, "reasons": [], "attributes": {}}\n'
# Unclosed brace: the last line is line 6 of the module.
BROKEN = HEADER + 'decision := {\n  "allow": true,\n'


@pytest.fixture
async def opa() -> AsyncIterator[OPADouble]:
    async with OPADouble() as opa:
        yield opa


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any]:
    async with http.request(method, url, **kwargs) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def put(http: aiohttp.ClientSession, opa: OPADouble, pid: str, raw: str) -> tuple[int, Any]:
    return await call(http, "PUT", f"{opa.url}/v1/policies/{pid}", data=raw.encode(),
                      headers={"Content-Type": "text/plain"})


async def test_health(opa: OPADouble, http: aiohttp.ClientSession) -> None:
    assert await call(http, "GET", f"{opa.url}/health") == (200, {})


async def test_put_then_get_and_list(opa: OPADouble, http: aiohttp.ClientSession) -> None:
    assert await put(http, opa, "identityd/p.rego", DECIDE) == (200, {})
    status, body = await call(http, "GET", f"{opa.url}/v1/policies/identityd/p.rego")
    assert status == 200
    assert body["result"]["id"] == "identityd/p.rego"
    assert body["result"]["raw"] == DECIDE
    assert body["result"]["ast"]["package"]["path"][1] == {"type": "string", "value": "identityd"}
    status, body = await call(http, "GET", f"{opa.url}/v1/policies")
    assert status == 200
    assert [(p["id"], p["raw"]) for p in body["result"]] == [("identityd/p.rego", DECIDE)]


async def test_get_missing_policy_is_404_with_opa_body(
    opa: OPADouble, http: aiohttp.ClientSession
) -> None:
    assert await call(http, "GET", f"{opa.url}/v1/policies/x") == (
        404, {"code": "resource_not_found", "message": 'storage_not_found_error: policy id "x"'}
    )
    status, body = await call(http, "DELETE", f"{opa.url}/v1/policies/x")
    assert (status, body["code"]) == (404, "resource_not_found")


async def test_compile_error_is_400_with_located_errors_and_keeps_old_set(
    opa: OPADouble, http: aiohttp.ClientSession
) -> None:
    await put(http, opa, "p", DECIDE)
    status, body = await put(http, opa, "p", BROKEN)
    assert status == 400
    assert body["code"] == "invalid_parameter"
    assert body["message"] == "error(s) occurred while compiling module(s)"
    first = body["errors"][0]
    assert first["code"] == "rego_parse_error"
    assert first["message"]
    assert first["location"]["file"] == "p"
    assert 5 <= first["location"]["row"] <= 7
    assert first["location"]["col"] >= 1
    assert opa.policies == {"p": DECIDE}
    assert (await call(http, "POST", f"{opa.url}/v1/data/identityd/decision",
                       json={"input": {"ok": True}}))[1]["result"]["allow"] is True


async def test_with_is_refused(opa: OPADouble, http: aiohttp.ClientSession) -> None:
    raw = HEADER + "a := 1\nb := a with input as {}\n"
    status, body = await put(http, opa, "w", raw)
    assert status == 400
    assert body["errors"][0]["location"] == {"file": "w", "row": 6, "col": 1}


async def test_delete(opa: OPADouble, http: aiohttp.ClientSession) -> None:
    await put(http, opa, "p", DECIDE)
    assert await call(http, "DELETE", f"{opa.url}/v1/policies/p") == (200, {})
    assert opa.policies == {}
    assert await call(http, "POST", f"{opa.url}/v1/data/identityd/decision",
                      json={"input": {}}) == (200, {})


async def test_data_result_and_undefined(opa: OPADouble, http: aiohttp.ClientSession) -> None:
    await put(http, opa, "p", DECIDE + 'only_if := 1 if input.ok == true\nflag := false\n')
    url = f"{opa.url}/v1/data/identityd"
    assert await call(http, "POST", f"{url}/decision", json={"input": {"ok": True}}) == (
        200, {"result": {"allow": True, "reasons": [], "attributes": {}}})
    # Undefined: 200 with no `result` key at all.
    assert await call(http, "POST", f"{url}/only_if", json={"input": {"ok": False}}) == (200, {})
    assert await call(http, "POST", f"{url}/nothing_here", json={"input": {}}) == (200, {})
    # A rule whose value is false is defined (regopy alone would call it undefined).
    assert await call(http, "POST", f"{url}/flag", json={"input": {}}) == (200, {"result": False})


async def test_data_without_input_sees_input_undefined(
    opa: OPADouble, http: aiohttp.ClientSession
) -> None:
    await put(http, opa, "p", HEADER + "has_input := true if input\n")
    url = f"{opa.url}/v1/data/identityd/has_input"
    assert (await call(http, "POST", url, json={"input": {"x": 1}}))[1] == {"result": True}
    assert (await call(http, "POST", url, json={}))[1] == {}
    assert (await call(http, "GET", url))[1] == {}


async def test_malformed_input_body_is_400(opa: OPADouble, http: aiohttp.ClientSession) -> None:
    status, body = await call(http, "POST", f"{opa.url}/v1/data/identityd/decision",
                              data=b"{nope", headers={"Content-Type": "application/json"})
    assert (status, body["code"]) == (400, "invalid_parameter")


# OPA's timers for POST /v1/data (docs/rest-api, "Performance Metrics"), in ns.
TIMERS = {"timer_rego_input_parse_ns", "timer_rego_query_eval_ns", "timer_server_handler_ns"}


async def test_metrics_are_opas_timers_beside_the_result(
    opa: OPADouble, http: aiohttp.ClientSession
) -> None:
    await put(http, opa, "p", DECIDE)
    url = f"{opa.url}/v1/data/identityd/decision?metrics=true"
    _, first = await call(http, "POST", url, json={"input": {"ok": True}})
    _, second = await call(http, "POST", url, json={"input": {"ok": True}})
    assert first["result"] == second["result"] == {"allow": True, "reasons": [], "attributes": {}}
    # As OPA: the query is compiled for the path once, then comes from the cache.
    assert set(first["metrics"]) == TIMERS | {"timer_rego_query_compile_ns",
                                              "counter_server_query_cache_hit"}
    assert set(second["metrics"]) == TIMERS | {"counter_server_query_cache_hit"}
    assert (first["metrics"]["counter_server_query_cache_hit"],
            second["metrics"]["counter_server_query_cache_hit"]) == (0, 1)
    for metrics in (first["metrics"], second["metrics"]):
        assert all(type(value) is int for value in metrics.values())
        inside = (metrics["timer_rego_input_parse_ns"] + metrics["timer_rego_query_eval_ns"]
                  + metrics.get("timer_rego_query_compile_ns", 0))
        assert metrics["timer_server_handler_ns"] >= inside
        assert metrics["timer_rego_input_parse_ns"] > 0
        assert metrics["timer_rego_query_eval_ns"] > 0
    assert [r.query for r in opa.data_requests()] == [{"metrics": "true"}] * 2
    # Undefined: the metrics alone. An error: OPA's error body, without metrics.
    _, undefined = await call(http, "POST", f"{opa.url}/v1/data/identityd/nothing?metrics=true",
                              json={"input": {}})
    assert set(undefined) == {"metrics"}
    status, error = await call(http, "POST", url, data=b"{nope",
                               headers={"Content-Type": "application/json"})
    assert (status, set(error)) == (400, {"code", "message"})


async def test_handler_timer_runs_from_the_requests_own_receipt(
    opa: OPADouble, http: aiohttp.ClientSession
) -> None:
    await put(http, opa, "p", DECIDE)
    url = f"{opa.url}/v1/data/identityd/decision?metrics=true"

    async def timed(document: dict[str, Any]) -> tuple[int, int]:
        started = time.perf_counter_ns()
        _, body = await call(http, "POST", url, json=document)
        return body["metrics"]["timer_server_handler_ns"], time.perf_counter_ns() - started

    # A slow server is slow inside its handler: the delay is counted...
    opa.set_delay(0.05)
    handler, waited = await timed({"input": {"ok": True}})
    assert 50_000_000 <= handler <= waited
    opa.set_delay(0)
    # ...but not what came before the request on the same keep-alive connection: the
    # late segments of a big body, then a pause.
    await timed({"input": {"ok": True}, "pad": "x" * 900_000})  # under aiohttp's 1 MiB warning
    await asyncio.sleep(0.2)
    handler, waited = await timed({"input": {"ok": True}})
    assert 0 < handler <= waited < 200_000_000


async def test_fail_next_and_record(opa: OPADouble, http: aiohttp.ClientSession) -> None:
    opa.fail_next(1, 503, path="/v1/data")
    url = f"{opa.url}/v1/data/identityd/decision"
    status, body = await call(http, "POST", url, json={"input": {}})
    assert (status, body["code"]) == (503, "internal_error")
    assert (await call(http, "POST", url, json={"input": {}}))[0] == 200
    assert [(r.method, r.path, r.status) for r in opa.requests] == [
        ("POST", "/v1/data/identityd/decision", 503), ("POST", "/v1/data/identityd/decision", 200)
    ]


async def test_delay(opa: OPADouble, http: aiohttp.ClientSession) -> None:
    opa.set_delay(0.3)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await call(http, "GET", f"{opa.url}/health")


async def test_refuse_accept_and_restart_empty(opa: OPADouble, http: aiohttp.ClientSession) -> None:
    await put(http, opa, "p", DECIDE)
    port = opa.port
    await opa.refuse()
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(http, "GET", f"{opa.url}/health")
    await opa.accept()
    assert opa.port == port
    assert await call(http, "GET", f"{opa.url}/health") == (200, {})
    assert opa.policies == {"p": DECIDE}  # refusing is not restarting
    await opa.restart_empty()
    status, body = await call(http, "GET", f"{opa.url}/v1/policies")
    assert (status, body) == (200, {"result": []})
