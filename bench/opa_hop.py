"""The cost of the HTTP hop to OPA: decisions/s and latency through OPAEngine, and the
time per decision spent outside policy evaluation, split between the two processes.

    python bench/opa_hop.py                        # every scenario below, twice, ~2 min
    python bench/opa_hop.py --scenario rate-small --duration 20 --runs 1
    python bench/opa_hop.py --out bench/results/opa-hop.json
    python bench/opa_hop.py --url http://127.0.0.1:8181   # a real OPA instead of the double

The OPA REST double (tests/doubles/opa_server.py) runs in its own process, as a sidecar
would; this process drives ``OPAEngine.evaluate``. The engine is built with
``on_metrics``, so every decision is asked with ``?metrics=true`` and its answer carries
the server's own timers (OPA's names; a real OPA gives the same ones). The engine in
production never asks for them. Per decision, in ms:

    latency        from the call of OPAEngine.evaluate to its return
    handler        timer_server_handler_ns: the server's whole handling of the request.
                   The double's runs from the request's first bytes being read off the
                   socket (its aiohttp parsing counts) to the answer being ready (only
                   serializing it is left); OPA's from its handler's entry (Go has
                   parsed the head) to the end of evaluation
    evaluation     timer_rego_input_parse_ns + timer_rego_query_eval_ns: decoding the
                   input and evaluating the query (in the double: JSON decoding, regopy
                   parsing the input into its terms, the query; work an embedded engine
                   does too, but the JSON decoding)
    hop            latency - evaluation: all the time outside evaluation (the issue's
                   measure), = identityd side + server HTTP
    identityd side latency - handler: what identityd and the loopback add: identityd
                   encoding the input (once), the aiohttp client writing the request and
                   reading the answer, decoding and checking it, the engine's
                   bookkeeping, the kernel's loopback both ways and the wake-ups. Also
                   on the server, what runs outside its timer: writing the answer
                   (~0.05 ms in the double's aiohttp, measured; less in OPA's Go), and
                   under load the wait of a request not yet read off the socket. This
                   part remains with a real OPA.
    server HTTP    handler - evaluation: the server's own HTTP and JSON handling inside
                   its handler (the double's Python; a real OPA does this in Go)

Each is reported per decision (mean, p50, p99, max): exact per decision whatever the
overlap, since every answer carries its own timers. Besides, CPU per decision:
``client_cpu_ms`` (this process: identityd's engine, and in open loop the load
generator's few µs), and with the double ``server_cpu_ms`` (the double's process, from
its /_double/stats).

Scenarios (policy, input document, load):
  serial-allow   one-rule policy, the real `allow` input (~2 KB), one decision at a
                 time: nothing queues, the identityd side is identityd's and the
                 loopback's cost alone
  rate-small     one-rule policy, a ~100-byte input, open loop at --rate (1,000/s): the
                 hop at the target rate. (With the 2 KB input, regopy spends ~0.75 ms
                 parsing the input alone, so the double saturates near 850/s on this
                 machine and its queue would swamp the hop.)
  rate-allow     one-rule policy, the real input, open loop at --allow-rate (500/s)
  max-allow      one-rule policy, the real input, --concurrency in flight: most
                 decisions/s; the double's queue then shows in its handler time (once
                 a request is read) and on the identityd side (before)
  rate-default   the default policies and the real input at --default-rate (100/s):
                 regopy needs ~2 ms per decision on them
  floor          not a decision: `GET /health` one at a time on an aiohttp session,
                 the least an HTTP round trip between these two processes costs

Open loop: each decision is started at its scheduled time (``start_lag_ms``: how late
the load generator's timer fired) and ``latency_from_schedule_ms`` also counts that lag
and any client-side queueing, so a stall cannot hide; the split uses the latency from
the call. The machine's other load shows in every figure: the load average is
recorded before and after; run it on an idle machine, and more than once (``--runs``;
the summary holds the median of each figure over the runs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
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

# The OPA timers of the decision being evaluated in this task (see OPAEngine.on_metrics).
_TIMERS: contextvars.ContextVar[list[Mapping[str, Any]]] = contextvars.ContextVar("timers")


def collect_timers(metrics: Mapping[str, Any]) -> None:
    box = _TIMERS.get(None)
    if box is not None:
        box.append(metrics)


@dataclass
class Sample:
    latency: float  # ms, call to return
    lag: float  # ms, scheduled time to call (open loop), else 0
    handler: float
    evaluation: float
    input_parse: float
    query_eval: float


@dataclass
class Run:
    name: str
    open_loop: bool
    seconds: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None

    def report(self) -> dict[str, Any]:
        s, n = self.samples, len(self.samples)
        out: dict[str, Any] = {
            "scenario": self.name,
            "decisions": n,
            "errors": self.errors,
            "decisions_per_s": round(n / self.seconds, 1),
            "latency_ms": _summary([x.latency for x in s]),
        }
        if self.open_loop:
            out["latency_from_schedule_ms"] = _summary([x.lag + x.latency for x in s])
            out["start_lag_ms"] = _summary([x.lag for x in s])
        out |= {
            "handler_ms": _summary([x.handler for x in s]),
            "evaluation_ms": _summary([x.evaluation for x in s]),
            "input_parse_ms": _summary([x.input_parse for x in s]),
            "query_eval_ms": _summary([x.query_eval for x in s]),
            "hop_ms": _summary([x.latency - x.evaluation for x in s]),
            "identityd_side_ms": _summary([x.latency - x.handler for x in s]),
            "server_http_ms": _summary([x.handler - x.evaluation for x in s]),
            "client_cpu_ms": round(self.client_cpu_s / n * 1e3, 3),
        }
        if self.server_cpu_s is not None:
            out["server_cpu_ms"] = round(self.server_cpu_s / n * 1e3, 3)
        return out


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 3)

    return {"mean": round(statistics.fmean(ordered), 3), "p50": pct(50), "p99": pct(99),
            "max": round(ordered[-1], 3)}


def _ms(metrics: Mapping[str, Any], name: str) -> float:
    value = metrics.get(name, 0)
    return float(value) / 1e6 if isinstance(value, int | float) else 0.0


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
    name: str, engine: OPAEngine, url: str, doc: dict[str, Any], *, double: bool,
    rate: float | None, duration: float, concurrency: int = 1,
) -> Run:
    for _ in range(300):  # warm up: connection pool, the server's query cache, code paths
        await engine.evaluate(doc)
    if double:
        await asyncio.to_thread(double_call, url, "/_double/reset", "POST")
    run = Run(name, open_loop=rate is not None)

    async def one(scheduled: float | None) -> None:
        box: list[Mapping[str, Any]] = []
        _TIMERS.set(box)  # this task's own: each decision runs in its own task or worker
        called = time.perf_counter()
        try:
            await engine.evaluate(doc)
        except Exception:
            run.errors += 1
            return
        done = time.perf_counter()
        timers = box[-1] if box else {}
        input_parse = _ms(timers, "timer_rego_input_parse_ns")
        query_eval = _ms(timers, "timer_rego_query_eval_ns")
        run.samples.append(Sample(
            latency=(done - called) * 1e3,
            lag=(called - scheduled) * 1e3 if scheduled is not None else 0.0,
            handler=_ms(timers, "timer_server_handler_ns"),
            evaluation=input_parse + query_eval, input_parse=input_parse, query_eval=query_eval,
        ))

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
                await one(None)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.seconds = time.perf_counter() - started
    run.client_cpu_s = time.process_time() - cpu
    if double:
        stats = await asyncio.to_thread(double_call, url, "/_double/stats")
        run.server_cpu_s = float(stats["cpu_seconds"])
    return run


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


@dataclass
class Loaded:
    policies: str = ""  # which set OPA holds: "tiny" or "default"


async def one_pass(args: argparse.Namespace, engine: OPAEngine, url: str, *, double: bool,
                   loaded: Loaded) -> list[dict[str, Any]]:
    allow = load_bases(REPO / "policies" / "tests" / "_bases.yaml")["allow"]
    results: list[dict[str, Any]] = []
    for name in args.scenario or SCENARIOS:
        if name == "floor":
            results.append(await floor(url, args.duration))
            print(json.dumps(results[-1]), flush=True)
            continue
        wanted = "default" if name == "rate-default" else "tiny"
        if loaded.policies != wanted:
            await engine.load(load_policy_dir(REPO / "policies") if wanted == "default"
                              else {"bench/tiny.rego": TINY})
            loaded.policies = wanted
        doc = SMALL if name == "rate-small" else allow
        rate = {"rate-small": args.rate, "rate-allow": args.allow_rate,
                "rate-default": args.default_rate}.get(name)
        concurrency = args.concurrency if name == "max-allow" else 1
        label = f"{name}@{rate:g}/s" if rate else (
            f"{name}x{concurrency}" if concurrency > 1 else name)
        run = await measure(label, engine, url, doc, double=double, rate=rate,
                            duration=args.duration, concurrency=concurrency)
        body = json.dumps({"input": doc}, separators=(",", ":"))
        results.append(run.report() | {"input_bytes": len(body),
                                       "loadavg_1m_after": round(os.getloadavg()[0], 2)})
        print(json.dumps(results[-1]), flush=True)
    return results


def medians(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per scenario, the median of every figure over the runs."""
    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, dict):
            return {k: merge([v[k] for v in values]) for k in first}
        if isinstance(first, bool) or not isinstance(first, int | float):
            return first
        return round(statistics.median(values), 3)

    return [merge([run[i] for run in runs]) for i in range(len(runs[0]))]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    double = args.url is None
    process, url = start_double() if double else (None, args.url.rstrip("/"))
    load_before = os.getloadavg()
    runs: list[list[dict[str, Any]]] = []
    try:
        async with OPAEngine(url, timeout=2.0, on_metrics=collect_timers) as engine:
            loaded = Loaded()
            for i in range(args.runs):
                print(f"# run {i + 1} of {args.runs}", flush=True)
                runs.append(await one_pass(args, engine, url, double=double, loaded=loaded))
    finally:
        if process is not None:
            process.terminate()
            process.wait(5)
    return {
        "server": "OPA REST double (tests/doubles/opa_server.py)" if double else url,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "aiohttp": aiohttp.__version__, "platform": platform.platform()},
        "duration_s": args.duration,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "median": medians(runs),
        "runs": runs,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIOS)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--allow-rate", type=float, default=500.0)
    parser.add_argument("--default-rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2, help="passes over the scenarios")
    parser.add_argument("--url", help="a running OPA to measure instead of the double")
    parser.add_argument("--out", type=Path, help="write the results (JSON) here")
    arguments = parser.parse_args()
    report = asyncio.run(main(arguments))
    print(json.dumps({"median": report["median"]}, indent=1), flush=True)
    if arguments.out is not None:
        arguments.out.write_text(json.dumps(report, indent=1) + "\n")
