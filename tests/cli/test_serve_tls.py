"""The callback port over TLS with required client certificates and an allowed-client list."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identityd.app import server_ssl_context
from identityd.callback.limits import client_key
from identityd.callback.peer import certificate_valid_now
from identityd.cli import connections
from identityd.cli.serve import serve_sockets
from identityd.cli.tls_reload import TLSFiles
from identityd.devca.workload import DevCluster
from identityd.errors import ConfigError
from identityd.keys.certs import CertificateAuthority
from identityd.settings import LimitSettings, Settings, TLSSettings
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
    async with serving(world, make_settings(cluster, tmp_path)) as port:
        yield port, world


@contextlib.asynccontextmanager
async def serving(
    world: TLSWorld, settings: Settings, reload_seconds: float = 30.0
) -> AsyncIterator[int]:
    """``identityd serve``'s server on TLS with the world's files; its port."""
    settings = replace(
        settings,
        tls=TLSSettings(
            cert=world.server_cert,
            key=world.server_key,
            client_ca=world.client_ca_file,
            allowed_clients=("zts.athenz.io", "spiffe://athenz/sa/zts"),
            reload_seconds=reload_seconds,
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
        yield port
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


# --- hardening (a red team's findings) ---------------------------------------------------


async def test_tls12_cbc_suites_are_refused_and_aead_ones_served(
    tls_server: tuple[int, TLSWorld], cluster: DevCluster, pods: Pods
) -> None:
    port, world = tls_server
    cbc = world.client_context(world.client_ca)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA")
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        await post(port, cbc, cluster.confirmation(pods.api))
    aead = world.client_context(world.client_ca)
    aead.maximum_version = ssl.TLSVersion.TLSv1_2
    status, _ = await post(port, aead, cluster.confirmation(pods.api))
    assert status == 200


async def test_a_tls13_session_is_never_resumed(tls_server: tuple[int, TLSWorld]) -> None:
    # A resumed session is not verified again (check_client checks the dates for that
    # reason: TLS 1.2 may still resume from OpenSSL's session-id cache, which Python
    # cannot switch off); TLS 1.3 gets no tickets at all.
    port, world = tls_server
    ctx = world.client_context(world.client_ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3

    def connect(session: ssl.SSLSession | None) -> tuple[bool, ssl.SSLSession | None]:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            while tls.recv(4096):  # read to the end: TLS 1.3 tickets come after the handshake
                pass
            return bool(tls.session_reused), tls.session

    _, session = await asyncio.to_thread(connect, None)
    reused, _ = await asyncio.to_thread(connect, session)
    assert not reused


def _two_cn_context(world: TLSWorld, tmp: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "mallory.example"),
            x509.NameAttribute(NameOID.COMMON_NAME, "zts.athenz.io"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(world.client_ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(world.client_ca.key, hashes.SHA256())
    )
    ctx = ssl.create_default_context(cafile=world.ca_file)
    ctx.load_cert_chain(
        write(tmp / "two-cn.pem", cert.public_bytes(serialization.Encoding.PEM)),
        write(
            tmp / "two-cn.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
    )
    return ctx


async def test_a_subject_with_two_cns_is_not_allowed(
    tls_server: tuple[int, TLSWorld], cluster: DevCluster, pods: Pods, tmp_path: Path
) -> None:
    # One reader took the last CN (allowed), the rate limiter the first.
    port, world = tls_server
    status, answer = await post(
        port, _two_cn_context(world, tmp_path), cluster.confirmation(pods.api)
    )
    assert (status, answer["message"]) == (403, "CLIENT_NOT_ALLOWED")


def test_two_cns_never_take_another_clients_rate_bucket() -> None:
    cert = {"subject": ((("commonName", "mallory"),), (("commonName", "zts.athenz.io"),))}
    assert client_key(("10.0.0.9", 5000), cert) == "ip:10.0.0.9"
    assert client_key(("10.0.0.9", 5000), {"subject": ((("commonName", "zts"),),)}) == "cn:zts"


def test_a_certificate_is_valid_only_between_its_dates() -> None:
    cert = {"notBefore": "Jan  1 00:00:00 2020 GMT", "notAfter": "Jan  1 00:00:00 2021 GMT"}
    assert certificate_valid_now(cert, now=ssl.cert_time_to_seconds("Jun  1 00:00:00 2020 GMT"))
    assert not certificate_valid_now(cert, now=time.time())  # expired
    assert not certificate_valid_now(cert, now=ssl.cert_time_to_seconds("Jun  1 00:00:00 2019 GMT"))
    assert not certificate_valid_now({"notAfter": cert["notAfter"]})


@pytest.mark.parametrize("names", [("",), ("zts.athenz.io", " "), (" zts.athenz.io",)])
def test_an_empty_or_padded_allowed_client_is_a_configuration_error(
    cluster: DevCluster, tmp_path: Path, names: tuple[str, ...]
) -> None:
    world = TLSWorld(tmp_path)
    tls = TLSSettings(world.server_cert, world.server_key, world.client_ca_file, names)
    with pytest.raises(ConfigError, match="allowed-client"):
        server_ssl_context(replace(make_settings(cluster, tmp_path), tls=tls))


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """How long until the server closes the connection (fails after ``seconds``)."""
    started = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), seconds) == b""
    return time.monotonic() - started


async def test_a_full_cap_of_stuck_handshakes_makes_room_for_the_ca(
    cluster: DevCluster, pods: Pods, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over TLS aiohttp sees a connection only after its handshake: the cap counts at
    # accept(), and a handshake has HANDSHAKE_TIMEOUT_SECONDS. Connections with no
    # certificate could keep the cap full; the oldest handshake makes room.
    monkeypatch.setattr(connections, "HANDSHAKE_TIMEOUT_SECONDS", 1.0)
    world = TLSWorld(tmp_path)
    settings = replace(make_settings(cluster, tmp_path), limits=LimitSettings(max_connections=3))
    async with serving(world, settings) as port:
        await asyncio.sleep(0.2)  # the readiness probe's connection is gone
        stuck = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.1)  # all three accepted, in their handshakes
        newest = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_within(stuck[0][0], 0.5) < 0.4  # the oldest made room
        status, _ = await post(
            port, world.client_context(world.client_ca), cluster.confirmation(pods.api)
        )
        assert status == 200  # the CA is served though the cap was full
        for r, w in [*stuck[1:], newest]:  # the rest: ended by the handshake timeout
            assert await closed_within(r, 3.0) < 2.0
            w.close()
        stuck[0][1].close()


async def test_over_a_cap_of_established_connections_a_new_one_is_closed_at_once(
    cluster: DevCluster, pods: Pods, tmp_path: Path
) -> None:
    world = TLSWorld(tmp_path)
    settings = replace(make_settings(cluster, tmp_path), limits=LimitSettings(max_connections=3))
    async with serving(world, settings) as port:
        await asyncio.sleep(0.2)
        ctx = world.client_context(world.client_ca)
        held = [await asyncio.open_connection("localhost", port, ssl=ctx) for _ in range(3)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_within(reader, 2.0) < 0.4
        writer.close()
        for _, w in held:
            w.close()
        await asyncio.sleep(0.1)
        status, _ = await post(port, ctx, cluster.confirmation(pods.api))
        assert status == 200


# --- certificate rotation: the files are read again when they change ----------------


async def served_serial(port: int, world: TLSWorld) -> int:
    """The serial number of the certificate a new connection is served."""
    ctx = world.client_context(world.client_ca)
    _, writer = await asyncio.open_connection("localhost", port, ssl=ctx)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return x509.load_der_x509_certificate(der).serial_number


def replace_file(path: str, data: bytes) -> None:
    """As a kubelet or cert-manager does: the new contents appear at once."""
    tmp = Path(path + ".new")
    tmp.write_bytes(data)
    tmp.replace(path)


async def serial_after(port: int, world: TLSWorld, before: int, seconds: float = 5.0) -> int:
    deadline = time.monotonic() + seconds
    serial = before
    while serial == before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        serial = await served_serial(port, world)
    return serial


async def test_a_rotated_certificate_is_served_to_new_connections_without_a_restart(
    cluster: DevCluster, pods: Pods, tmp_path: Path
) -> None:
    world = TLSWorld(tmp_path)
    async with serving(world, make_settings(cluster, tmp_path), reload_seconds=0.1) as port:
        first = await served_serial(port, world)
        renewed = world.ca.issue(
            "sys.auth.k8s", dns=["localhost"], ips=["127.0.0.1"], usage="server"
        )
        replace_file(world.server_key, renewed.key_pem)
        replace_file(world.server_cert, renewed.cert_pem)
        expected = x509.load_pem_x509_certificate(renewed.cert_pem).serial_number
        assert await serial_after(port, world, first) == expected
        status, _ = await post(
            port, world.client_context(world.client_ca), cluster.confirmation(pods.api)
        )
        assert status == 200


async def test_files_that_do_not_load_leave_the_certificate_in_force(
    cluster: DevCluster, pods: Pods, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = TLSWorld(tmp_path)
    async with serving(world, make_settings(cluster, tmp_path), reload_seconds=0.1) as port:
        first = await served_serial(port, world)
        renewed = world.ca.issue(
            "sys.auth.k8s", dns=["localhost"], ips=["127.0.0.1"], usage="server"
        )
        # The certificate arrives before its key: the pair does not fit yet.
        replace_file(world.server_cert, renewed.cert_pem)
        for _ in range(6):
            await asyncio.sleep(0.05)
            assert await served_serial(port, world) == first
        assert "TLS files changed but do not load" in caplog.text
        replace_file(world.server_key, renewed.key_pem)
        expected = x509.load_pem_x509_certificate(renewed.cert_pem).serial_number
        assert await serial_after(port, world, first) == expected


def test_the_files_are_checked_once_per_interval_and_never_with_0(tmp_path: Path) -> None:
    world = TLSWorld(tmp_path)
    built: list[TLSSettings] = []

    def build(tls: TLSSettings) -> ssl.SSLContext:
        built.append(tls)
        return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    now = [0.0]
    tls = TLSSettings(cert=world.server_cert, key=world.server_key, reload_seconds=10)
    initial = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    files = TLSFiles(tls, initial, clock=lambda: now[0], build=build)
    renewed = world.ca.issue("sys.auth.k8s", usage="server")
    replace_file(world.server_cert, renewed.cert_pem)
    now[0] = 9.0
    assert files.context() is initial  # not checked yet
    now[0] = 10.0
    assert files.context() is not initial and len(built) == 1
    now[0] = 30.0
    files.context()
    assert len(built) == 1  # unchanged since: not built again

    never = TLSFiles(replace(tls, reload_seconds=0), initial, clock=lambda: now[0], build=build)
    replace_file(world.server_cert, world.ca.issue("x", usage="server").cert_pem)
    now[0] = 10**6
    assert never.context() is initial and len(built) == 1


def test_an_encrypted_key_is_a_configuration_error_not_a_prompt(tmp_path: Path) -> None:
    world = TLSWorld(tmp_path)
    key = serialization.load_pem_private_key(Path(world.server_key).read_bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass phrase"),
    )
    tls = TLSSettings(cert=world.server_cert, key=write(tmp_path / "enc.key", encrypted))
    with pytest.raises(ConfigError):
        server_ssl_context(replace(Settings(), tls=tls))
