"""The callback port over TLS with required client certificates and an allowed-client list."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from identityd.cli.serve import serve_sockets
from identityd.devca.workload import DevCluster
from identityd.keys.certs import CertificateAuthority
from identityd.settings import TLSSettings
from tests.conftest import Pods, make_settings


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


class TLSWorld:
    def __init__(self, tmp: Path) -> None:
        self.ca = CertificateAuthority("identityd test CA")
        self.client_ca = CertificateAuthority("ZTS client CA")
        server = self.ca.issue("sys.auth.k8s", dns=["localhost"], ips=["127.0.0.1"], usage="server")
        self.tmp = tmp
        self.ca_file = write(tmp / "ca.pem", self.ca.cert_pem)
        self.server_cert = write(tmp / "server.pem", server.cert_pem)
        self.server_key = write(tmp / "server.key", server.key_pem)
        self.client_ca_file = write(tmp / "client-ca.pem", self.client_ca.cert_pem)

    def client_context(
        self, ca: CertificateAuthority | None, cn: str = "zts.athenz.io"
    ) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if ca is not None:
            issued = ca.issue(cn, usage="client")
            ctx.load_cert_chain(
                write(self.tmp / f"{cn}.pem", issued.cert_pem),
                write(self.tmp / f"{cn}.key", issued.key_pem),
            )
        return ctx


@pytest.fixture
async def tls_server(
    cluster: DevCluster, pods: Pods, tmp_path: Path
) -> AsyncIterator[tuple[int, TLSWorld]]:
    world = TLSWorld(tmp_path)
    settings = make_settings(cluster, tmp_path)
    settings = replace(
        settings,
        tls=TLSSettings(
            cert=world.server_cert,
            key=world.server_key,
            client_ca=world.client_ca_file,
            allowed_clients=("zts.athenz.io", "spiffe://athenz/sa/zts"),
        ),
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    stop = asyncio.Event()
    task = asyncio.create_task(serve_sockets(settings, sock, None, stop))
    port = sock.getsockname()[1]
    ctx = world.client_context(world.client_ca)
    for _ in range(100):
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"https://localhost:{port}/readyz", ssl=ctx) as resp,
            ):
                if resp.status == 200:
                    break
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
    try:
        yield port, world
    finally:
        stop.set()
        await task
        sock.close()


async def post(port: int, ctx: ssl.SSLContext, body: object) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"https://localhost:{port}/instance", json=body, ssl=ctx) as resp,
    ):
        return resp.status, await resp.json()


async def test_allowed_client_certificate_gets_a_decision(
    tls_server: tuple[int, TLSWorld], cluster: DevCluster, pods: Pods
) -> None:
    port, world = tls_server
    status, answer = await post(
        port, world.client_context(world.client_ca), cluster.confirmation(pods.api)
    )
    assert status == 200, answer


async def test_server_certificate_cn_is_the_provider_name(tls_server: tuple[int, TLSWorld]) -> None:
    port, world = tls_server
    ctx = world.client_context(world.client_ca)
    _, writer = await asyncio.open_connection("localhost", port, ssl=ctx)
    cert = writer.get_extra_info("peercert")
    writer.close()
    await writer.wait_closed()
    subject = dict(item for rdn in cert["subject"] for item in rdn)
    assert subject["commonName"] == "sys.auth.k8s"


async def test_client_certificate_not_in_allowed_list_is_denied(
    tls_server: tuple[int, TLSWorld], cluster: DevCluster, pods: Pods
) -> None:
    port, world = tls_server
    ctx = world.client_context(world.client_ca, cn="mallory.example")
    status, answer = await post(port, ctx, cluster.confirmation(pods.api))
    assert (status, answer["message"]) == (403, "CLIENT_NOT_ALLOWED")


@pytest.mark.parametrize("which", ["no certificate", "certificate from another CA"])
async def test_handshake_fails_without_a_trusted_client_certificate(
    tls_server: tuple[int, TLSWorld], cluster: DevCluster, pods: Pods, which: str
) -> None:
    port, world = tls_server
    ca = None if which == "no certificate" else CertificateAuthority("rogue CA")
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        await post(port, world.client_context(ca), cluster.confirmation(pods.api))
    # and the server still serves the legitimate CA
    status, _ = await post(
        port, world.client_context(world.client_ca), cluster.confirmation(pods.api)
    )
    assert status == 200
