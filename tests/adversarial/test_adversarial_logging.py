"""`identityd serve` as a real process: requests the HTTP parser refuses (framing lies)
never put the bearer token they carry into the process's logs; clients that go away
mid-body are one decision record each, not a traceback and a fake 500.

aiohttp logs a framing error at ERROR with the exception, and the exception's
message quotes the offending request bytes: a whole token when the body holds one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from identityd.devca.workload import DevCluster
from tests.adversarial.adversarial_disconnects import disconnect, disconnects
from tests.adversarial.adversarial_world import build_world, raw_request
from tests.conftest import POLICIES, REPO

pytestmark = pytest.mark.slow

LOG_FIX = (
    "aiohttp.server logs framing errors with the request bytes (a whole token): "
    "cli/serve.py configure_logging must attach a filter to logger 'aiohttp.server' "
    "that drops exc_info (keeping the exception type name)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise AssertionError("identityd serve exited before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("identityd serve did not become ready")


@contextlib.contextmanager
def _serve(cluster: DevCluster, directory: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    pods, jwks = cluster.write(directory)
    port = _free_port()
    env = {
        **os.environ,
        "IDENTITYD_JWKS": str(jwks),
        "IDENTITYD_PODS": str(pods),
        "IDENTITYD_POLICIES": str(POLICIES),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "identityd.cli.main",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--log-level",
            "INFO",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_ready(port, proc)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, DevCluster]]:
    cluster = DevCluster()
    cluster.add_pod("sports-web", "api-1", "api", "10.1.2.3")
    with _serve(cluster, tmp_path) as (proc, port):
        yield proc, port, cluster


def _send(port: int, message: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(message)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_framing_errors_never_log_the_token(
    served: tuple[subprocess.Popen[bytes], int, DevCluster],
) -> None:
    proc, port, cluster = served
    body = cluster.confirmation(cluster.pods[0], csr=False)
    token = body["attestationData"]
    raw = json.dumps(body).encode()
    for headers in (
        {"Content-Length": "10"},  # data after Connection: close
        {"Content-Length": "10", "Connection": "keep-alive"},  # the rest parsed as a request
    ):
        answer = _send(port, raw_request("/instance", raw, headers=headers)[0])
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n", 1)[0]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    logs = (out + err).decode("utf-8", "replace")
    assert "Error handling request" in logs  # the framing errors were logged ...
    signature = token.split(".")[2]
    assert signature[:24] not in logs  # ... without the token
    assert token.split(".")[1][:24] not in logs


# Each disconnect case this many times: a flood in miniature.
DISCONNECT_ROUNDS = 5


def test_clients_gone_mid_body_are_records_not_tracebacks(tmp_path: Path) -> None:
    """The red team's finding, end to end: before, each of these was an ERROR
    "unexpected error" with a 21-line traceback on stderr and a decision record
    "decision":"error","status":500 on stdout, counted as an error in the metrics."""
    world = build_world(DevCluster())
    cases = disconnects()
    with _serve(world.cluster, tmp_path) as (proc, port):

        async def flood() -> None:
            for _ in range(DISCONNECT_ROUNDS):
                for case in cases:
                    assert await disconnect(port, case.build(world, "gone"), case.how) == b""

        asyncio.run(flood())
        legit = json.dumps(world.confirmation(csr=False)).encode()
        assert b" 200 " in _send(port, raw_request("/instance", legit)[0]).split(b"\r\n", 1)[0]
        time.sleep(0.2)  # the last reset may still be on its way to the handler
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    gone = [r for r in records if r["request_id"] == "gone"]
    assert len(gone) == DISCONNECT_ROUNDS * len(cases)
    assert {(r["decision"], r["status"]) for r in gone} == {("client_closed", 499)}
    assert [r for r in records if r["decision"] == "error" or r["status"] >= 500] == []
    assert "Traceback" not in stderr and "unexpected error" not in stderr
    assert [line for line in stderr.splitlines() if " ERROR " in line or " WARNING " in line] == []
    expected = f'identityd_decisions_total{{kind="instance",result="client_closed"}} {len(gone)}.0'
    assert expected in metrics
    assert 'result="error"' not in metrics
