"""The cost of the HTTP hop to OPA: decisions/s and latency through OPAEngine, and the
time per decision spent outside policy evaluation.

    python bench/opa_hop.py                        # every scenario below, ~1 min
    python bench/opa_hop.py --scenario rate-small --duration 20

The OPA REST double (tests/doubles/opa_server.py) runs in its own process, as a
sidecar would; this process drives ``OPAEngine.evaluate``. The double times each
evaluation inside regopy and counts its own CPU time; so per decision:

    hop         = latency seen by OPAEngine.evaluate - evaluation time in the double
    client_cpu  = this process's CPU time / decisions      (identityd's share)
    server_http = the double's CPU time / decisions - evaluation time
                  (the double's Python HTTP and JSON handling; a real OPA does
                  this in Go)
    the rest    = loopback TCP, wake-ups, queueing

Scenarios (policy, input document, load):
  serial-allow   one-rule policy, the real `allow` input (~2 KB), one decision at a
                 time: exact per-decision hop percentiles
  rate-small     one-rule policy, a ~100-byte input, open loop at --rate (1,000/s):
                 the hop at the target rate. (With the 2 KB input, regopy spends
                 ~0.8 ms parsing the input alone, so the double saturates near
                 1,000/s on this machine and queueing would swamp the hop.)
  rate-allow     one-rule policy, the real input, open loop at --allow-rate (500/s)
  max-allow      one-rule policy, the real input, --concurrency in flight: most decisions/s
  rate-default   the default policies and the real input at --default-rate (100/s):
                 regopy needs ~2-5 ms per decision on them
  floor          not a decision: `GET /health` one at a time on an aiohttp session,
                 the least an HTTP round trip between these two processes costs

Open-loop latency is measured from each decision's scheduled time, so a stalled
client or server cannot hide its queueing. The machine's other load shows in every
figure: run it on an idle machine, and run it twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from identityd.policy.cases import load_bases  # noqa: E402
from identityd.policy.opa import OPAEngine  # noqa: E402
from identityd.policy.sources import load_policy_dir  # noqa: E402

TINY = """package identityd

import rego.v1

decision := {"allow": true, "reasons": [], "attributes": {"certUsage": "client"}} if {
	input.request.service == input.token.service_account
} else := {"allow": false, "reasons": ["SERVICE_MISMATCH: differs"], "attributes": {}}
"""
SMALL = {"version": 1, "kind": "instance", "request": {"service": "api", "domain": "sports.web"},
         "token": {"service_account": "api", "namespace": "sports-web"}}
SCENARIOS = ["serial-allow", "rate-small", "rate-allow", "max-allow", "rate-default", "floor"]


@dataclass
class Run:
    name: str
    seconds: float
    latencies_ms: list[float]
    eval_ms: list[float]
    client_cpu_s: float
    server_cpu_s: float
    errors: int

    def report(self, *, serial: bool) -> dict[str, Any]:
        lat, ev, n = self.latencies_ms, self.eval_ms, len(self.latencies_ms)
        eval_mean = statistics.fmean(ev)
        out: dict[str, Any] = {
            "scenario": self.name,
            "decisions": n,
            "errors": self.errors,
            "decisions_per_s": round(n / self.seconds, 1),
            "latency_ms": _summary(lat),
            "eval_ms": _summary(ev),
            # Exact for means, whatever the overlap between decisions.
            "hop_mean_ms": round(statistics.fmean(lat) - eval_mean, 3),
            "client_cpu_ms": round(self.client_cpu_s / n * 1e3, 3),
            "server_http_cpu_ms": round(self.server_cpu_s / len(ev) * 1e3 - eval_mean, 3),
        }
        if serial and len(lat) == len(ev):
            # One decision at a time: the i-th latency and the i-th evaluation belong together.
            out["hop_ms"] = _summary([a - b for a, b in zip(lat, ev, strict=True)])
        return out


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 3)

    return {"mean": round(statistics.fmean(ordered), 3), "p50": pct(50), "p99": pct(99),
            "max": round(ordered[-1], 3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_double() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.doubles.opa_server", "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE,
    )
    line = process.stdout.readline().decode() if process.stdout else ""
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"the OPA double did not start: {line!r}")
    return process, f"http://127.0.0.1:{port}"


def double_call(url: str, path: str, method: str = "GET") -> Any:
    request = urllib.request.Request(f"{url}{path}", method=method)
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


async def measure(
    name: str, engine: OPAEngine, url: str, doc: dict[str, Any], *,
    rate: float | None, duration: float, concurrency: int = 1,
) -> Run:
    for _ in range(300):  # warm up: connection pool, regopy bundle, code paths
        await engine.evaluate(doc)
    await asyncio.to_thread(double_call, url, "/_double/reset", "POST")
    latencies: list[float] = []
    errors = 0

    async def one(scheduled: float) -> None:
        nonlocal errors
        try:
            await engine.evaluate(doc)
        except Exception:
            errors += 1
            return
        latencies.append((time.perf_counter() - scheduled) * 1e3)

    cpu = time.process_time()
    started = time.perf_counter()
    if rate is not None:  # open loop
        tasks = []
        for i in range(int(rate * duration)):
            scheduled = started + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
    else:  # closed loop
        deadline = started + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await one(time.perf_counter())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    client_cpu = time.process_time() - cpu
    stats = await asyncio.to_thread(double_call, url, "/_double/stats")
    return Run(name, seconds, latencies, [ns / 1e6 for ns in stats["eval_ns"]], client_cpu,
               stats["cpu_seconds"], errors)


async def floor(url: str, duration: float) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async def health() -> None:
            async with http.get(f"{url}/health") as resp:
                await resp.read()

        for _ in range(300):
            await health()
        latencies: list[float] = []
        cpu, started = time.process_time(), time.perf_counter()
        while time.perf_counter() - started < duration:
            begun = time.perf_counter()
            await health()
            latencies.append((time.perf_counter() - begun) * 1e3)
        client_cpu = time.process_time() - cpu
    return {"scenario": "floor", "round_trips": len(latencies), "latency_ms": _summary(latencies),
            "client_cpu_ms": round(client_cpu / len(latencies) * 1e3, 3)}


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    allow = load_bases(REPO / "policies" / "tests" / "_bases.yaml")["allow"]
    process, url = start_double()
    results: list[dict[str, Any]] = []
    try:
        async with OPAEngine(url, timeout=2.0) as engine:
            loaded: str | None = None
            for name in args.scenario or SCENARIOS:
                if name == "floor":
                    results.append(await floor(url, args.duration))
                    print(json.dumps(results[-1]), flush=True)
                    continue
                wanted = "default" if name == "rate-default" else "tiny"
                if wanted != loaded:
                    await engine.load(load_policy_dir(REPO / "policies") if wanted == "default"
                                      else {"bench/tiny.rego": TINY})
                    loaded = wanted
                doc = SMALL if name == "rate-small" else allow
                rate = {"rate-small": args.rate, "rate-allow": args.allow_rate,
                        "rate-default": args.default_rate}.get(name)
                concurrency = args.concurrency if name == "max-allow" else 1
                label = f"{name}@{rate:g}/s" if rate else (
                    f"{name}x{concurrency}" if concurrency > 1 else name)
                run = await measure(label, engine, url, doc, rate=rate,
                                    duration=args.duration, concurrency=concurrency)
                results.append(run.report(serial=name == "serial-allow"))
                print(json.dumps(results[-1]), flush=True)
    finally:
        process.terminate()
        process.wait(5)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIOS)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--allow-rate", type=float, default=500.0)
    parser.add_argument("--default-rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    asyncio.run(main(parser.parse_args()))
