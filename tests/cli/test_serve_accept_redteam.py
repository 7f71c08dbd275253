"""A red team against the connection layer of `identityd serve`: a loaded worker whose
sibling is stopped, handshakes that fail by the thousand, certificate files rotated
the way a kubelet does, and a rotation to a certificate that already expired."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import logging
import os
import socket
import ssl
import time
from asyncio.sslproto import SSLProtocol
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from identityd.app import tls_context
from identityd.cli import connections
from identityd.cli.connections import DEFER_SECONDS, NOT_SERVING, Acceptor, AcceptShare
from identityd.cli.tls_reload import TLSFiles
from identityd.keys.certs import CertificateAuthority
from identityd.settings import TLSSettings


@contextlib.contextmanager
def listening() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


# --- AcceptShare: a loaded worker and a sibling that takes nothing -----------------------


async def test_a_loaded_worker_takes_a_connection_its_stopped_sibling_leaves() -> None:
    # The sibling holds fewer connections but takes none (SIGSTOPped, wedged, or paused
    # out of descriptors). This worker's loop turns every few milliseconds (decisions
    # in line): each pause of 1 ms ended more than DEFER_SECONDS after the previous
    # one, was taken for a new connection's wait, and the connection was never taken.
    made: asyncio.Queue[float] = asyncio.Queue()

    class Made(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.put_nowait(time.monotonic())

    counts = [NOT_SERVING, 0]
    with listening() as sock:
        acceptor = Acceptor(sock, Made, limit=100, share=AcceptShare(counts, 0))
        acceptor.start()
        first = socket.create_connection(sock.getsockname())
        await asyncio.wait_for(made.get(), 1.0)  # one held: ahead of the sibling from now on
        busy = True

        async def decisions() -> None:
            while busy:
                time.sleep(0.003)  # noqa: ASYNC251 - a decision evaluated in line
                await asyncio.sleep(0)

        load = asyncio.create_task(decisions())
        started = time.monotonic()
        second = socket.create_connection(sock.getsockname())
        try:
            taken = await asyncio.wait_for(made.get(), 1.0)
        except TimeoutError:
            pytest.fail("the loaded worker never took the connection")
        finally:
            busy = False
            await load
            acceptor.stop()
            first.close()
            second.close()
    assert taken - started < 0.1


def test_a_wait_spans_late_turns_of_a_loaded_loop() -> None:
    now = [100.0]
    share = AcceptShare([3, 1], 0, clock=lambda: now[0])
    assert share.defer(3)
    now[0] += 3 * DEFER_SECONDS  # the loop came back late, the connection still pending
    assert not share.defer(3)


# --- failed handshakes leave no garbage behind --------------------------------------------


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def server_context(tmp: Path) -> ssl.SSLContext:
    issued = CertificateAuthority("test CA").issue("sys.auth.k8s", usage="server")
    (tmp / "s.pem").write_bytes(issued.cert_pem)
    (tmp / "s.key").write_bytes(issued.key_pem)
    return tls_context(TLSSettings(cert=str(tmp / "s.pem"), key=str(tmp / "s.key")))


def live_ssl_protocols() -> int:
    return sum(isinstance(o, SSLProtocol) for o in gc.get_objects())


async def test_a_failed_handshake_frees_its_buffers_at_once(
    tmp_path: Path, no_collector: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each handshake holds asyncio's 256 KiB TLS buffer. A failed one was kept in a
    # reference cycle (the exception's traceback, the waiter holding the exception)
    # until a full collection: a flood of connections that close before their
    # handshake grew a worker by hundreds of MiB whatever the connection cap.
    monkeypatch.setattr(connections, "HANDSHAKE_TIMEOUT_SECONDS", 0.2)
    context = server_context(tmp_path)
    before = live_ssl_protocols()
    with listening() as sock:
        acceptor = Acceptor(sock, asyncio.Protocol, limit=100, tls=lambda: context)
        acceptor.start()
        try:
            clients = [await asyncio.open_connection(*sock.getsockname()) for _ in range(12)]
            for i, (_, writer) in enumerate(clients):
                if i % 3 == 0:
                    writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # half a hello
                elif i % 3 == 1:
                    writer.write(b"GET / HTTP/1.1\r\n\r\n")  # not TLS
            await asyncio.sleep(0.05)
            for i, (_, writer) in enumerate(clients):
                if i != 2:  # one is left to the handshake timeout
                    writer.close()
            for _ in range(100):
                if acceptor.held() == 0:
                    break
                await asyncio.sleep(0.01)
            assert acceptor.held() == 0
            await asyncio.sleep(0.05)
            assert live_ssl_protocols() - before == 0
        finally:
            acceptor.stop()
            clients[2][1].close()


# --- certificate rotation ------------------------------------------------------------------


def kubelet_volume(root: Path, issued: tuple[bytes, bytes], version: str) -> None:
    """A Secret volume as the kubelet writes one: files in a timestamped directory,
    ``..data`` a symlink to it, each file name a symlink through ``..data``; an update
    is a new directory and ``..data`` swapped to it by a rename."""
    cert, key = issued
    data = root / f"..{version}"
    data.mkdir()
    (data / "tls.crt").write_bytes(cert)
    (data / "tls.key").write_bytes(key)
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(data.name)
    tmp_link.replace(root / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")


def test_a_kubelet_volume_swap_is_picked_up_and_the_old_files_going_is_not(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority("test CA")
    first, second = (ca.issue("sys.auth.k8s", usage="server") for _ in range(2))
    kubelet_volume(tmp_path, (first.cert_pem, first.key_pem), "2024_01")
    tls = TLSSettings(
        cert=str(tmp_path / "tls.crt"), key=str(tmp_path / "tls.key"), reload_seconds=1
    )
    now = [0.0]
    files = TLSFiles(tls, tls_context(tls), clock=lambda: now[0])
    kubelet_volume(tmp_path, (second.cert_pem, second.key_pem), "2024_02")
    for old in (tmp_path / "..2024_01").iterdir():
        old.unlink()
    (tmp_path / "..2024_01").rmdir()
    now[0] = 1.0
    files.context()
    now[0] = 2.0
    files.context()
    assert files.reloads == 1


def expired(ca: CertificateAuthority) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sys.auth.k8s")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now - datetime.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_a_rotation_to_an_expired_certificate_leaves_the_one_in_force(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A restored backup or a stale Secret: it loads, and every CA would refuse it.
    ca = CertificateAuthority("test CA")
    valid = ca.issue("sys.auth.k8s", usage="server")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(valid.cert_pem)
    key.write_bytes(valid.key_pem)
    tls = TLSSettings(cert=str(cert), key=str(key), reload_seconds=1)
    now = [0.0]
    initial = tls_context(tls)
    files = TLSFiles(tls, initial, clock=lambda: now[0])
    old_cert, old_key = expired(ca)
    cert.write_bytes(old_cert)
    key.write_bytes(old_key)
    os.utime(cert, ns=(1, 1))  # a stamp of its own whatever the clock's resolution
    now[0] = 1.0
    with caplog.at_level(logging.WARNING, logger="identityd.serve"):
        assert files.context() is initial
    assert files.reloads == 0
    assert "expired" in caplog.text
    renewed = ca.issue("sys.auth.k8s", usage="server")
    cert.write_bytes(renewed.cert_pem)
    key.write_bytes(renewed.key_pem)
    os.utime(cert, ns=(2, 2))
    now[0] = 2.0
    assert files.context() is not initial and files.reloads == 1
