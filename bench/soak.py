"""Soak test (issue 7, point 5): a steady mixed allow/deny load against `identityd serve`
whose pod inventory is a live watch of an API server that keeps changing.

    python bench/soak.py                              # 10 min at 1,000 decisions/s
    python bench/soak.py --minutes 1 --rate 1000      # a shorter soak
    python bench/soak.py --minutes 0.2 --rate 200     # smoke (~15 s plus start-up)

Three kinds of process besides this one:

- the Kubernetes API-server double (tests/doubles/kube_apiserver.py), spawned by
  ``_double_main`` here (the double has no entry point of its own): it holds the load's
  pods and a set of background pods, and while the load runs it writes a steady stream
  of events that do not touch the load's pods: ``--event-rate`` MODIFIED/s to
  background pods plus one churn pod added and an older one deleted every
  ``--churn-interval`` seconds;
- ``identityd serve`` (``--workers`` = cores, ``--client-rate 0`` so the per-client
  limiter does not throttle the one load client, ``--kubeconfig`` to the double, so
  its inventory is the list+watch; tokens verify against a JWKS file of the dev issuer);
- one or more generators (forked) that build fresh requests in chunks into a bounded
  queue while the load runs: every request carries its own freshly signed bound token
  (and, for ``--csr-fraction`` of them, a fresh key and CSR). No token is reused.

The mix (``--forged-percent``, default 30): legitimate ``/instance`` and ``/refresh``
of random load pods, and forged requests rotating through six kinds, each with the
reason code it must be denied with (``FORGERIES``). Pods deleted through the watch
after identityd synced make the "deleted pod" kind, so a missed DELETED event would
show up as a wrong allow.

The load is open-loop (each request has a scheduled send time; latency counts from
it, so a slow server cannot hide its queueing) over a pool of keep-alive
connections. EVERY response is checked: an error is any status other than 200/403,
a malformed answer, a timeout or a connection failure; a wrong decision is an allow
for a forged request, a deny for a legitimate one, or a deny without the expected
code. The server's memory (RSS, and PSS, of the supervisor and all its descendants,
from /proc) is sampled every 10 s; growth is measured from minute 1 (or a sixth of a
shorter run) to the end. The result goes to ``bench/results/soak-<UTC time>.json``.

Exits 1 when a target is missed: any error, any wrong decision, achieved rate below
``(1 - --rate-tolerance)`` x ``--rate``, RSS growth above ``--max-rss-growth`` (judged
on runs of 2 minutes or more; shorter runs are all warm-up), a restarted worker,
the generator falling behind, the load stopped early (more than ``--timeout`` behind
its schedule, or the server's RSS past ``--max-server-rss-mb``, half the RAM by
default, so a leak cannot take the machine down), or the inventory not applying the
double's events. ``--preload-regopy`` starts the server with regopy imported before
anything else, an experiment for the native leak described in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import multiprocessing.queues
import os
import queue
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from load import breakdown, free_port, scrape  # noqa: E402  (bench/, the script's folder)

from identityd.devca.workload import DevCluster, DevPod  # noqa: E402

CHUNK = 500  # requests per generator chunk
Request = tuple[bytes, int]  # (raw HTTP/1.1 request, index into KINDS)


# -- what is sent and what must come back -----------------------------------------------------


@dataclass(frozen=True)
class Kind:
    name: str
    status: int  # 200 or 403
    code: str | None  # the reason code a deny must carry


LEGIT = (Kind("legit-instance", 200, None), Kind("legit-refresh", 200, None))
FORGERIES = (
    Kind("another-pods-ip", 403, "SAN_IP_NOT_ALLOWED"),
    Kind("foreign-san-dns", 403, "SAN_DNS_NOT_ALLOWED"),
    Kind("wrong-instance-id", 403, "INSTANCE_ID_MISMATCH"),
    Kind("expired-token", 403, "TOKEN_EXPIRED"),
    Kind("deleted-pod", 403, "POD_NOT_FOUND"),
    Kind("another-namespaces-domain", 403, "DOMAIN_MISMATCH"),
)
KINDS = LEGIT + FORGERIES


@dataclass(frozen=True)
class World:
    """The dev cluster (its issuer signs the tokens) and the pods the load uses."""

    cluster: DevCluster
    live: tuple[DevPod, ...]  # in the double for the whole run
    doomed: tuple[DevPod, ...]  # deleted through the watch before the load starts


def build_world(pods: int, deleted: int) -> World:
    cluster = DevCluster()
    live = [
        cluster.add_pod(
            f"ns-{i % 50}",
            f"app-{i}",
            f"sa-{i % 7}",
            f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
            node=f"node-{i % 20}",
        )
        for i in range(pods)
    ]
    doomed = [
        DevPod(f"ns-{i % 50}", f"gone-{i}", f"sa-{i % 7}", f"10.200.{i >> 8}.{i & 255}")
        for i in range(deleted)
    ]
    return World(cluster, tuple(live), tuple(doomed))


def build_request(world: World, kind: int, rng: random.Random, with_csr: bool) -> bytes:
    """One request of KINDS[kind] with a freshly signed token."""
    c = world.cluster
    pod = rng.choice(world.live)
    other = rng.choice(world.live)
    while other is pod or other.ip == pod.ip:
        other = rng.choice(world.live)
    name = KINDS[kind].name
    if name == "another-pods-ip":
        body = c.confirmation(pod, san_ip=[other.ip], csr=with_csr)
    elif name == "foreign-san-dns":
        dns = [c.identity(pod).service_dns, f"billing.payments.{c.dns_suffix}"]
        body = c.confirmation(pod, san_dns=dns, csr=with_csr)
    elif name == "wrong-instance-id":
        body = c.confirmation(pod, attributes={"instanceId": other.uid}, csr=with_csr)
    elif name == "expired-token":
        expired = c.token(pod, now=time.time() - 7200)  # lifetime 3600 s: over by an hour
        body = c.confirmation(pod, token=expired, csr=with_csr)
    elif name == "deleted-pod":
        body = c.confirmation(rng.choice(world.doomed), csr=with_csr)
    elif name == "another-namespaces-domain":
        while other.namespace == pod.namespace:
            other = rng.choice(world.live)
        body = c.confirmation(pod, domain=c.identity(other).domain, csr=with_csr)
    else:
        body = c.confirmation(pod, csr=with_csr)
    path = "refresh" if name == "legit-refresh" else "instance"
    raw = json.dumps(body).encode()
    head = (
        f"POST /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n\r\n"
    ).encode()
    return head + raw


@dataclass(frozen=True)
class Mix:
    forged_fraction: float
    csr_fraction: float
    seed: int

    def kind(self, rng: random.Random, index: int) -> int:
        if rng.random() < self.forged_fraction:
            return len(LEGIT) + index % len(FORGERIES)  # rotate through the forgeries
        return 1 if rng.random() < 0.25 else 0  # a quarter are refreshes


def make_chunk(world: World, mix: Mix, chunk_id: int) -> list[Request]:
    rng = random.Random(mix.seed * 1_000_003 + chunk_id)
    out: list[Request] = []
    for j in range(CHUNK):
        kind = mix.kind(rng, chunk_id * CHUNK + j)
        out.append((build_request(world, kind, rng, rng.random() < mix.csr_fraction), kind))
    return out


def _generator_main(
    world: World, mix: Mix, chunk_ids: range, out: multiprocessing.queues.Queue[Any]
) -> None:
    """A forked generator: chunks of fresh requests onto ``out``, then None."""
    with contextlib.suppress(KeyboardInterrupt):
        for chunk_id in chunk_ids:
            out.put(make_chunk(world, mix, chunk_id))
        out.put(None)


class Feed:
    """Chunks from the generator processes, moved by a thread into a deque the event loop
    reads without blocking. Holds at most ``limit`` requests on this side."""

    def __init__(self, source: multiprocessing.queues.Queue[Any], producers: int, limit: int):
        self._queue, self._producers, self._limit = source, producers, limit
        self._chunks: deque[list[Request]] = deque()
        self._current: list[Request] = []
        self._pos = 0
        self._lock = threading.Lock()  # guards buffered: both threads change it
        self.buffered = 0  # requests in _chunks
        self.finished = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pull, name="soak-feed", daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        done = 0
        while not self._stop.is_set() and done < self._producers:
            if self.buffered >= self._limit:
                time.sleep(0.02)
                continue
            try:
                chunk = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if chunk is None:
                done += 1
                continue
            with self._lock:
                self._chunks.append(chunk)
                self.buffered += len(chunk)
        self.finished = True

    def take(self) -> Request | None:
        """The next request, or None when none is ready (yet)."""
        if self._pos >= len(self._current):
            with self._lock:
                if not self._chunks:
                    return None
                self._current = self._chunks.popleft()
                self.buffered -= len(self._current)
            self._pos = 0
        item = self._current[self._pos]
        self._pos += 1
        return item

    def ready(self) -> int:
        return self.buffered + len(self._current) - self._pos

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


# -- the API-server double, in its own process ------------------------------------------------


@dataclass(frozen=True)
class DoubleSpec:
    pods: tuple[tuple[str, str, str, str, str, str], ...]  # ns, name, uid, sa, ip, node
    doomed: tuple[tuple[str, str, str, str, str, str], ...]
    background: int  # pods that receive the MODIFIED stream
    event_rate: float  # MODIFIED events per second
    churn_interval: float  # seconds between add+delete of churn pods
    churn_keep: int  # churn pods alive at once


def _pod_fields(p: DevPod) -> tuple[str, str, str, str, str, str]:
    return (p.namespace, p.name, p.uid, p.service_account, p.ip, p.node)


def _double_main(conn: multiprocessing.connection.Connection, spec: DoubleSpec) -> None:
    """Spawned: run the double until told to stop. Commands over ``conn``:
    ``delete-doomed``, ``churn`` (start the event stream), ``stats``, ``stop``."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_double_serve(conn, spec))


