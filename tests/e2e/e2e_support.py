"""The local stack for end-to-end tests: identityd (real, mTLS) + dev CA + agents.

Pods that should be allowed have IP 127.0.0.1: the dev CA reports the agent's
TCP address as clientIP, and every connection here comes from loopback.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from identityd.cli.serve import serve_sockets
from identityd.devca.ca import DevCA
from identityd.devca.stack import LocalStack, StackOptions
from identityd.devca.workload import DevCluster, DevPod
from identityd.keys.ca_pem import CertFacts, cert_facts
from identityd.sia.config import AgentConfig, add_arguments, config_from_args
from tests.conftest import POLICIES

LOOPBACK = "127.0.0.1"


@dataclass
class World:
    stack: LocalStack
    cluster: DevCluster
    api: DevPod  # sports-web/api-1 on 127.0.0.1: the legitimate workload
    other: DevPod  # sports-web/api-2 on 10.1.2.4: same service, another address
    billing: DevPod  # payments/billing-0 on 127.0.0.1: another service

    @property
    def ca(self) -> DevCA:
        if self.stack.devca is None or self.stack.devca.ca is None:
            raise RuntimeError("the stack is not running")
        return self.stack.devca.ca

    def invocation(self, pod: DevPod, **kwargs: Any) -> tuple[list[str], dict[str, str]]:
        return self.stack.agent_invocation(pod, **kwargs)

    def config(
        self,
        pod: DevPod,
        *,
        name: str | None = None,
        token: str | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        **overrides: Any,
    ) -> AgentConfig:
        """The agent's configuration exactly as its command line would build it."""
        argv, pod_env = self.stack.agent_invocation(
            pod, name=name, token=token, env=env, extra_args=extra_args
        )
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        config = config_from_args(parser.parse_args(argv), pod_env)
        return dataclasses.replace(config, **overrides)

    def certs(self, name: str) -> Path:
        return self.stack.pod_dir(name) / "certs"

    def cert(self, name: str) -> CertFacts:
        return cert_facts(
            x509.load_pem_x509_certificate((self.certs(name) / "cert.pem").read_bytes())
        )


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@asynccontextmanager
async def running_world(workdir: Path, options: StackOptions | None = None) -> AsyncIterator[World]:
    cluster = DevCluster()
    api = cluster.add_pod("sports-web", "api-1", "api", LOOPBACK)
    other = cluster.add_pod("sports-web", "api-2", "api", "10.1.2.4")
    billing = cluster.add_pod("payments", "billing-0", "billing", LOOPBACK, node="node-2")
    async with LocalStack(
        cluster,
        serve_identityd=serve_sockets,
        policies=POLICIES,
        workdir=workdir,
        options=options,
    ) as stack:
        yield World(stack, cluster, api, other, billing)
