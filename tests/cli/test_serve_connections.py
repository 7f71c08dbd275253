"""What a connection may hold in a serving worker: idle and slow-head connections are
closed after --idle-timeout, connections over --max-connections are closed at once, and
legitimate requests are served throughout (real server, raw sockets on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from identityd.cli.connections import (
    RESERVED_DESCRIPTORS,
    CountingListener,
    ThrottledLoopErrors,
    connection_cap,
)
from identityd.cli.serve import serve_sockets
from identityd.devca.workload import DevCluster
from identityd.settings import LimitSettings
from tests.conftest import Pods, make_settings

IDLE = 0.6


@pytest.fixture
async def server(cluster: DevCluster, pods: Pods, tmp_path: Path) -> AsyncIterator[int]:
    # `pods` first: the inventory file is written with them.
    settings = make_settings(cluster, tmp_path)
    limits = replace(LimitSettings(), max_connections=4, idle_timeout_seconds=IDLE)
    settings = replace(settings, limits=limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    stop = asyncio.Event()
    task = asyncio.create_task(serve_sockets(settings, sock, None, stop))
    port = sock.getsockname()[1]
    for _ in range(200):
        with contextlib.suppress(aiohttp.ClientError):
            async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{port}/healthz"
            ) as resp:
                if resp.status == 200:
                    break
        await asyncio.sleep(0.05)
    try:
        yield port
    finally:
        stop.set()
        await task
        sock.close()


async def closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes the connection (EOF or reset), at most ``limit``."""
    started = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        while await asyncio.wait_for(reader.read(4096), limit):
            pass
    return time.monotonic() - started


async def legit(port: int, cluster: DevCluster, pods: Pods) -> int:
    async with aiohttp.ClientSession() as http, http.post(
        f"http://127.0.0.1:{port}/instance", json=cluster.confirmation(pods.api)
    ) as resp:
        return resp.status


async def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout(
    server: int, cluster: DevCluster, pods: Pods
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    waited = await closed_after(reader, 10 * IDLE)
    assert IDLE * 0.8 <= waited < 5 * IDLE
    writer.close()
    assert await legit(server, cluster, pods) == 200


async def test_a_head_sent_a_byte_at_a_time_is_closed_after_the_idle_timeout(
    server: int, cluster: DevCluster, pods: Pods
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    head = b"POST /instance HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200

    async def trickle() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.sleep(IDLE / 6)

    sender = asyncio.create_task(trickle())
    waited = await closed_after(reader, 10 * IDLE)
    sender.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
        await sender
    assert waited < 5 * IDLE  # the trickle alone would have lasted 33 idle timeouts
    writer.close()
    assert await legit(server, cluster, pods) == 200


async def test_connections_over_the_cap_are_closed_at_once_and_service_resumes(
    server: int, cluster: DevCluster, pods: Pods
) -> None:
    held = [await asyncio.open_connection("127.0.0.1", server) for _ in range(4)]
    await asyncio.sleep(0.05)  # all four accepted
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    assert await closed_after(reader, 2.0) < IDLE / 2  # over the cap: closed at once
    writer.close()
    for _, w in held:
        w.close()
    await asyncio.sleep(0.05)
    assert await legit(server, cluster, pods) == 200


async def test_a_burst_of_connections_is_shared_by_the_workers_on_one_socket() -> None:
    # Two listeners on one socket, as two forked workers hold it. A CA opens its
    # keep-alive pool in a burst; asyncio alone lets the first listener take all of it.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    taken = {"a": 0, "b": 0}

    def counting(name: str) -> type[asyncio.Protocol]:
        class Count(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                taken[name] += 1

        return Count

    clients = []
    for _ in range(20):  # queued in the backlog before either listener is served
        client = socket.create_connection(sock.getsockname())
        clients.append(client)
    servers = [
        await loop.create_server(counting(name), sock=CountingListener(sock, limit=100))
        for name in taken
    ]
    for _ in range(200):
        if sum(taken.values()) == 20:
            break
        await asyncio.sleep(0.01)
    for server in servers:
        server.close()
    for client in clients:
        client.close()
    sock.close()
    assert sum(taken.values()) == 20
    assert abs(taken["a"] - taken["b"]) <= 2, taken


def test_a_listener_hands_over_one_connection_per_round() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        clients = [socket.create_connection(sock.getsockname()) for _ in range(2)]
        listener = CountingListener(sock, limit=8)
        first, _ = listener.accept()
        with pytest.raises(BlockingIOError):  # asyncio ends its round of accepts here
            listener.accept()
        second, _ = listener.accept()  # the next round takes the next one
        for conn in (first, second, *clients, listener):
            conn.close()


def test_the_cap_stays_below_the_open_file_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_cap(10) == 10
    if soft != resource.RLIM_INFINITY:
        assert connection_cap(10**9) == soft - RESERVED_DESCRIPTORS


def test_a_repeated_loop_error_is_logged_once_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.new_event_loop()
    try:
        handler = ThrottledLoopErrors(interval=60)
        context = {"message": "socket.accept() out of system resource", "exception": OSError(24)}
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for _ in range(500):
                handler(loop, context)
            handler(loop, {"message": "another error"})
        messages = [r.getMessage() for r in caplog.records]
        assert messages == ["socket.accept() out of system resource", "another error"]
        handler._last[next(iter(handler._last))] = (float("-inf"), 499)  # the interval passed
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            handler(loop, context)
        assert "(499 more like it in the last 60s)" in caplog.records[-1].getMessage()
    finally:
        loop.close()
