"""`identityd demo`: the callback server on loopback with generated keys, pods and the
default policies; one legitimate request and several forged ones, each decision printed.

Exits 0 when every request got the answer it should, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from identityd.cli.serve import configure_logging, serve_sockets
from identityd.devca.stack import run_stack
from identityd.devca.workload import DevCluster, DevPod
from identityd.sia.main import agent_once


@dataclass(frozen=True)
class Scenario:
    title: str
    kind: str
    body: dict[str, Any]
    expect_status: int
    expect_code: str | None  # a reason code the answer must carry


def default_policies() -> Path:
    here = Path("policies")
    if (here / "identityd").is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "policies"


def _alg_none(token: str) -> str:
    """The same claims, unsigned, with ``alg: none``."""
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return header.decode().rstrip("=") + "." + token.split(".")[1] + "."


def scenarios(cluster: DevCluster, api: DevPod, other: DevPod, gone: DevPod) -> list[Scenario]:
    now = time.time()
    ident = cluster.identity(api)
    foreign_dns = f"billing.payments.{cluster.dns_suffix}"
    forged: list[tuple[str, Callable[[], dict[str, Any]], int, str]] = [
        (
            "another pod's uid as instanceId",
            lambda: cluster.confirmation(api, attributes={"instanceId": other.uid}),
            403,
            "INSTANCE_ID_MISMATCH",
        ),
        (
            "a SAN DNS name of another service",
            lambda: cluster.confirmation(api, san_dns=[ident.service_dns, foreign_dns]),
            403,
            "SAN_DNS_NOT_ALLOWED",
        ),
        (
            "the IP of another pod",
            lambda: cluster.confirmation(api, san_ip=[other.ip]),
            403,
            "SAN_IP_NOT_ALLOWED",
        ),
        (
            "an expired token",
            lambda: cluster.confirmation(api, token=cluster.token(api, now=now - 7200)),
            403,
            "TOKEN_EXPIRED",
        ),
        (
            "a token with alg none",
            lambda: cluster.confirmation(api, token=_alg_none(cluster.token(api))),
            403,
            "TOKEN_ALG_NOT_ALLOWED",
        ),
        ("the token of a deleted pod", lambda: cluster.confirmation(gone), 403, "POD_NOT_FOUND"),
        (
            "a domain that is not the pod's namespace",
            lambda: cluster.confirmation(api, domain="payments"),
            403,
            "DOMAIN_MISMATCH",
        ),
    ]
    out = [
        Scenario(
            "legitimate pod, first certificate", "instance", cluster.confirmation(api), 200, None
        ),
        Scenario("legitimate pod, refresh", "refresh", cluster.confirmation(api), 200, None),
    ]
    out += [Scenario(t, "instance", build(), status, code) for t, build, status, code in forged]
    return out


async def _run(policies: Path) -> int:
    cluster = DevCluster()
    api = cluster.add_pod("sports-web", "api-6f7c9", "api", "10.1.2.3")
    other = cluster.add_pod("sports-web", "api-8d2e1", "api", "10.1.2.4")
    cluster.add_pod("payments", "billing-0", "billing", "10.2.0.7", node="node-2")
    gone = DevPod("sports-web", "api-deleted", "api", "10.1.2.9")  # never in the inventory
    with tempfile.TemporaryDirectory(prefix="identityd-demo-") as tmp:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        settings = cluster.settings(tmp, policies=policies, listen=f"127.0.0.1:{port}")
        stop = asyncio.Event()
        server = asyncio.create_task(serve_sockets(settings, sock, None, stop))
        failures = 0
        try:
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as http:
                await _wait_ready(http, base, server)
                print(f"identityd listening on {base}; provider {cluster.provider}\n")
                for sc in scenarios(cluster, api, other, gone):
                    async with http.post(f"{base}/{sc.kind}", json=sc.body) as resp:
                        answer = await resp.json()
                    ok = resp.status == sc.expect_status and (
                        sc.expect_code is None or sc.expect_code in answer.get("message", "")
                    )
                    failures += not ok
                    verdict = "ALLOW" if resp.status == 200 else "DENY "
                    detail = (
                        f"certExpiryTime={answer['attributes'].get('certExpiryTime')}m"
                        if resp.status == 200
                        else answer.get("message")
                    )
                    mark = "ok " if ok else "UNEXPECTED"
                    print(f"[{mark}] {verdict} {resp.status}  {sc.title:<42} {detail}")
        finally:
            stop.set()
            await server
    print(f"\n{'all answers as expected' if not failures else f'{failures} unexpected answers'}")
    return failures


async def _wait_ready(http: aiohttp.ClientSession, base: str, server: asyncio.Task[None]) -> None:
    for _ in range(200):
        if server.done():
            server.result()  # raises the start-up error
        try:
            async with http.get(f"{base}/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("identityd did not become ready")


async def _stack(policies: Path) -> int:
    """Part two: agent → dev CA → identityd (mTLS) → certificate, for a pod and impostors."""
    report = await run_stack(serve_identityd=serve_sockets, run_agent=agent_once, policies=policies)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def demo(policies: str | None) -> int:
    configure_logging("ERROR", stream_names=())
    path = Path(policies) if policies else default_policies()
    print("== 1. The callback: a CA's requests, legitimate and forged ==\n")
    failures = asyncio.run(_run(path))
    print("\n== 2. The whole flow: agent -> dev CA -> identityd (mTLS) -> certificate ==\n")
    failures += asyncio.run(_stack(path))
    return 0 if failures == 0 else 1
