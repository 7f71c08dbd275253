"""`identityd serve`: a supervisor holding the listening sockets and N worker processes.

The supervisor binds once (so a port clash is one clear error), forks the
workers, which all accept on the inherited sockets, and restarts any worker that
dies — the embedded Rego engine is native code and can take its process down —
with backoff, while the others keep serving. With ``--workers 1`` the server
runs in the supervisor's own process. Each worker runs a watchdog
(identityd/cli/watchdog.py) that ends it when its event loop stalls, as a
runaway in-line policy evaluation would make it. The workers share, in memory
the supervisor maps before forking, how many connections each holds, so a new
connection goes to one with fewer (identityd/cli/connections.py, AcceptShare).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_sentinels
from multiprocessing.process import BaseProcess

from aiohttp import web

from identityd.app import build_edges, create_app, server_ssl_context
from identityd.cli.connections import (
    NOT_SERVING,
    PROBE_MAX_CONNECTIONS,
    AcceptShare,
    CappedSockSite,
    ThrottledLoopErrors,
    connection_cap,
    raise_open_file_limit,
    runner_options,
)
from identityd.cli.tls_reload import TLSFiles
from identityd.cli.watchdog import LoopWatchdog, stall_limit
from identityd.errors import IdentitydError
from identityd.metrics import Metrics, enable_multiprocess
from identityd.settings import Settings, host_port

log = logging.getLogger("identityd.serve")

# A worker that dies sooner than this after starting is crash-looping: back off.
MIN_HEALTHY_SECONDS = 5.0
MAX_RESTART_DELAY_SECONDS = 10.0
STOP_GRACE_SECONDS = 10.0
EXIT_CONFIG = 78  # EX_CONFIG: a worker could not start with this configuration


def bind(address: str) -> socket.socket:
    host, port = host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve_sockets(
    settings: Settings,
    sock: socket.socket,
    metrics_sock: socket.socket | None,
    stop: asyncio.Event,
    serving: asyncio.Event | None = None,
    share: AcceptShare | None = None,
) -> None:
    """Run one server on already-bound sockets until ``stop`` is set; ``serving`` is
    set once it accepts connections; ``share``: the callback connections of the
    workers on ``sock``, to take this worker's share of them."""
    metrics = Metrics()
    edges = await build_edges(settings, metrics)
    runners: list[web.AppRunner] = []
    asyncio.get_running_loop().set_exception_handler(ThrottledLoopErrors())
    limits = settings.limits
    try:
        app = create_app(settings, edges, metrics=metrics)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            **runner_options(limits.idle_timeout_seconds),
        )
        await runner.setup()
        runners.append(runner)
        ssl_context = server_ssl_context(settings)
        tls_files = TLSFiles(settings.tls, ssl_context) if ssl_context is not None else None
        await CappedSockSite(
            runner,
            sock,
            limit=connection_cap(limits.max_connections),
            share=share,
            ssl_context=ssl_context,
            tls=tls_files.context if tls_files is not None else None,
            stall_timeout=limits.idle_timeout_seconds,
        ).start()
        if metrics_sock is not None:
            probes = create_app(settings, edges, metrics=metrics, callback=False)
            probe_runner = web.AppRunner(
                probes,
                access_log=None,
                handle_signals=False,
                **runner_options(limits.idle_timeout_seconds),
            )
            await probe_runner.setup()
            runners.append(probe_runner)
            await CappedSockSite(
                probe_runner,
                metrics_sock,
                limit=PROBE_MAX_CONNECTIONS,
                stall_timeout=limits.idle_timeout_seconds,
            ).start()
        # What start-up built (modules, the Kubernetes client, policies, the first
        # inventory) lives as long as the worker: out of the collector's sight, a
        # full collection took 0.9 ms instead of 52 ms (a p99 spike, bench/load.py).
        gc.freeze()
        log.info("worker %d serving on %s", os.getpid(), settings.listen)
        if serving is not None:
            serving.set()
        await stop.wait()
    finally:
        for r in reversed(runners):
            await r.cleanup()
        await edges.aclose()


