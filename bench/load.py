"""Load generator for the callback: unique, validly signed requests over HTTP on loopback.

    python bench/load.py --mode max  --duration 10 --workers 2      # throughput
    python bench/load.py --mode rate --rate 1000 --duration 10      # latency at a fixed rate

Starts `identityd serve` as a subprocess on embedded defaults (static inventory,
JWKS file, default policies), pre-generates one RS256 bound token per request
(as the API server signs them), then drives it with a lean asyncio HTTP/1.1
client (pre-encoded requests, keep-alive) so the client takes as little of the
machine as it can. Rate mode is open-loop: latency is measured from each
request's scheduled send time, so a stalled server cannot hide its queueing, and
also from its dispatch (``from_dispatch_ms``), which leaves out the generator's own
timer lateness (``generator_lag_ms``, up to ~1 ms: asyncio sleeps in whole ms).
The server-side breakdown per stage comes from its own /metrics histograms.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from identityd.devca.workload import DevCluster  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- request generation (in worker processes: RSA signing is the slow part) -------------------

_CLUSTER: DevCluster | None = None


def _init(cluster: DevCluster) -> None:
    global _CLUSTER
    _CLUSTER = cluster


def _make(args: tuple[int, bool, str]) -> bytes:
    index, with_csr, kind = args
    assert _CLUSTER is not None
    pod = _CLUSTER.pods[index % len(_CLUSTER.pods)]
    body = json.dumps(_CLUSTER.confirmation(pod, csr=with_csr)).encode()
    head = (
        f"POST /{kind} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def generate(cluster: DevCluster, count: int, with_csr: bool, procs: int) -> list[bytes]:
    jobs = [(i, with_csr, "instance" if i % 4 else "refresh") for i in range(count)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs, initializer=_init, initargs=(cluster,)) as pool:
        return pool.map(_make, jobs, chunksize=256)


# -- a lean HTTP/1.1 client ------------------------------------------------------------------

_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def call(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        match = _LENGTH.search(head)
        if match:
            await self.reader.readexactly(int(match.group(1)))
        return int(head[9:12])


async def connect(port: int, n: int) -> list[Conn]:
    conns = []
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        conns.append(Conn(r, w))
    return conns


async def run_max(
    port: int, requests: list[bytes], concurrency: int, duration: float
) -> dict[str, Any]:
    conns = await connect(port, concurrency)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    next_index = 0
    deadline = time.perf_counter() + duration

    async def loop(conn: Conn) -> None:
        nonlocal next_index
        while time.perf_counter() < deadline and next_index < len(requests):
            raw = requests[next_index]
            next_index += 1
            t0 = time.perf_counter()
            status = await conn.call(raw)
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in conns))
    elapsed = time.perf_counter() - start
    for c in conns:
        c.writer.close()
    return summarize(latencies, statuses, elapsed)


async def run_rate(
    port: int, requests: list[bytes], rate: float, duration: float, pool: int
) -> dict[str, Any]:
    conns = await connect(port, pool)
    idle: asyncio.Queue[Conn] = asyncio.Queue()
    for c in conns:
        idle.put_nowait(c)
    latencies: list[float] = []
    from_dispatch: list[float] = []
    lags: list[float] = []
    statuses: dict[int, int] = {}
    total = min(len(requests), int(rate * duration))
    start = time.perf_counter()
    tasks = []

    async def one(raw: bytes, scheduled: float, dispatched: float) -> None:
        conn = await idle.get()  # waiting for a free connection counts: it is the server's
        status = await conn.call(raw)
        idle.put_nowait(conn)
        end = time.perf_counter()
        latencies.append(end - scheduled)
        from_dispatch.append(end - dispatched)
        lags.append(dispatched - scheduled)
        statuses[status] = statuses.get(status, 0) + 1

    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(requests[i], scheduled, time.perf_counter())))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for c in conns:
        c.writer.close()
    result = summarize(latencies, statuses, elapsed)
    # asyncio wakes a sleeper up to a millisecond late (epoll's timeout is in ms), so
    # the latency from the schedule also holds the generator's own lateness; the
    # latency from dispatch leaves it out (and still counts any wait for a connection).
    ordered, lag = sorted(from_dispatch), sorted(lags)
    result["from_dispatch_ms"] = {p: round(percentile(ordered, q), 3) for p, q in PCTS}
    result["from_dispatch_mean_ms"] = round(statistics.fmean(ordered) * 1000, 4) if ordered else 0.0
    result["generator_lag_ms"] = {p: round(percentile(lag, q), 3) for p, q in PCTS}
    return result


PCTS = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def summarize(latencies: list[float], statuses: dict[int, int], elapsed: float) -> dict[str, Any]:
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000 if ordered else 0.0

    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 3),
        "throughput_per_s": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(pct(0.50), 3),
        "p90_ms": round(pct(0.90), 3),
        "p99_ms": round(pct(0.99), 3),
        "max_ms": round(ordered[-1] * 1000, 3) if ordered else 0,
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3) if ordered else 0,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


# -- server-side breakdown -------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    sums: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(
            r'identityd_(stage|decision)_seconds_(sum|count)\{(?:stage|kind)="(\w+)"\} (\S+)', line
        )
        if m:
            key = f"{m.group(1)}:{m.group(3)}:{m.group(2)}"
            sums[key] = sums.get(key, 0.0) + float(m.group(4))
    return sums


def breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    def mean(prefix: str) -> float | None:
        s = after.get(f"{prefix}:sum", 0) - before.get(f"{prefix}:sum", 0)
        c = after.get(f"{prefix}:count", 0) - before.get(f"{prefix}:count", 0)
        return round(s / c * 1000, 4) if c else None

    out: dict[str, float] = {}
    for stage in ("token", "csr", "inventory", "policy"):
        value = mean(f"stage:{stage}")
        if value is not None:
            out[f"{stage}_ms"] = value
    handler = [mean(f"decision:{k}") for k in ("instance", "refresh")]
    handler_vals = [h for h in handler if h is not None]
    if handler_vals:
        out["handler_ms"] = round(statistics.fmean(handler_vals), 4)
    return out


# -- main ------------------------------------------------------------------------------------


def start_server(
    tmp: Path, cluster: DevCluster, workers: int
) -> tuple[subprocess.Popen[bytes], int]:
    pods, jwks = cluster.write(tmp)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "identityd.cli.main",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--pods",
        str(pods),
        "--jwks",
        str(jwks),
        "--policies",
        str(REPO / "policies"),
        "--provider",
        cluster.provider,
        "--issuer",
        cluster.issuer.issuer,
        "--audience",
        cluster.audience,
        "--dns-suffix",
        cluster.dns_suffix,
        "--log-level",
        "WARNING",
    ]
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(dir=tmp)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env, cwd=REPO)
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not become ready")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mode", choices=("max", "rate"), default="max")
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--csr", action="store_true", help="send a CSR in every request")
    ap.add_argument("--requests", type=int, default=0, help="pre-generated (default: enough)")
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args(argv)

    cluster = DevCluster()
    for i in range(args.pods):
        cluster.add_pod(
            f"ns-{i % 50}",
            f"app-{i}",
            f"sa-{i % 7}",
            f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
        )
    count = args.requests or int((args.rate if args.mode == "rate" else 4000) * args.duration)
    t0 = time.perf_counter()
    requests = generate(cluster, count, args.csr, os.cpu_count() or 1)
    print(
        f"generated {len(requests)} signed requests in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="identityd-bench-") as tmp:
        proc, port = start_server(Path(tmp), cluster, args.workers)
        try:
            asyncio.run(run_max(port, requests[:200], 4, 5.0))  # warm-up
            before = scrape(port)
            # The client's own pauses must not show as the server's latency: its
            # garbage is acyclic (bytes, floats, finished tasks), so no collector
            # runs while it measures.
            gc.freeze()
            gc.disable()
            if args.mode == "max":
                result = asyncio.run(run_max(port, requests[200:], args.concurrency, args.duration))
            else:
                result = asyncio.run(run_rate(port, requests[200:], args.rate, args.duration, 64))
            after = scrape(port)
            gc.enable()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    result.update(
        {
            "mode": args.mode,
            "workers": args.workers,
            "pods": args.pods,
            "csr": args.csr,
            "cores": os.cpu_count(),
            "server_breakdown_ms": breakdown(before, after),
        }
    )
    if args.mode == "rate":
        result["target_rate"] = args.rate
        # Per decision, what the handler's stages leave of the client's time: aiohttp
        # parsing and writing, the loopback both ways, and any queueing. At a low rate
        # it is the HTTP cost itself.
        handler = result["server_breakdown_ms"].get("handler_ms")
        if handler is not None:
            result["outside_handler_ms"] = round(result["from_dispatch_mean_ms"] - handler, 4)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    bad = {k: v for k, v in result["statuses"].items() if k != "200"}
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
