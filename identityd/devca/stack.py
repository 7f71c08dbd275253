"""The whole flow on one machine: dev cluster (token issuer + static pods), identityd with
mTLS, the dev CA, and agents — for the demo and the end-to-end tests.

identityd and the agent are passed in (``serve_identityd`` is
``identityd.cli.serve.serve_sockets``, ``run_agent`` is
``identityd.sia.main.agent_once``): this package sits beside them and must not
import them. Everything listens on 127.0.0.1, so the agent's TCP address — the
``clientIP`` the dev CA reports — is 127.0.0.1, and pods that should be allowed
get that IP.

Certificates: the dev CA's CA signs identityd's server certificate (CN = the
provider name, as ZTS checks), the dev CA's own HTTPS certificate and its
client certificate (CN ``dev-ca.zts``, the one name identityd allows).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from cryptography import x509

from identityd.devca.server import DEFAULT_CLIENT_CN, DevCAServerSettings, DevCAService
from identityd.devca.state import DevCAFiles, issue_to, load_or_create_authority
from identityd.devca.workload import DevCluster, DevPod
from identityd.keys.ca_pem import cert_facts
from identityd.settings import Settings, TLSSettings

ServeIdentityd = Callable[
    [Settings, socket.socket, socket.socket | None, asyncio.Event], Coroutine[Any, Any, None]
]
RunAgent = Callable[[Sequence[str], Mapping[str, str]], Awaitable[tuple[int, str]]]
LOOPBACK = "127.0.0.1"
READY_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class StackOptions:
    # CN of identityd's server certificate; None = the provider name (what ZTS wants).
    provider_cert_cn: str | None = None
    # CN of the client certificate the dev CA presents, and the names identityd allows.
    ca_client_cn: str = DEFAULT_CLIENT_CN
    allowed_clients: tuple[str, ...] = (DEFAULT_CLIENT_CN,)


def _listen() -> socket.socket:
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


class LocalStack:
    """identityd and the dev CA running for ``cluster``; an async context manager.

    Add the cluster's pods before entering: the inventory is written at start."""

    def __init__(
        self,
        cluster: DevCluster,
        *,
        serve_identityd: ServeIdentityd,
        policies: Path,
        workdir: Path,
        options: StackOptions | None = None,
    ) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.options = options or StackOptions()
        self.ca_files = DevCAFiles(workdir / "dev-ca")
        self._serve = serve_identityd
        self._policies = policies
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._socks: list[socket.socket] = []
        self.devca: DevCAService | None = None
        self.identityd_url = ""

    @property
    def ca_url(self) -> str:
        if self.devca is None:
            raise RuntimeError("the stack is not running")
        return self.devca.url

    def identityd_settings(self, port: int) -> Settings:
        server = self.workdir / "identityd"
        return self.cluster.settings(
            self.workdir,
            policies=self._policies,
            tls=TLSSettings(
                cert=str(server / "server.pem"),
                key=str(server / "server.key"),
                client_ca=str(self.ca_files.ca_cert),
                allowed_clients=self.options.allowed_clients,
            ),
            listen=f"{LOOPBACK}:{port}",
        )

    async def __aenter__(self) -> LocalStack:
        try:
            await self._start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _start(self) -> None:
        self.ca_files.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        authority = load_or_create_authority(self.ca_files)
        server = self.workdir / "identityd"
        server.mkdir(exist_ok=True)
        issue_to(
            authority,
            server / "server.pem",
            server / "server.key",
            common_name=self.options.provider_cert_cn or self.cluster.provider,
            usage="server",
            dns=("localhost",),
            ips=(LOOPBACK,),
        )
        identityd_sock, devca_sock = _listen(), _listen()
        self._socks += [identityd_sock, devca_sock]
        port = identityd_sock.getsockname()[1]
        self.identityd_url = f"https://{LOOPBACK}:{port}"
        self.devca = DevCAService(
            DevCAServerSettings(
                state_dir=self.ca_files.directory,
                providers={self.cluster.provider: self.identityd_url},
                client_cn=self.options.ca_client_cn,
                server_ips=(LOOPBACK,),
            ),
            devca_sock,
        )
        await self.devca.__aenter__()
        settings = self.identityd_settings(port)
        self._task = asyncio.create_task(self._serve(settings, identityd_sock, None, self._stop))
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_files.ca_cert))
        ctx.load_cert_chain(self.ca_files.client_cert, self.ca_files.client_key)
        async with asyncio.timeout(READY_TIMEOUT_SECONDS), aiohttp.ClientSession() as http:
            while True:
                if self._task is not None and self._task.done():
                    self._task.result()  # raises identityd's start-up error
                    raise RuntimeError("identityd stopped during start-up")
                try:
                    async with http.get(f"{self.identityd_url}/readyz", ssl=ctx) as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self.devca is not None:
            await self.devca.__aexit__(None, None, None)
        for sock in self._socks:
            sock.close()
        self._socks.clear()

    def pod_dir(self, name: str) -> Path:
        return self.workdir / "pods" / name

    def write_token(self, name: str, token: str) -> Path:
        path = self.pod_dir(name) / "token"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(token)
        tmp.replace(path)  # the kubelet swaps tokens atomically too
        return path

    def agent_invocation(
        self,
        pod: DevPod,
        *,
        name: str | None = None,
        token: str | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> tuple[list[str], dict[str, str]]:
        """argv (without --once) and downward-API environment for an agent in ``pod``;
        ``env`` replaces variables (an impostor's lies), ``token`` the pod's own token."""
        name = name or pod.name
        token_file = self.write_token(name, token if token is not None else self.cluster.token(pod))
        argv = [
            "--ca-url",
            self.ca_url,
            "--ca-bundle",
            str(self.ca_files.ca_cert),
            "--token-file",
            str(token_file),
            "--out-dir",
            str(self.pod_dir(name) / "certs"),
            "--provider",
            self.cluster.provider,
            "--dns-suffix",
            self.cluster.dns_suffix,
            "--trust-domain",
            self.cluster.trust_domain,
            *extra_args,
        ]
        pod_env = {
            "POD_NAMESPACE": pod.namespace,
            "POD_NAME": pod.name,
            "POD_UID": pod.uid,
            "POD_IP": pod.ip,
            "POD_SERVICE_ACCOUNT": pod.service_account,
        }
        pod_env.update(env or {})
        return argv, pod_env


# --- the demo's run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentRun:
    title: str
    expect_issued: bool
    exit_code: int
    message: str
    certificate_pem: bytes | None = None  # read when the run ended: the workdir may be gone

    @property
    def ok(self) -> bool:
        return (self.exit_code == 0) == self.expect_issued

    def lines(self) -> list[str]:
        mark = "ok " if self.ok else "UNEXPECTED"
        verdict = "ISSUED " if self.exit_code == 0 else "REFUSED"
        out = [f"[{mark}] {verdict} {self.title}", f"          {self.message}"]
        if self.exit_code == 0 and self.certificate_pem:
            facts = cert_facts(x509.load_pem_x509_certificate(self.certificate_pem))
            out.append(f"          subject CN={facts.common_name}")
            for kind, values in (("DNS", facts.dns), ("IP", facts.ips), ("URI", facts.uris)):
                if values:
                    out.append(f"          SAN {kind:<3} {', '.join(values)}")
        return out


@dataclass(frozen=True)
class StackReport:
    header: tuple[str, ...]
    runs: tuple[AgentRun, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return all(run.ok for run in self.runs)

    def lines(self) -> list[str]:
        out = [*self.header, ""]
        for run in self.runs:
            out += run.lines()
        verdict = "every agent run ended as expected" if self.ok else "UNEXPECTED results"
        return [*out, "", verdict]


async def run_stack(
    *,
    serve_identityd: ServeIdentityd,
    run_agent: RunAgent,
    policies: Path,
    workdir: Path | None = None,
) -> StackReport:
    """Start everything, run the agent for a legitimate pod (register, then refresh) and
    for two impostors, and report. Printable with ``"\\n".join(report.lines())``."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="identityd-stack-") as tmp:
            return await run_stack(
                serve_identityd=serve_identityd,
                run_agent=run_agent,
                policies=policies,
                workdir=Path(tmp),
            )
    cluster = DevCluster()
    api = cluster.add_pod("sports-web", "api-6f7c9", "api", LOOPBACK)
    billing = cluster.add_pod("payments", "billing-0", "billing", LOOPBACK, node="node-2")
    async with LocalStack(
        cluster, serve_identityd=serve_identityd, policies=policies, workdir=workdir
    ) as stack:
        header = (
            f"dev CA (development only)  {stack.ca_url}",
            f"identityd (provider {cluster.provider}, mTLS, allows {DEFAULT_CLIENT_CN})  "
            f"{stack.identityd_url}",
            f"pods: {api.namespace}/{api.name} (sa {api.service_account}), "
            f"{billing.namespace}/{billing.name} (sa {billing.service_account})",
        )
        runs: list[AgentRun] = []

        async def agent(
            title: str,
            expect: bool,
            pod: DevPod,
            *,
            name: str | None = None,
            env: Mapping[str, str] | None = None,
            extra_args: Sequence[str] = (),
        ) -> None:
            argv, pod_env = stack.agent_invocation(pod, name=name, env=env, extra_args=extra_args)
            code, message = await run_agent(argv, pod_env)
            cert = stack.pod_dir(name or pod.name) / "certs" / "cert.pem"
            pem = cert.read_bytes() if code == 0 and cert.exists() else None
            runs.append(AgentRun(title, expect, code, message, pem))

        await agent(f"legitimate pod {api.namespace}/{api.name}: register", True, api)
        await agent(f"legitimate pod {api.namespace}/{api.name}: refresh over mTLS", True, api)
        await agent(
            f"impostor: pod {billing.namespace}/{billing.name} claims to be "
            f"{api.namespace}/{api.name}",
            False,
            billing,
            name="impostor",
            env={
                "POD_NAMESPACE": api.namespace,
                "POD_NAME": api.name,
                "POD_UID": api.uid,
                "POD_SERVICE_ACCOUNT": api.service_account,
            },
        )
        await agent(
            f"impostor: {api.namespace}/{api.name} asks for a SAN of payments.billing",
            False,
            api,
            name="greedy",
            extra_args=("--extra-dns", f"billing.payments.{cluster.dns_suffix}"),
        )
        return StackReport(header=header, runs=tuple(runs))
