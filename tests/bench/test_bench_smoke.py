"""Each benchmark under bench/ run briefly, as its docstring shows, so none rots between
the runs whose figures go into docs/benchmarks.md. These check that a benchmark still
runs end to end and reports what it claims to measure, with no error; the figures
themselves are the benchmarks' business (not judged here: a smoke run is too short)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def last_json(text: str) -> Any:
    """The JSON document a benchmark prints last (after any progress lines)."""
    start = text.rindex("\n{") + 1 if "\n{" in text else text.index("{")
    return json.loads(text[start:])


def test_load_rate_reports_latency_from_schedule_and_dispatch_and_the_stages() -> None:
    result = last_json(
        run("load.py", "--mode", "rate", "--rate", "200", "--duration", "1",
            "--pods", "20", "--requests", "500").stdout
    )
    assert result["statuses"] == {"200": result["requests"]} and result["requests"] == 200
    assert 0 < result["from_dispatch_ms"]["p50"] <= result["p99_ms"]
    assert result["generator_lag_ms"]["p99"] >= 0
    stages = result["server_breakdown_ms"]
    assert stages["policy_ms"] > 0 and stages["handler_ms"] >= stages["policy_ms"]
    assert result["outside_handler_ms"] > 0  # HTTP and loopback, at this rate


def test_load_max_reports_throughput() -> None:
    result = last_json(
        run("load.py", "--mode", "max", "--duration", "1", "--pods", "20",
            "--requests", "800", "--concurrency", "4").stdout
    )
    assert result["throughput_per_s"] > 0
    assert set(result["statuses"]) == {"200"}


def test_policy_eval_reports_each_input() -> None:
    out = run("policy_eval.py", "-n", "20").stdout
    for name in ("allow, with CSR", "allow, no CSR", "deny, many reasons"):
        assert name in out
    assert "microseconds per decision" in out


def test_opa_hop_splits_each_decision_against_the_double(tmp_path: Path) -> None:
    out = tmp_path / "hop.json"
    run("opa_hop.py", "--scenario", "serial-allow", "--scenario", "floor",
        "--duration", "1", "--runs", "1", "--out", str(out))
    serial, floor = json.loads(out.read_text())["median"]
    assert serial["errors"] == 0 and serial["decisions"] > 0
    hop = serial["hop_ms"]["p50"]
    assert hop == pytest.approx(
        serial["identityd_side_ms"]["p50"] + serial["server_http_ms"]["p50"], abs=0.2
    )
    assert floor["round_trips"] > 0


def test_inventory_sync_syncs_every_pod_and_measures_lag() -> None:
    result = last_json(
        run("inventory_sync.py", "--pods", "500", "--rate", "100", "--duration", "1",
            "--burst", "0.5").stdout
    )
    assert result["synced_pods"] == 500
    assert result["paced"]["events"] == 100 and result["paced"]["lag_p99_ms"] >= 0


def test_soak_checks_every_answer_and_holds_its_targets(tmp_path: Path) -> None:
    run("soak.py", "--minutes", "0.05", "--rate", "100", "--pods", "50",
        "--background-pods", "50", "--deleted-pods", "5", "--warmup", "20",
        "--prefill-seconds", "2", "--out-dir", str(tmp_path))
    (report,) = tmp_path.glob("soak-*.json")
    result = json.loads(report.read_text())
    checks = result["checks"]
    assert checks["sent"] > 0 and checks["errors"] == 0
    assert checks["wrong_decisions"] == 0 and checks["forged_allowed"] == 0
    assert result["targets_missed"] == []
