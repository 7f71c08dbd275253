"""Per-decision latency of the embedded policy engine on the default policies.

    python bench/policy_eval.py                      # 2,000 decisions per input
    python bench/policy_eval.py -n 5000 --policies policies
    python bench/policy_eval.py --json-input         # hand regopy the input as JSON text

Three inputs from policies/tests/_bases.yaml: a legitimate request with a CSR,
the same without a CSR, and one that fails many checks at once. For each it
reports two latencies:

- ``core``: what the engine does per decision on its threads, back to back and
  in-line: build the input (C input API, or JSON text), evaluate the bundle
  entry point, read and parse the output, validate the decision. This is the
  policy evaluation proper.
- ``evaluate()``: ``await engine.evaluate(doc)`` from an event loop, adding the
  hop to the engine's worker thread and back.

The two are measured in alternating blocks so machine noise hits both alike.
Percentiles are over single decisions; nothing else runs in the process.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from identityd.policy.base import decision_from_document  # noqa: E402
from identityd.policy.cases import deep_merge, load_bases  # noqa: E402
from identityd.policy.embedded import EmbeddedEngine, _query  # noqa: E402
from identityd.policy.sources import load_policy_dir  # noqa: E402

# Fails the pod, node, refresh, key and SAN checks together (policies/tests/input.yaml).
MULTI_DENY_PATCH: dict[str, Any] = {
    "kind": "refresh",
    "pod": {"phase": "Failed", "terminating": True, "labels": {"identityd.io/refresh": "false"}},
    "token": {"node": {"name": "node-9"}},
    "csr": {"key_type": "RSA", "key_bits": 1024, "curve": "", "other_sans": ["email:x@x.io"]},
    "key": {"key_type": "RSA", "key_bits": 1024, "curve": ""},
    "request": {"attributes": {"sanDNS": ["api.sports-web.k8s.example.com", "evil.example.com"]}},
}


def inputs(policies: Path) -> dict[str, dict[str, Any]]:
    bases = load_bases(policies / "tests" / "_bases.yaml")
    return {
        "allow, with CSR": bases["allow"],
        "allow, no CSR": bases["allow_no_csr"],
        "deny, many reasons": deep_merge(bases["allow"], MULTI_DENY_PATCH),
    }


def percentile(sorted_us: list[float], fraction: float) -> float:
    index = min(len(sorted_us) - 1, max(0, round(fraction * (len(sorted_us) - 1))))
    return sorted_us[index]


def core_call(engine: EmbeddedEngine, doc: dict[str, Any]) -> Callable[[], object]:
    """One decision the way the engine makes it, minus the thread hop."""
    compiled = engine._compiled
    if compiled is None:
        raise RuntimeError("load a policy set first")

    def decide() -> object:
        return decision_from_document(_query(compiled, engine._c, engine._prepare(doc)))

    return decide


async def measure(
    engine: EmbeddedEngine, doc: dict[str, Any], iterations: int, block: int
) -> tuple[list[float], list[float]]:
    decide = core_call(engine, doc)
    for _ in range(50):  # warm caches and the worker thread
        decide()
        await engine.evaluate(doc)
    core: list[float] = []
    full: list[float] = []
    clock = time.perf_counter_ns
    while len(core) < iterations:
        for _ in range(block):
            start = clock()
            decide()
            core.append((clock() - start) / 1000)
        for _ in range(block):
            start = clock()
            await engine.evaluate(doc)
            full.append((clock() - start) / 1000)
    return sorted(core[:iterations]), sorted(full[:iterations])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--iterations", type=int, default=2000)
    parser.add_argument("--policies", type=Path, default=REPO / "policies")
    parser.add_argument(
        "--json-input", action="store_true", help="the reference input path, for comparison"
    )
    args = parser.parse_args()

    async with EmbeddedEngine(native_input=not args.json_input) as engine:
        await engine.load(load_policy_dir(args.policies))
        path = "C input API" if engine.native_input else "JSON text"
        print(f"embedded engine (regopy), input via {path}, {args.iterations} decisions each\n")
        header = f"{'input':20s} {'decision':34s} {'':12s} {'p50':>7s} {'p99':>7s} {'mean':>7s}"
        print(header)
        print("-" * len(header))
        for label, doc in inputs(args.policies).items():
            decision = await engine.evaluate(doc)
            summary = "allow" if decision.allow else "deny " + ",".join(sorted(set(decision.codes)))
            core, full = await measure(engine, doc, args.iterations, block=50)
            for name, values in (("core", core), ("evaluate()", full)):
                print(
                    f"{label:20s} {summary[:34]:34s} {name:12s} "
                    f"{percentile(values, 0.5):7.0f} {percentile(values, 0.99):7.0f} "
                    f"{statistics.fmean(values):7.0f}"
                )
                label, summary = "", ""
        print("\nmicroseconds per decision")


if __name__ == "__main__":
    asyncio.run(main())
