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
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from identityd.cli.connections import (
    DEFER_SECONDS,
    NOT_SERVING,
    RESERVED_DESCRIPTORS,
    SEND_BUFFER_BYTES,
    TAKE_ALL_SECONDS,
    Acceptor,
    AcceptShare,
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


def server_side_send_queues(port: int) -> list[int]:
    """Bytes queued to send on the server's side of each open connection to ``port``
    (this process serves it), from /proc/self/net/tcp."""
    queues = []
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            queues.append(int(fields[4].split(":")[0], 16))
    return queues


def server_side_established(port: int) -> int:
    return len(server_side_send_queues(port))


async def test_a_client_that_never_reads_its_answers_is_cut_off(
    server: int, cluster: DevCluster, pods: Pods
) -> None:
    # aiohttp has no write timeout: pipelined requests whose answers are never read
    # held the connection, and a slot of the cap, for good.
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(("127.0.0.1", server))
    reader.setblocking(False)
    ask = b"GET /metrics HTTP/1.1\r\nHost: identityd\r\n\r\n" * 3000
    with contextlib.suppress(BlockingIOError):
        reader.send(ask)
    try:
        for _ in range(int((10 * IDLE + 5) / 0.1)):
            if not server_side_established(server):
                break  # the stalled one is gone
            await asyncio.sleep(0.1)
        assert server_side_established(server) == 0
    finally:
        reader.close()
    assert await legit(server, cluster, pods) == 200


async def test_a_slow_reader_holds_a_bounded_send_buffer() -> None:
    # Linux grows a send buffer to 4 MiB of the pod's memory for a reader that
    # keeps its window barely open; the cap times that could exceed the pod's limit.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    port = sock.getsockname()[1]

    class Flood(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"x" * (8 * 1024 * 1024))  # answers nobody reads

    acceptor = Acceptor(sock, Flood, limit=8)
    acceptor.start()
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(("127.0.0.1", port))
    reader.setblocking(False)
    try:
        for _ in range(10):  # a byte now and then keeps the window from closing
            await asyncio.sleep(0.05)
            with contextlib.suppress(BlockingIOError):
                reader.recv(1)
        assert 0 < sum(server_side_send_queues(port)) <= 2 * SEND_BUFFER_BYTES
    finally:
        reader.close()
        acceptor.stop()
        sock.close()


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


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_worker_with_no_more_connections_than_its_siblings_takes_a_new_one() -> None:
    counts = [NOT_SERVING, NOT_SERVING, NOT_SERVING]
    share = AcceptShare(counts, 0, clock=Clock())
    assert not share.defer(5)  # alone: no sibling serves
    counts[1], counts[2] = 5, 9
    assert not share.defer(5)  # as few as the fewest
    assert counts[0] == 5  # and says so
    share.leave()
    assert counts[0] == NOT_SERVING


def test_a_worker_ahead_leaves_a_new_connection_to_a_sibling_for_a_moment_only() -> None:
    clock = Clock()
    counts = [6, 5]
    share = AcceptShare(counts, 0, clock=clock)
    assert share.defer(6)
    clock.now += DEFER_SECONDS / 2
    assert share.defer(6)  # the same pending connection, still left to the sibling
    clock.now += DEFER_SECONDS
    assert not share.defer(6)  # the sibling did not take it: take it
    clock.now += TAKE_ALL_SECONDS / 2
    assert not share.defer(7)  # and do not wait for that sibling again for a while
    clock.now += TAKE_ALL_SECONDS
    assert share.defer(8)
    counts[1] = 8  # the sibling took its share meanwhile
    assert not share.defer(8)


def test_a_new_connection_after_a_pause_gets_a_new_wait() -> None:
    clock = Clock()
    share = AcceptShare([3, 1], 0, clock=clock)
    assert share.defer(3)
    share.settled()  # the sibling took that one (nothing pending after the pause)
    clock.now += 10 * DEFER_SECONDS  # another comes later
    assert share.defer(3)


async def test_a_burst_of_connections_is_shared_by_the_workers_on_one_socket() -> None:
    # Two acceptors on one socket sharing counts, as two forked workers hold it.
    # A CA opens its keep-alive pool in a burst; asyncio alone lets the first to
    # wake take all of it.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    taken = {0: 0, 1: 0}
    counts = [NOT_SERVING, NOT_SERVING]

    def counting(index: int) -> Callable[[], asyncio.Protocol]:
        class Count(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                taken[index] += 1

        return Count

    clients = [socket.create_connection(sock.getsockname()) for _ in range(20)]
    acceptors = [
        Acceptor(sock, counting(i), limit=100, share=AcceptShare(counts, i)) for i in taken
    ]
    for acceptor in acceptors:
        acceptor.start()
    for _ in range(200):
        if sum(taken.values()) == 20:
            break
        await asyncio.sleep(0.01)
    for acceptor in acceptors:
        acceptor.stop()
    for client in clients:
        client.close()
    sock.close()
    assert sum(taken.values()) == 20
    assert abs(taken[0] - taken[1]) <= 1, taken
    assert counts == [NOT_SERVING, NOT_SERVING]  # both left


async def test_an_acceptor_stops_without_closing_the_shared_socket() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    acceptor = Acceptor(sock, asyncio.Protocol, limit=8)
    acceptor.start()
    acceptor.stop()
    assert sock.fileno() != -1  # the worker's copy; the other workers' live on
    with socket.create_connection(sock.getsockname()):
        pass
    sock.close()


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