async def _double_serve(conn: multiprocessing.connection.Connection, spec: DoubleSpec) -> None:
    from tests.doubles.kube_apiserver import KubeAPIServer

    stats: dict[str, Any] = {"modified": 0, "added": 0, "deleted": 0, "min_watches": None}
    async with KubeAPIServer(history=50_000) as api:
        for ns, name, uid, sa, ip, node in spec.pods + spec.doomed:
            api.add_pod(ns, name, uid=uid, service_account=sa, ip=ip, node=node)
        for i in range(spec.background):
            api.add_pod(
                f"bg-{i % 20}",
                f"bg-{i}",
                service_account=f"bg-{i % 5}",
                ip=f"10.201.{i >> 8 & 255}.{i & 255}",
                node=f"node-{i % 20}",
            )
        conn.send((api.url, api.token))
        churn: asyncio.Task[None] | None = None
        while True:
            try:
                command = await asyncio.to_thread(conn.recv)
            except EOFError:  # the soak went away
                command = "stop"
            if command == "delete-doomed":
                for ns, name, *_ in spec.doomed:
                    api.delete_pod(ns, name)
                    stats["deleted"] += 1
                conn.send(api.store.rv)
            elif command == "churn" and churn is None:
                churn = asyncio.create_task(_churn(api, spec, stats))
                conn.send("ok")
            elif command == "stats":
                conn.send({**stats, "watches": api.watch_count, "resource_version": api.store.rv})
            elif command == "stop":
                if churn is not None:
                    churn.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await churn
                conn.send("stopped")
                return


