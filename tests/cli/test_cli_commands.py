"""`identityd decide`, `policy test` and `demo` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from identityd.cli.main import main
from identityd.devca.workload import DevCluster
from tests.conftest import POLICIES, REPO, Pods


def server_args(cluster: DevCluster, tmp_path: Path) -> list[str]:
    pods, jwks = cluster.write(tmp_path)
    return [
        "--pods",
        str(pods),
        "--jwks",
        str(jwks),
        "--policies",
        str(POLICIES),
        "--provider",
        cluster.provider,
        "--issuer",
        cluster.issuer.issuer,
        "--audience",
        cluster.audience,
        "--dns-suffix",
        cluster.dns_suffix,
    ]


def decide(
    tmp_path: Path, cluster: DevCluster, body: object, *extra: str
) -> tuple[int, dict[str, object]]:
    request = tmp_path / "request.json"
    request.write_text(body if isinstance(body, str) else json.dumps(body))
    argv = ["decide", "--request", str(request), *extra, *server_args(cluster, tmp_path)]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, json.loads(out.getvalue())


def test_decide_allow_exits_0(tmp_path: Path, cluster: DevCluster, pods: Pods) -> None:
    code, doc = decide(tmp_path, cluster, cluster.confirmation(pods.api))
    assert code == 0
    assert doc["allow"] is True and doc["attributes"]["certRefresh"] == "true"


def test_decide_deny_exits_3_with_reasons(tmp_path: Path, cluster: DevCluster, pods: Pods) -> None:
    code, doc = decide(tmp_path, cluster, cluster.confirmation(pods.api, san_ip=[pods.other.ip]))
    assert code == 3
    assert doc["allow"] is False
    assert any(r.startswith("SAN_IP_NOT_ALLOWED") for r in doc["reasons"])  # type: ignore[union-attr]


def test_decide_bad_input_exits_2(tmp_path: Path, cluster: DevCluster, pods: Pods) -> None:
    code, doc = decide(tmp_path, cluster, "{nope")
    assert code == 2
    assert doc["reasons"][0].startswith("BAD_JSON")  # type: ignore[index]


def test_decide_at_a_past_time_accepts_an_old_token(
    tmp_path: Path, cluster: DevCluster, pods: Pods
) -> None:
    old = time.time() - 86400
    body = cluster.confirmation(pods.api, token=cluster.token(pods.api, now=old))
    assert decide(tmp_path, cluster, body)[0] == 3
    assert decide(tmp_path, cluster, body, "--at", str(old + 60))[0] == 0


def test_missing_jwks_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    request = tmp_path / "r.json"
    request.write_text("{}")
    assert main(["decide", "--request", str(request), "--pods", "x"]) == 2
    assert "--jwks" in capsys.readouterr().err


def test_policy_test_passes_on_defaults_and_fails_on_a_broken_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "test", str(POLICIES)]) == 0
    import shutil

    copy = tmp_path / "policies"
    shutil.copytree(POLICIES, copy)
    (copy / "tests" / "zz_wrong.yaml").write_text(
        "cases:\n  - name: wrong expectation\n    base: allow\n    expect: {allow: false, "
        "reasons: [POD_NOT_FOUND]}\n"
    )
    assert main(["policy", "test", str(copy)]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_exits_0_and_prints_each_decision() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "identityd.cli.main", "demo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALLOW 200  legitimate pod" in proc.stdout
    for code in (
        "INSTANCE_ID_MISMATCH",
        "SAN_DNS_NOT_ALLOWED",
        "SAN_IP_NOT_ALLOWED",
        "TOKEN_EXPIRED",
        "TOKEN_ALG_NOT_ALLOWED",
    ):
        assert code in proc.stdout
    assert "UNEXPECTED" not in proc.stdout
