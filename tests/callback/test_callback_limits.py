"""Per-client rate limits and the concurrency gate: the pure parts with a fake clock,
then identityd over real HTTP (and mTLS) with the limits middleware in front."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from identityd.app import build_edges, create_app, server_ssl_context
from identityd.callback.limits import (
    ClientRates,
    ConcurrencyGate,
    Limiter,
    LimitSettings,
    Overloaded,
    RateLimited,
    client_key,
    limits_middleware,
)
from identityd.devca.workload import DevCluster
from identityd.keys.certs import CertificateAuthority
from identityd.settings import TLSSettings
from tests.conftest import Pods, make_settings
from tests.doubles.waiting import eventually


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- token buckets ---------------------------------------------------------------


def test_a_client_gets_its_burst_then_its_rate() -> None:
    clock = FakeClock()
    rates = ClientRates(2.0, 3, 100, clock=clock)
    assert [rates.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rates.take("a") == pytest.approx(0.5)
    with pytest.raises(RateLimited) as caught:
        rates.check("a")
    assert caught.value.status == 429 and caught.value.code == "RATE_LIMITED"
    clock.now += 0.5
    assert rates.take("a") == 0.0
    assert rates.take("a") > 0
    clock.now += 100  # refills up to the burst, no further
    assert [rates.take("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert rates.take("a") > 0


def test_clients_have_separate_buckets() -> None:
    rates = ClientRates(1.0, 1, 100, clock=FakeClock())
    assert rates.take("noisy") == 0.0
    assert rates.take("noisy") > 0
    assert rates.take("quiet") == 0.0


def test_tracked_clients_are_bounded_least_recent_first() -> None:
    rates = ClientRates(1.0, 1, 3, clock=FakeClock())
    for key in ("a", "b", "c"):
        rates.take(key)
    rates.take("a")  # "a" is now the most recent; "b" the least
    rates.take("d")
    assert len(rates) == 3
    assert rates.take("c") > 0 and rates.take("a") > 0  # still tracked, still empty
    assert rates.take("b") == 0.0  # forgotten, so a fresh bucket


def test_a_clock_stepping_back_does_not_drain_or_refill() -> None:
    clock = FakeClock()
    rates = ClientRates(1.0, 2, 10, clock=clock)
    rates.take("a")
    clock.now -= 50
    assert rates.take("a") == 0.0
    assert rates.take("a") > 0


def test_rate_zero_switches_per_client_limits_off() -> None:
    rates = ClientRates(0.0, 0, 10, clock=FakeClock())
    assert all(rates.take("a") == 0.0 for _ in range(10_000))
    assert len(rates) == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"rate_per_second": -1.0},
        {"burst": 0},
        {"max_clients": 0},
        {"max_in_flight": 0},
        {"max_queued": -1},
        {"queue_timeout_seconds": 0.0},
    ],
)
def test_settings_are_validated_naming_the_field(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(overrides))):
        LimitSettings(**overrides)


def test_client_key_prefers_the_certificate_cn_over_the_address() -> None:
    cert = {"subject": ((("organizationName", "athenz"),), (("commonName", "zts-1"),))}
    assert client_key(("10.0.0.1", 443), cert) == "cn:zts-1"
    assert client_key(("10.0.0.1", 443), None) == "ip:10.0.0.1"
    assert client_key(("::1", 443, 0, 0), {}) == "ip:::1"
    assert client_key(None, None) == "unknown"


# --- the gate --------------------------------------------------------------------------


async def test_gate_bounds_in_flight_and_serves_in_arrival_order() -> None:
    gate = ConcurrencyGate(max_in_flight=2, max_queued=10, timeout=5.0)
    running = 0
    peak = 0
    order: list[int] = []

    async def work(n: int) -> None:
        nonlocal running, peak
        async with gate.slot():
            order.append(n)
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    tasks = []
    for n in range(8):
        tasks.append(asyncio.create_task(work(n)))
        await asyncio.sleep(0)  # arrive in order
    await asyncio.gather(*tasks)
    assert peak == 2 and order == list(range(8))
    assert (gate.free, gate.queued) == (2, 0)


async def test_full_queue_is_refused_at_once() -> None:
    gate = ConcurrencyGate(max_in_flight=1, max_queued=1, timeout=5.0)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    assert gate.queued == 1
    started = time.monotonic()
    with pytest.raises(Overloaded) as caught:
        await gate.acquire()
    assert time.monotonic() - started < 0.1
    assert caught.value.status == 503 and caught.value.code == "OVERLOADED"
    gate.release()
    await waiter
    gate.release()
    assert (gate.free, gate.queued) == (1, 0)


async def test_a_wait_longer_than_the_timeout_is_refused() -> None:
    gate = ConcurrencyGate(max_in_flight=1, max_queued=5, timeout=0.05)
    await gate.acquire()
    started = time.monotonic()
    with pytest.raises(Overloaded):
        await gate.acquire()
    assert 0.04 < time.monotonic() - started < 1.0
    assert gate.queued == 0
    gate.release()
    assert gate.free == 1


async def test_cancelled_waiters_leak_no_slot() -> None:
    gate = ConcurrencyGate(max_in_flight=1, max_queued=5, timeout=5.0)
    await gate.acquire()
    waiters = [asyncio.create_task(gate.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    gate.release()  # handed to waiters[1] (waiters[0] is gone)
    waiters[1].cancel()  # granted, then cancelled before it ran: passes the slot on
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[1], asyncio.CancelledError)
    assert results[2] is None  # the slot reached the last waiter
    gate.release()
    assert (gate.free, gate.queued) == (1, 0)


# --- over real HTTP ----------------------------------------------------------------------


@dataclass
class Limited:
    url: str
    limiter: Limiter
    ssl: ssl.SSLContext | None = None


@asynccontextmanager
async def limited_service(
    cluster: DevCluster, tmp_path: Path, limits: LimitSettings, **overrides: Any
) -> AsyncIterator[Limited]:
    """identityd as create_app builds it, with the limits middleware inside the error one."""
    settings = make_settings(cluster, tmp_path, **overrides)
    edges = await build_edges(settings)
    app = create_app(settings, edges)
    limiter = Limiter(limits)
    app.middlewares.append(limits_middleware(limiter))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    context = server_ssl_context(settings)
    await web.SockSite(runner, sock, ssl_context=context).start()
    scheme = "https" if context else "http"
    try:
        yield Limited(f"{scheme}://127.0.0.1:{sock.getsockname()[1]}", limiter)
    finally:
        await runner.cleanup()
        await edges.aclose()


def client_from(address: str, ctx: ssl.SSLContext | None = None) -> aiohttp.ClientSession:
    """A client whose connections come from ``address`` (any 127.x.y.z is loopback)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0), force_close=True, ssl=ctx or False)
    return aiohttp.ClientSession(connector=connector)


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, str]:
    async with http.post(f"{url}/instance", json=body) as resp:
        answer = await resp.json()
        return resp.status, answer.get("message", "")


