"""Prometheus metrics, created per registry (no module-level metric objects).

With several worker processes the supervisor sets ``PROMETHEUS_MULTIPROC_DIR``
before any worker starts; prometheus_client then keeps values in shared files
and :func:`render` aggregates every worker's values, whichever worker is scraped.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client import values as prom_values

# Decisions are expected in ~1 ms; the CA gives up at 30 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "multiprocess_enabled", "render"]


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def enable_multiprocess(directory: str) -> None:
    """Switch prometheus_client to shared-file values; call before any worker starts.

    prometheus_client picks its value class when first imported, which happened
    before the supervisor knew it would fork, so pick again.
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    prom_values.ValueClass = prom_values.get_value_class()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "identityd_decisions_total",
            "Callback answers by kind and result (allow, deny, bad_request, unavailable, "
            "error, client_closed: the client left before its answer).",
            ["kind", "result"],
            registry=r,
        )
        self.reasons = Counter(
            "identityd_decision_reasons_total",
            "Reason codes of denied or failed callbacks.",
            ["code"],
            registry=r,
        )
        self.latency = Histogram(
            "identityd_decision_seconds",
            "Time to answer a callback.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "identityd_stage_seconds",
            "Time per pipeline stage (token, csr, inventory, policy).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.policy_undefined = Counter(
            "identityd_policy_undefined_total",
            "Decisions the policy left undefined (always denied).",
            registry=r,
        )
        self.inventory_pods = Gauge(
            "identityd_inventory_pods",
            "Pods in the inventory.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.policy_loads = Counter(
            "identityd_policy_loads_total",
            "Policy set loads by result.",
            ["result"],
            registry=r,
        )
        self.policy_status_writes = Counter(
            "identityd_policy_status_writes_total",
            "kube-mgmt-status annotations written back to policy ConfigMaps, by result "
            "(ok, error: the PATCH failed and is retried).",
            ["result"],
            registry=r,
        )
        # livesum: the workers of this pod that lead (0 or 1 with one Lease).
        self.policy_status_leader = Gauge(
            "identityd_policy_status_leader",
            "1 while this process holds the Lease that lets it write policy status.",
            multiprocess_mode="livesum",
            registry=r,
        )


def render(metrics: Metrics) -> bytes:
    """The exposition text: every worker's values under multiprocess mode."""
    if multiprocess_enabled():
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(metrics.registry)