async def _churn(api: Any, spec: DoubleSpec, stats: dict[str, Any]) -> None:
    """MODIFIED events at ``event_rate`` to background pods (an annotation, a label, the
    Ready condition), and churn pods added and deleted; none of it touches the load's pods."""
    start = time.monotonic()
    next_churn = start
    added = 0
    background = itertools.cycle(range(spec.background)) if spec.background else None
    while True:
        await asyncio.sleep(0.05)
        now = time.monotonic()
        due = int((now - start) * spec.event_rate) - stats["modified"]
        for _ in range(due if background is not None else 0):
            i = next(background)  # type: ignore[arg-type]
            seq = stats["modified"]

            def change(obj: dict[str, Any], seq: int = seq) -> None:
                obj["metadata"]["annotations"]["soak.identityd.io/seq"] = str(seq)
                obj["metadata"]["labels"]["rev"] = str(seq % 7)
                obj["status"]["conditions"][0]["status"] = str(seq % 3 != 0)

            api.update_pod(f"bg-{i % 20}", f"bg-{i}", change)
            stats["modified"] += 1
        while spec.churn_interval > 0 and now >= next_churn:
            api.add_pod(
                "churn",
                f"churn-{added}",
                service_account="churn",
                ip=f"10.202.{added >> 8 & 255}.{added & 255}",
            )
            stats["added"] += 1
            if added >= spec.churn_keep:
                api.delete_pod("churn", f"churn-{added - spec.churn_keep}")
                stats["deleted"] += 1
            added += 1
            next_churn += spec.churn_interval
        watches = api.watch_count
        if stats["min_watches"] is None or watches < stats["min_watches"]:
            stats["min_watches"] = watches


class Double:
    """The double's process and its command pipe."""

    def __init__(self, spec: DoubleSpec) -> None:
        ctx = multiprocessing.get_context("spawn")  # its memory and CPU time are its own
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_double_main, args=(child, spec), name="kube-double")
        self.process.start()
        if not self._conn.poll(60):
            raise SystemExit("the API-server double did not start")
        self.url, self.token = self._conn.recv()

    def ask(self, command: str) -> Any:
        self._conn.send(command)
        if not self._conn.poll(30):
            raise RuntimeError(f"the double did not answer {command!r}")
        return self._conn.recv()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("stop")
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)


def write_kubeconfig(path: Path, url: str, token: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "double",
                "clusters": [{"name": "double", "cluster": {"server": url}}],
                "users": [{"name": "identityd", "user": {"token": token}}],
                "contexts": [
                    {"name": "double", "context": {"cluster": "double", "user": "identityd"}}
                ],
            }
        )
    )
    return path


# -- the server and its memory ---------------------------------------------------------------


# Loads regopy's library before anything loads the system libstdc++ (aiohttp does, through
# frozenlist); see --preload-regopy.
_PRELOADED = "import regopy, runpy; runpy.run_module('identityd.cli.main', run_name='__main__')"