def _worker_main(
    settings: Settings,
    sock: socket.socket,
    metrics_sock: socket.socket | None,
    share: AcceptShare | None = None,
) -> None:
    configure_logging(settings.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Here, not in serve_sockets: the demo and tests serve in their own process,
        # which a stalled loop must not end. Armed once serving: what it is for is a
        # runaway evaluation, and start-up (loading the engine, compiling a large
        # policy set on a busy node) may hold the loop longer than a decision may.
        serving = asyncio.Event()
        server = asyncio.create_task(
            serve_sockets(settings, sock, metrics_sock, stop, serving, share)
        )
        started = asyncio.create_task(serving.wait())
        await asyncio.wait({server, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if server.done():
            await server  # start-up failed: its error
            return
        async with LoopWatchdog(stall_limit(settings.decision_timeout_seconds)):
            await server

    try:
        asyncio.run(main())
    except IdentitydError as exc:
        log.error("worker %d cannot start: %s", os.getpid(), exc)
        sys.exit(EXIT_CONFIG)


@dataclass
class Slot:
    index: int
    process: BaseProcess | None = None
    started: float = 0.0
    delay: float = 0.0
    restarts: int = 0
    not_before: float = field(default=0.0)


class Supervisor:
    def __init__(
        self, settings: Settings, sock: socket.socket, metrics_sock: socket.socket | None
    ) -> None:
        self._settings = settings
        self._sock = sock
        self._metrics_sock = metrics_sock
        self._ctx = multiprocessing.get_context("fork")
        self._slots = [Slot(i) for i in range(settings.workers)]
        # Each worker's open callback connections; a worker writes its own slot.
        self._held = self._ctx.RawArray("i", [NOT_SERVING] * settings.workers)
        self._stopping = False

    def _start(self, slot: Slot) -> None:
        self._held[slot.index] = NOT_SERVING  # until the new worker serves
        proc = self._ctx.Process(
            target=_worker_main,
            args=(
                self._settings,
                self._sock,
                self._metrics_sock,
                AcceptShare(self._held, slot.index),
            ),
            name=f"identityd-worker-{slot.index}",
            daemon=False,
        )
        proc.start()
        slot.process, slot.started = proc, time.monotonic()
        log.info("started worker %d (pid %s)", slot.index, proc.pid)

    def _reap(self, slot: Slot) -> None:
        proc = slot.process
        if proc is None or proc.is_alive():
            return
        lived = time.monotonic() - slot.started
        log.warning(
            "worker %d (pid %s) exited with %s after %.1fs",
            slot.index,
            proc.pid,
            proc.exitcode,
            lived,
        )
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and proc.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
        slot.process = None
        self._held[slot.index] = NOT_SERVING  # its count died with it
        slot.restarts += 1
        # Crash loop: back off exponentially with jitter; a healthy run resets it.
        slot.delay = (
            0.0
            if lived >= MIN_HEALTHY_SECONDS
            else min(MAX_RESTART_DELAY_SECONDS, max(0.1, slot.delay * 2))
        )
        slot.not_before = time.monotonic() + slot.delay * random.uniform(0.8, 1.2)  # noqa: S311

    def stop(self, *_: object) -> None:
        self._stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for slot in self._slots:
            self._start(slot)
        while not self._stopping:
            sentinels = [s.process.sentinel for s in self._slots if s.process is not None]
            wait_sentinels(sentinels, timeout=0.2)
            now = time.monotonic()
            for slot in self._slots:
                self._reap(slot)
                if slot.process is None and now >= slot.not_before and not self._stopping:
                    self._start(slot)
        return self._shutdown()

    def _shutdown(self) -> int:
        procs = [s.process for s in self._slots if s.process is not None]
        for proc in procs:
            proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        log.info("supervisor stopped")
        return 0


async def _preflight(settings: Settings) -> None:
    """Build and close every edge once, so a bad configuration fails before any fork."""
    edges = await build_edges(settings, start=False)
    await edges.aclose()
    server_ssl_context(settings)


def serve(settings: Settings) -> int:
    configure_logging(settings.log_level)
    asyncio.run(_preflight(settings))
    # Before the workers fork: they inherit it, and each caps its connections below it.
    raise_open_file_limit()
    sock = bind(settings.listen)
    metrics_sock = bind(settings.metrics_listen) if settings.metrics_listen else None
    if settings.workers == 1:
        _worker_main(settings, sock, metrics_sock)
        return 0
    enable_multiprocess(
        os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="identityd-metrics-")
    )
    return Supervisor(settings, sock, metrics_sock).run()


class _NoRequestDump(logging.Filter):
    """aiohttp logs a request it cannot parse with the raw bytes in the exception,
    which can hold a bearer token or a CSR: keep the exception's type only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()} ({type(record.exc_info[1]).__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def configure_logging(level: str, stream_names: Sequence[str] = ("identityd.decision",)) -> None:
    """Human logs to stderr; decision records as bare JSON lines to stdout."""
    root = logging.getLogger()
    if getattr(root, "_identityd_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.access"):
        logging.getLogger(name).addFilter(_NoRequestDump())
    for name in stream_names:
        decision = logging.getLogger(name)
        out = logging.StreamHandler(sys.stdout)
        out.setFormatter(logging.Formatter("%(message)s"))
        decision.addHandler(out)
        # Decision records are the audit trail: emitted whatever --log-level says.
        decision.setLevel(logging.INFO)
        decision.propagate = False
    root._identityd_configured = True  # type: ignore[attr-defined]