async def test_a_noisy_client_is_limited_while_another_is_answered(
    cluster: DevCluster, pods: Pods, tmp_path: Path
) -> None:
    limits = LimitSettings(rate_per_second=0.5, burst=3)
    async with (
        limited_service(cluster, tmp_path, limits) as svc,
        client_from("127.0.0.2") as noisy,
        client_from("127.0.0.3") as quiet,
    ):
        body = cluster.confirmation(pods.api)
        noisy_answers = [await post(noisy, svc.url, body) for _ in range(10)]
        assert [s for s, _ in noisy_answers] == [200] * 3 + [429] * 7
        assert all(m.startswith("RATE_LIMITED") for _, m in noisy_answers[3:])
        quiet_answers = [await post(quiet, svc.url, body) for _ in range(3)]
        assert [s for s, _ in quiet_answers] == [200] * 3
        async with noisy.get(f"{svc.url}/readyz") as resp:  # probes are never limited
            assert resp.status == 200
        assert svc.limiter.counters.refused == {"RATE_LIMITED": 7}


async def test_with_mtls_the_client_is_its_certificate_cn(
    cluster: DevCluster, pods: Pods, tmp_path: Path
) -> None:
    server_ca, client_ca = CertificateAuthority("server CA"), CertificateAuthority("client CA")
    issued = server_ca.issue("sys.auth.k8s", ips=["127.0.0.1"], usage="server")
    files = {
        "ca": server_ca.cert_pem,
        "crt": issued.cert_pem,
        "key": issued.key_pem,
        "client-ca": client_ca.cert_pem,
    }
    for name, data in files.items():
        (tmp_path / f"{name}.pem").write_bytes(data)
    tls = TLSSettings(
        cert=str(tmp_path / "crt.pem"),
        key=str(tmp_path / "key.pem"),
        client_ca=str(tmp_path / "client-ca.pem"),
    )

    def context(cn: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        client = client_ca.issue(cn, usage="client")
        (tmp_path / f"{cn}.crt").write_bytes(client.cert_pem)
        (tmp_path / f"{cn}.key").write_bytes(client.key_pem)
        ctx.load_cert_chain(str(tmp_path / f"{cn}.crt"), str(tmp_path / f"{cn}.key"))
        return ctx

    limits = LimitSettings(rate_per_second=0.5, burst=2)
    async with (
        limited_service(cluster, tmp_path, limits, tls=tls) as svc,
        client_from("127.0.0.1", context("zts-noisy")) as noisy,
        client_from("127.0.0.1", context("zts-quiet")) as quiet,
    ):
        body = cluster.confirmation(pods.api)
        assert [(await post(noisy, svc.url, body))[0] for _ in range(4)] == [200, 200, 429, 429]
        assert [(await post(quiet, svc.url, body))[0] for _ in range(2)] == [200, 200]
        assert set(svc.limiter.rates._buckets) == {"cn:zts-noisy", "cn:zts-quiet"}


@asynccontextmanager
async def slow_request(url: str, body: bytes) -> AsyncIterator[asyncio.StreamWriter]:
    """A request whose headers and first byte are sent; the rest when the block ends."""
    port = int(url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /instance HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body[:1])
    await writer.drain()
    try:
        yield writer
    finally:
        writer.write(body[1:])
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 200"), status_line


async def test_when_the_queue_is_full_the_answer_is_503_overloaded(
    cluster: DevCluster, pods: Pods, tmp_path: Path
) -> None:
    limits = LimitSettings(
        rate_per_second=0, max_in_flight=1, max_queued=1, queue_timeout_seconds=5.0
    )
    async with (
        limited_service(cluster, tmp_path, limits) as svc,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
    ):
        body = cluster.confirmation(pods.api)
        gate = svc.limiter.gate
        async with slow_request(svc.url, json.dumps(body).encode()):
            await eventually(lambda: gate.free == 0)  # the slow client holds the only slot
            queued = asyncio.create_task(post(http, svc.url, body))
            await eventually(lambda: gate.queued == 1)
            started = time.monotonic()
            status, message = await post(http, svc.url, body)
            assert (status, message) == (503, "OVERLOADED")
            assert time.monotonic() - started < 1.0  # refused at once, not after a wait
        assert await queued == (200, "")  # the queued request is served once the slot frees
        assert svc.limiter.counters.refused == {"OVERLOADED": 1}


async def test_a_request_waiting_past_the_queue_timeout_is_503(
    cluster: DevCluster, pods: Pods, tmp_path: Path
) -> None:
    limits = LimitSettings(
        rate_per_second=0, max_in_flight=1, max_queued=8, queue_timeout_seconds=0.2
    )
    async with (
        limited_service(cluster, tmp_path, limits) as svc,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
    ):
        body = cluster.confirmation(pods.api)
        async with slow_request(svc.url, json.dumps(body).encode()):
            await eventually(lambda: svc.limiter.gate.free == 0)
            started = time.monotonic()
            assert await post(http, svc.url, body) == (503, "OVERLOADED")
            assert 0.15 < time.monotonic() - started < 2.0
        assert await post(http, svc.url, body) == (200, "")


async def test_limits_never_turn_a_deny_into_an_allow(
    cluster: DevCluster, pods: Pods, tmp_path: Path
) -> None:
    denies: dict[str, Any] = {
        "POD_NOT_FOUND": cluster.confirmation(pods.gone),
        "SAN_IP_NOT_ALLOWED": cluster.confirmation(pods.api, san_ip=[pods.other.ip]),
        "TOKEN_UNKNOWN_KID": cluster.confirmation(pods.api, token=DevCluster().token(pods.api)),
        "POD_TERMINATING": cluster.confirmation(pods.terminating),
    }
    allow = cluster.confirmation(pods.api)
    limits = LimitSettings(
        rate_per_second=5, burst=6, max_in_flight=2, max_queued=3, queue_timeout_seconds=0.05
    )
    async with limited_service(cluster, tmp_path, limits) as svc:
        clients = [client_from(f"127.0.0.{n}") for n in (2, 3, 4)]
        try:
            jobs = [
                (code, post(http, svc.url, body))
                for _ in range(6)
                for http in clients
                for code, body in [*denies.items(), ("allow", allow)]
            ]
            answers = await asyncio.gather(*(job for _, job in jobs))
        finally:
            for http in clients:
                await http.close()
    seen: set[int] = set()
    for (expected, _), (status, message) in zip(jobs, answers, strict=True):
        seen.add(status)
        if expected == "allow":
            assert status in (200, 429, 503), (status, message)
        else:
            assert status in (403, 429, 503), (expected, status, message)
            if status == 403:
                assert expected in message.split(", ")
    assert {200, 403} <= seen and seen & {429, 503}, seen  # served, denied and limited