def start_server(
    tmp: Path, world: World, kubeconfig: Path, workers: int, log: Path, preload: bool
) -> tuple[subprocess.Popen[bytes], int]:
    _, jwks = world.cluster.write(tmp)
    port = free_port()
    c = world.cluster
    entry = ["-c", _PRELOADED] if preload else ["-m", "identityd.cli.main"]
    cmd = [
        sys.executable, *entry, "serve",
        "--listen", f"127.0.0.1:{port}",
        "--workers", str(workers),
        "--kubeconfig", str(kubeconfig),
        "--jwks", str(jwks),
        "--policies", str(REPO / "policies"),
        "--provider", c.provider,
        "--issuer", c.issuer.issuer,
        "--audience", c.audience,
        "--dns-suffix", c.dns_suffix,
        "--client-rate", "0",
        "--log-level", "WARNING",
    ]  # fmt: skip
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(dir=tmp)}
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"identityd exited with {proc.returncode}: {tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"identityd did not become ready: {tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(out)


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of these processes so far (their own, not children's)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / ticks


def _kb(path: str, field_name: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field_name):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class MemorySample:
    t: float  # seconds since the load started
    rss_mb: float  # sum of VmRSS (shared pages counted in every process)
    pss_mb: float  # sum of Pss (shared pages split between the processes)
    pids: tuple[int, ...]
    rss_by_pid_mb: tuple[float, ...]  # in the order of pids


def sample_memory(root: int, t: float) -> MemorySample:
    pids = descendants(root)
    rss = [_kb(f"/proc/{p}/status", "VmRSS:") for p in pids]
    pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return MemorySample(
        round(t, 1),
        round(sum(rss) / 1024, 1),
        round(pss / 1024, 1),
        tuple(pids),
        tuple(round(r / 1024, 1) for r in rss),
    )


# -- the load client -------------------------------------------------------------------------

_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @staticmethod
    async def open(port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return Conn(reader, writer)

    async def call(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        match = _LENGTH.search(head)
        body = await self.reader.readexactly(int(match.group(1))) if match else b""
        return int(head[9:12]), body

    def close(self) -> None:
        self.writer.close()


@dataclass
class Tally:
    """Every response, checked."""

    sent: int = 0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # by cause
    wrong: int = 0
    forged_allowed: int = 0
    extra_codes: dict[str, int] = field(default_factory=dict)  # codes beside the expected one
    samples: list[dict[str, Any]] = field(default_factory=list)  # first problems seen
    latencies: array[float] = field(default_factory=lambda: array("d"))  # seconds
    offsets: array[float] = field(default_factory=lambda: array("d"))  # scheduled, since start
    # From the request's write to its answer: the server's time (and the kernel's), without
    # the wait for a free connection when the client is behind.
    service: array[float] = field(default_factory=lambda: array("d"))
    answered_at: array[float] = field(default_factory=lambda: array("d"))  # since start

    def record(self, kind: int, status: int | None, body: bytes, cause: str = "") -> bool:
        """Check one answer against KINDS[kind]; True if it is what it must be."""
        k = KINDS[kind]
        counts = self.by_kind.setdefault(k.name, {"sent": 0, "ok": 0})
        counts["sent"] += 1
        problem, message = verdict(k, status, body)
        if cause:
            problem, message = "error", cause
        if problem is None:
            counts["ok"] += 1
            for code in message.split(", ") if k.status == 403 else ():
                if code != k.code:
                    self.extra_codes[f"{k.name}:{code}"] = (
                        self.extra_codes.get(f"{k.name}:{code}", 0) + 1
                    )
            return True
        if problem == "error":
            if cause:
                key = cause
            elif status not in (200, 403):
                key = f"status {status}"
            else:
                key = "malformed answer"
            self.errors[key] = self.errors.get(key, 0) + 1
        else:
            self.wrong += 1
            self.forged_allowed += status == 200 and k.status == 403
        if len(self.samples) < 20:
            self.samples.append(
                {"kind": k.name, "problem": problem, "status": status, "message": message[:200]}
            )
        return False


def verdict(kind: Kind, status: int | None, body: bytes) -> tuple[str | None, str]:
    """(None | "error" | "wrong", the deny message or a note). Never echoes the body of an
    allow: it carries the token."""
    if status not in (200, 403):
        return "error", f"status {status}: {body[:120]!r}"
    try:
        answer = json.loads(body)
    except ValueError:
        return "error", "answer is not JSON"
    if not isinstance(answer, dict):
        return "error", "answer is not an object"
    if status == 200:
        attributes = answer.get("attributes")
        if not isinstance(attributes, dict) or "certExpiryTime" not in attributes:
            return "error", "allow without certExpiryTime"
        return (None, "") if kind.status == 200 else ("wrong", "allowed")
    message = answer.get("message")
    if not isinstance(message, str):
        return "error", "deny without a message"
    if kind.status == 200:
        return "wrong", message
    return (None, message) if kind.code in message.split(", ") else ("wrong", message)


@dataclass(frozen=True)
class LoadPlan:
    port: int
    rate: float
    seconds: float
    connections: int
    timeout: float
    sample_seconds: float
    server_pid: int
    max_server_rss_mb: float  # past this the load stops (a leak must not take the machine)


async def warm_up(port: int, feed: Feed, tally: Tally, count: int) -> None:
    """``count`` requests closed-loop on 4 connections: checked, not timed."""
    conns = [await Conn.open(port) for _ in range(4)]

    async def loop(conn: Conn) -> None:
        for _ in range(count // len(conns)):
            item = feed.take()
            if item is None:
                return
            raw, kind = item
            status, body = await conn.call(raw)
            tally.record(kind, status, body)

    await asyncio.gather(*(loop(c) for c in conns))
    for c in conns:
        c.close()


async def drive(
    plan: LoadPlan, feed: Feed, tally: Tally, memory: list[MemorySample]
) -> dict[str, Any]:
    """The open-loop run. Returns timing facts: elapsed, client stall, lateness, and
    why the load stopped early, if it did."""
    idle: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(plan.connections):
        idle.put_nowait(await Conn.open(plan.port))
    tasks: set[asyncio.Task[None]] = set()
    stall = 0.0
    start = time.perf_counter()
    done_sending = asyncio.Event()
    aborted = ""

    async def one(conn: Conn, raw: bytes, kind: int, scheduled: float) -> None:
        status: int | None = None
        body, cause = b"", ""
        sent = time.perf_counter()
        try:
            async with asyncio.timeout(plan.timeout):
                status, body = await conn.call(raw)
        except TimeoutError:
            cause = "timeout"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            cause = f"connection: {type(exc).__name__}"
        tally.record(kind, status, body, cause)
        if not cause:  # answered (rightly or not): timed
            now = time.perf_counter()
            tally.service.append(now - sent)
            tally.latencies.append(now - scheduled)
            tally.answered_at.append(now - start)
            tally.offsets.append(scheduled - start)
        if cause:  # the connection's state is unknown: replace it
            conn.close()
            conn = await reopen(plan.port)
        idle.put_nowait(conn)

    async def sampler() -> None:
        nonlocal aborted
        while not done_sending.is_set():
            memory.append(sample_memory(plan.server_pid, time.perf_counter() - start))
            if memory[-1].rss_mb > plan.max_server_rss_mb and not aborted:
                aborted = f"server RSS {memory[-1].rss_mb} MB > {plan.max_server_rss_mb:g} MB"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(plan.sample_seconds):
                    await done_sending.wait()

    sampling = asyncio.create_task(sampler())
    total = int(plan.rate * plan.seconds)
    lateness = array("d")
    for i in range(total):
        scheduled = start + i / plan.rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        item = feed.take()
        while item is None:  # the generator fell behind: the schedule slips, say so
            if feed.finished:
                break
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            stall += time.perf_counter() - t0
            item = feed.take()
        if item is None or aborted:
            break
        conn = await idle.get()  # all busy: the wait is counted in the latency
        if time.perf_counter() - start > plan.seconds + plan.timeout:
            idle.put_nowait(conn)
            aborted = "over a timeout behind the schedule"
            break  # hopelessly behind: stop rather than run on forever
        lateness.append(time.perf_counter() - scheduled)
        task = asyncio.create_task(one(conn, item[0], item[1], scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        tally.sent += 1
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    done_sending.set()
    await sampling
    memory.append(sample_memory(plan.server_pid, elapsed))
    while not idle.empty():
        idle.get_nowait().close()
    ordered = sorted(lateness)
    return {
        "elapsed": elapsed,
        "stall": stall,
        "send_late_p99_ms": pct(ordered, 0.99) * 1000,
        "aborted": aborted,
    }


async def reopen(port: int) -> Conn:
    for attempt in range(50):
        try:
            return await Conn.open(port)
        except OSError:
            await asyncio.sleep(min(0.5, 0.01 * 2**attempt))
    raise RuntimeError("cannot reconnect to identityd")


def pct(ordered: list[float] | array[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


# -- server-side counters --------------------------------------------------------------------

_INVENTORY = re.compile(r'^identityd_inventory_(\w+)_total\{(\w+)="(\w+)"\} (\S+)$')


def inventory_counters(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _INVENTORY.match(line)
        if m:
            key = f"{m.group(1)}:{m.group(3)}"
            out[key] = out.get(key, 0.0) + float(m.group(4))
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items()) if v != before.get(k)}


def wait_for_deletions(port: int, world: World, workers: int, within: float = 15.0) -> float:
    """Until the last doomed pod is denied POD_NOT_FOUND by every worker we reach (the
    deletions are in order, so the last one seen means all are). Returns the wait."""
    if not world.doomed:
        return 0.0
    probe = json.dumps(world.cluster.confirmation(world.doomed[-1], csr=False)).encode()
    t0 = time.monotonic()
    in_a_row = 0
    while time.monotonic() - t0 < within:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/instance",
            data=probe,
            headers={"Content-Type": "application/json", "Connection": "close"},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                message = json.loads(r.read()).get("message", "")
                status = r.status
        except urllib.error.HTTPError as exc:
            status, message = exc.code, json.loads(exc.read()).get("message", "")
        in_a_row = in_a_row + 1 if (status, message) == (403, "POD_NOT_FOUND") else 0
        if in_a_row >= 10 * workers:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise SystemExit("identityd still allows pods deleted from the API server")


# -- the run ---------------------------------------------------------------------------------


def summarize(
    tally: Tally, timing: dict[str, float], plan: LoadPlan, memory: list[MemorySample]
) -> dict[str, Any]:
    lat = sorted(tally.latencies)
    service = sorted(tally.service)
    answered = sum(v["sent"] for v in tally.by_kind.values())
    windows = []
    edges = [m.t for m in memory]
    buckets: list[list[float]] = [[] for _ in edges]  # latencies by scheduled time
    arrivals = [0 for _ in edges]  # answers by the time they came
    for off, latency in zip(tally.offsets, tally.latencies, strict=True):
        buckets[max(0, bisect.bisect_right(edges, off) - 1)].append(latency)
    for at in tally.answered_at:
        arrivals[max(0, bisect.bisect_right(edges, at) - 1)] += 1
    for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
        chunk = sorted(buckets[i])
        if chunk:
            windows.append(
                {
                    "from_s": lo,
                    "to_s": hi,
                    "answered_per_s": round(arrivals[i] / (hi - lo), 1) if hi > lo else 0.0,
                    "p50_ms": round(pct(chunk, 0.5) * 1000, 2),
                    "p99_ms": round(pct(chunk, 0.99) * 1000, 2),
                }
            )
    return {
        "answered": answered,
        "timed": len(lat),
        "seconds": round(timing["elapsed"], 2),
        "achieved_rate_per_s": round(len(lat) / timing["elapsed"], 1) if timing["elapsed"] else 0,
        "p50_ms": round(pct(lat, 0.50) * 1000, 2),
        "p90_ms": round(pct(lat, 0.90) * 1000, 2),
        "p99_ms": round(pct(lat, 0.99) * 1000, 2),
        "max_ms": round(lat[-1] * 1000, 2) if lat else 0.0,
        "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else 0.0,
        "service_p50_ms": round(pct(service, 0.50) * 1000, 2),
        "service_p99_ms": round(pct(service, 0.99) * 1000, 2),
        "client_send_late_p99_ms": round(timing["send_late_p99_ms"], 2),
        "generator_stall_s": round(timing["stall"], 3),
        "stopped_early": timing["aborted"],
        "windows": windows,
    }


def rss_growth(memory: list[MemorySample], baseline_at: float) -> dict[str, Any]:
    base = next((m for m in memory if m.t >= baseline_at), memory[-1] if memory else None)
    end = memory[-1] if memory else None
    if base is None or end is None or base.rss_mb == 0:
        return {}
    return {
        "baseline_t_s": base.t,
        "baseline_rss_mb": base.rss_mb,
        "end_rss_mb": end.rss_mb,
        "rss_growth_pct": round((end.rss_mb - base.rss_mb) / base.rss_mb * 100, 2),
        "baseline_pss_mb": base.pss_mb,
        "end_pss_mb": end.pss_mb,
        "pss_growth_pct": round((end.pss_mb - base.pss_mb) / base.pss_mb * 100, 2)
        if base.pss_mb
        else None,
        "peak_rss_mb": max(m.rss_mb for m in memory),
    }


def judge(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The targets missed, in words (empty: all held)."""
    missed = []
    checks = result["checks"]
    load = result["load"]
    if checks["errors"]:
        missed.append(f"errors: {checks['errors']} ({checks['errors_by_cause']})")
    if checks["wrong_decisions"]:
        missed.append(
            f"wrong decisions: {checks['wrong_decisions']} "
            f"(forged allowed: {checks['forged_allowed']})"
        )
    floor = args.rate * (1 - args.rate_tolerance)
    if load["achieved_rate_per_s"] < floor:
        missed.append(f"achieved {load['achieved_rate_per_s']}/s < {floor:.0f}/s")
    if load["stopped_early"]:
        missed.append(f"the load stopped early: {load['stopped_early']}")
    if load["generator_stall_s"] > 0.1:
        missed.append(f"the request generator fell behind ({load['generator_stall_s']} s)")
    memory = result["memory"]
    if result["rss_judged"] and memory.get("rss_growth_pct", 0) > args.max_rss_growth:
        missed.append(f"RSS growth {memory['rss_growth_pct']}% > {args.max_rss_growth}%")
    if result["server"]["worker_restarts"]:
        missed.append(f"worker restarts: {result['server']['worker_restarts']}")
    inv = result["inventory"]
    if inv["events_applied"] < 0.9 * inv["events_expected"]:
        missed.append(
            f"inventory applied {inv['events_applied']:.0f} watch events of "
            f"{inv['events_expected']} expected"
        )
    return missed


def worker_restarts(memory: list[MemorySample]) -> int:
    """Processes that appeared after the first sample (a worker restarted)."""
    if not memory:
        return 0
    first = set(memory[0].pids)
    return len({p for m in memory for p in m.pids} - first)


def _half_of_memory_mb() -> float:
    return _kb("/proc/meminfo", "MemTotal:") / 2048 or 8192.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the load (default 10)")
    ap.add_argument("--rate", type=float, default=1000.0, help="decisions/s (default 1,000)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pods", type=int, default=1000, help="live pods the load uses")
    ap.add_argument("--deleted-pods", type=int, default=50, help="pods deleted before the load")
    ap.add_argument("--background-pods", type=int, default=2000, help="pods the events touch")
    ap.add_argument("--event-rate", type=float, default=20.0, help="MODIFIED events/s")
    ap.add_argument("--churn-interval", type=float, default=0.5, help="s between add+delete")
    ap.add_argument("--churn-keep", type=int, default=10, help="churn pods alive at once")
    ap.add_argument("--forged-percent", type=float, default=30.0)
    ap.add_argument("--csr-fraction", type=float, default=0.25, help="requests carrying a CSR")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    ap.add_argument("--warmup", type=int, default=200, help="requests before the timed load")
    ap.add_argument("--generators", type=int, default=1, help="request generator processes")
    ap.add_argument("--prefill-seconds", type=float, default=20.0, help="requests ready first")
    ap.add_argument("--pregenerate", action="store_true", help="build every request first")
    ap.add_argument("--rate-tolerance", type=float, default=0.02)
    ap.add_argument("--max-rss-growth", type=float, default=5.0, help="percent")
    ap.add_argument(
        "--max-server-rss-mb",
        type=float,
        default=_half_of_memory_mb(),
        help="stop the load when the server's RSS sum passes this (default: half the RAM)",
    )
    ap.add_argument(
        "--preload-regopy",
        action="store_true",
        help="experiment: start the server with regopy imported first (see docs/benchmarks.md)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    return ap.parse_args(argv)


@dataclass
class Observed:
    """Everything one run measured, before it is judged."""

    started: datetime
    prefill_wait: float
    plan: LoadPlan
    tally: Tally
    timing: dict[str, Any]
    memory: list[MemorySample]
    cpu_used: dict[str, float]
    stages: tuple[dict[str, float], dict[str, float]]  # /metrics before and after the load
    inventory: tuple[dict[str, float], dict[str, float]]
    events: tuple[dict[str, Any], dict[str, Any]]  # the double's counts before and after
    stderr: str


def run(args: argparse.Namespace) -> Observed:
    """Start the double, the generators and identityd; run the load; stop them all."""
    started = datetime.now(UTC)
    seconds = args.minutes * 60
    world = build_world(args.pods, args.deleted_pods)
    mix = Mix(args.forged_percent / 100, args.csr_fraction, args.seed)
    total = args.warmup + int(args.rate * seconds)
    # Requests ready before the load starts (the warm-up's included); the generator keeps
    # ahead from there, in the background.
    prefill = (
        total
        if args.pregenerate
        else min(total, args.warmup + int(args.prefill_seconds * args.rate))
    )
    spec = DoubleSpec(
        tuple(_pod_fields(p) for p in world.live),
        tuple(_pod_fields(p) for p in world.doomed),
        args.background_pods,
        args.event_rate,
        args.churn_interval,
        args.churn_keep,
    )
    gen_ctx = multiprocessing.get_context("fork")  # the issuer's key is inherited, not pickled
    chunk_queue: multiprocessing.queues.Queue[Any] = gen_ctx.Queue(maxsize=8)
    chunks = math.ceil(total / CHUNK) + 1
    generators = [
        gen_ctx.Process(
            target=_generator_main,
            args=(world, mix, range(g, chunks, args.generators), chunk_queue),
            name=f"soak-gen-{g}",
            daemon=True,
        )
        for g in range(args.generators)
    ]
    cleanup: list[Callable[[], None]] = []
    try:
        double = Double(spec)
        cleanup.append(double.close)
        for gen in generators:
            gen.start()
        cleanup.append(lambda: stop_processes(generators))
        feed = Feed(chunk_queue, len(generators), max(prefill, 4 * CHUNK))
        cleanup.append(feed.close)
        tmp = Path(tempfile.mkdtemp(prefix="identityd-soak-"))
        cleanup.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
        log = tmp / "identityd.stderr"
        kubeconfig = write_kubeconfig(tmp / "kubeconfig", double.url, double.token)
        server, port = start_server(tmp, world, kubeconfig, args.workers, log, args.preload_regopy)
        cleanup.append(lambda: stop_server(server))

        double.ask("delete-doomed")
        deletion_wait = wait_for_deletions(port, world, args.workers)
        double.ask("churn")
        print(
            f"identityd ready on :{port} ({args.workers} workers, watching {double.url}); "
            f"deletions seen in {deletion_wait:.2f}s; waiting for {prefill} requests",
            file=sys.stderr,
        )
        t0 = time.monotonic()
        while feed.ready() < prefill and not feed.finished:
            time.sleep(0.1)
        prefill_wait = time.monotonic() - t0

        plan = LoadPlan(
            port=port,
            rate=args.rate,
            seconds=seconds,
            connections=args.connections,
            timeout=args.timeout,
            sample_seconds=min(10.0, max(1.0, seconds / 12)),
            server_pid=server.pid,
            max_server_rss_mb=args.max_server_rss_mb,
        )
        tally = Tally()
        memory: list[MemorySample] = []
        asyncio.run(warm_up(port, feed, tally, args.warmup))
        stages_before, inventory_before = scrape(port), inventory_counters(port)
        events_before = double.ask("stats")
        print(f"load: {args.rate:g}/s for {seconds:g}s", file=sys.stderr)
        groups = {
            "server": descendants(server.pid),
            "load_client": [os.getpid()],
            "generators": [g.pid for g in generators if g.pid is not None],
            "double": [double.process.pid] if double.process.pid is not None else [],
        }
        cpu_before = {k: cpu_seconds(v) for k, v in groups.items()}
        timing = asyncio.run(drive(plan, feed, tally, memory))
        groups["server"] = descendants(server.pid)
        cpu_used = {
            k: round((cpu_seconds(v) - cpu_before[k]) / timing["elapsed"], 2)
            for k, v in groups.items()
        }
        return Observed(
            started=started,
            prefill_wait=prefill_wait,
            plan=plan,
            tally=tally,
            timing=timing,
            memory=memory,
            cpu_used=cpu_used,
            stages=(stages_before, scrape(port)),
            inventory=(inventory_before, inventory_counters(port)),
            events=(events_before, double.ask("stats")),
            stderr=log.read_text(errors="replace"),
        )
    finally:
        for step in reversed(cleanup):
            with contextlib.suppress(Exception):
                step()


def assemble(args: argparse.Namespace, seen: Observed) -> dict[str, Any]:
    """The result document (bench/results/soak-*.json), targets not yet judged."""
    tally, memory = seen.tally, seen.memory
    events_before, events_after = seen.events
    sent_by_type = {k: events_after[k] - events_before[k] for k in ("modified", "added", "deleted")}
    applied = delta(*seen.inventory)
    seconds = args.minutes * 60
    return {
        "started": seen.started.isoformat(timespec="seconds"),
        "config": {
            "minutes": args.minutes,
            "target_rate_per_s": args.rate,
            "workers": args.workers,
            "cores": os.cpu_count(),
            "pods": args.pods,
            "deleted_pods": args.deleted_pods,
            "background_pods": args.background_pods,
            "event_rate_per_s": args.event_rate,
            "churn_interval_s": args.churn_interval,
            "forged_percent": args.forged_percent,
            "csr_fraction": args.csr_fraction,
            "connections": args.connections,
            "pregenerated": args.pregenerate,
            "preload_regopy": args.preload_regopy,
            "prefill_wait_s": round(seen.prefill_wait, 1),
            "kinds": [asdict(k) for k in KINDS],
        },
        "load": summarize(tally, seen.timing, seen.plan, memory),
        "checks": {
            "sent": tally.sent + args.warmup,
            "by_kind": tally.by_kind,
            "errors": sum(tally.errors.values()),
            "errors_by_cause": tally.errors,
            "wrong_decisions": tally.wrong,
            "forged_allowed": tally.forged_allowed,
            "extra_codes_beside_expected": tally.extra_codes,
            "first_problems": tally.samples,
        },
        # CPU cores each part kept busy during the load (cpu seconds / wall seconds).
        "cpu_cores_used": seen.cpu_used,
        "memory": rss_growth(memory, baseline_at=min(60.0, seconds / 6)),
        "rss_judged": seconds >= 120,
        "memory_samples": [
            {"t": m.t, "rss_mb": m.rss_mb, "pss_mb": m.pss_mb, "rss_by_pid_mb": m.rss_by_pid_mb}
            for m in memory
        ],
        "server": {
            "worker_restarts": worker_restarts(memory),
            "processes": len(memory[0].pids) if memory else 0,
            "stage_breakdown_ms": breakdown(*seen.stages),
            "stderr_error_lines": sum(
                ("ERROR" in line or "Traceback" in line) for line in seen.stderr.splitlines()
            ),
            "stderr_tail": seen.stderr.splitlines()[-10:],
        },
        "inventory": {
            "double_events_sent": sent_by_type,
            "watches_open_at_end": events_after["watches"],
            "fewest_watches_open": events_after["min_watches"],
            "server_counters_delta": applied,
            "events_applied": sum(v for k, v in applied.items() if k.startswith("events:")),
            # Every worker runs its own watch: each should apply every event.
            "events_expected": sum(sent_by_type.values()) * args.workers,
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seen = run(args)
    result = assemble(args, seen)
    missed = judge(result, args)
    result["targets_missed"] = missed
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"soak-{seen.started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result, path))
    return 1 if missed else 0


def report(result: dict[str, Any], path: Path) -> str:
    load, checks, memory = result["load"], result["checks"], result["memory"]
    inv = result["inventory"]
    lines = [
        f"soak: {result['config']['minutes']} min at {result['config']['target_rate_per_s']:g}/s,"
        f" {result['config']['workers']} workers, {result['config']['cores']} cores",
        f"  achieved {load['achieved_rate_per_s']}/s over {load['seconds']} s; latency p50 "
        f"{load['p50_ms']} ms, p99 {load['p99_ms']} ms, max {load['max_ms']} ms (from the "
        f"scheduled time); from the write: p50 {load['service_p50_ms']} ms, "
        f"p99 {load['service_p99_ms']} ms",
        f"  checked {checks['sent']} responses: {checks['errors']} errors, "
        f"{checks['wrong_decisions']} wrong decisions ({checks['forged_allowed']} forged allowed)",
        "  by kind: "
        + ", ".join(f"{k} {v['ok']}/{v['sent']}" for k, v in checks["by_kind"].items()),
        f"  server memory (RSS sum): {memory.get('baseline_rss_mb')} MB at "
        f"{memory.get('baseline_t_s')} s -> {memory.get('end_rss_mb')} MB at the end "
        f"({memory.get('rss_growth_pct')}%; PSS {memory.get('pss_growth_pct')}%)"
        + ("" if result["rss_judged"] else " [not judged: run under 2 min]"),
        f"  inventory: {inv['events_applied']:.0f} watch events applied "
        f"(expected ~{inv['events_expected']}), double sent {inv['double_events_sent']}",
        f"  server stages (mean ms): {result['server']['stage_breakdown_ms']}",
        f"  CPU cores used: {result['cpu_cores_used']}",
        f"  result: {path}",
    ]
    missed = result["targets_missed"]
    lines.append("  TARGETS MISSED: " + "; ".join(missed) if missed else "  all targets held")
    return "\n".join(lines)


def stop_processes(processes: Iterable[multiprocessing.process.BaseProcess]) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=5)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
