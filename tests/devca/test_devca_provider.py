"""The dev CA's provider client against real HTTPS servers: the CN check happens in the
handshake, so a server that is not the provider never sees the confirmation."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from identityd.devca.provider import HTTPSProvider, provider_ssl_context
from identityd.errors import Denied, Unavailable
from identityd.keys.certs import CertificateAuthority
from identityd.keys.zts_wire import InstanceConfirmation

PROVIDER = "sys.auth.k8s"
CONFIRMATION: InstanceConfirmation = {
    "provider": PROVIDER,
    "domain": "sports.web",
    "service": "api",
    "attestationData": "a.b.c",
    "attributes": {"instanceId": "1"},
}


@dataclass
class FakeProvider:
    """A real HTTPS server that records what reaches it."""

    url: str
    seen: list[tuple[str, dict[str, Any], str | None]] = field(default_factory=list)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = CertificateAuthority("provider CA")
    client = ca.issue("dev-ca.zts", usage="client")
    return {
        "ca": ca,
        "ca_file": write(tmp_path / "ca.pem", ca.cert_pem),
        "client_cert": write(tmp_path / "client.pem", client.cert_pem),
        "client_key": write(tmp_path / "client.key", client.key_pem),
        "tmp": tmp_path,
    }


async def serve(
    pki: dict[str, Any],
    *,
    cn: str,
    ca: CertificateAuthority | None = None,
    status: int = 200,
    redirect_to: str | None = None,
    chunked: bool = False,
) -> tuple[web.AppRunner, FakeProvider]:
    issuer = ca or pki["ca"]
    server = issuer.issue(cn, dns=["localhost"], ips=["127.0.0.1"], usage="server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(
        write(pki["tmp"] / f"{cn}.pem", server.cert_pem),
        write(pki["tmp"] / f"{cn}.key", server.key_pem),
    )
    ctx.load_verify_locations(cafile=pki["ca_file"])
    ctx.verify_mode = ssl.CERT_OPTIONAL
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    fake = FakeProvider(f"https://127.0.0.1:{sock.getsockname()[1]}")

    async def handle(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        client_cn = None
        for rdn in (peer or {}).get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    client_cn = value
        fake.seen.append((request.path, await request.json(), client_cn))
        if redirect_to is not None:
            raise web.HTTPPermanentRedirect(redirect_to + request.path)  # 308: re-post
        if chunked:
            body = await request.json()
            body["attributes"]["certExpiryTime"] = "60"
            raw = json.dumps(body).encode()
            resp = web.StreamResponse()
            resp.content_type = "application/json"
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(raw), 16):
                await resp.write(raw[i : i + 16])
                await asyncio.sleep(0.005)  # separate chunks on the wire
            await resp.write_eof()
            return resp
        if status != 200:
            return web.json_response(
                {"code": status, "message": "SAN_DNS_NOT_ALLOWED"}, status=status
            )
        body = await request.json()
        body["attributes"]["certExpiryTime"] = "60"
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/instance", handle)
    app.router.add_post("/refresh", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=ctx).start()
    return runner, fake


@pytest.fixture
async def client(pki: dict[str, Any]) -> AsyncIterator[Callable[[str], HTTPSProvider]]:
    async with aiohttp.ClientSession() as session:

        def make(url: str) -> HTTPSProvider:
            ctx = provider_ssl_context(
                PROVIDER,
                ca_file=pki["ca_file"],
                client_cert=pki["client_cert"],
                client_key=pki["client_key"],
            )
            return HTTPSProvider(PROVIDER, url, session=session, ssl_context=ctx, timeout=5)

        yield make


@pytest.mark.parametrize("kind", ["instance", "refresh"])
async def test_the_provider_gets_the_confirmation_and_our_client_certificate(
    pki: dict[str, Any], client: Callable[[str], HTTPSProvider], kind: str
) -> None:
    runner, fake = await serve(pki, cn=PROVIDER)
    try:
        answer = await client(fake.url).confirm(kind, CONFIRMATION)
    finally:
        await runner.cleanup()
    assert fake.seen == [(f"/{kind}", dict(CONFIRMATION), "dev-ca.zts")]
    assert answer["attributes"]["certExpiryTime"] == "60"


async def test_a_server_whose_cn_is_not_the_provider_never_sees_the_token(
    pki: dict[str, Any], client: Callable[[str], HTTPSProvider]
) -> None:
    runner, fake = await serve(pki, cn="mallory.provider")
    try:
        with pytest.raises(Denied) as err:
            await client(fake.url).confirm("instance", CONFIRMATION)
    finally:
        await runner.cleanup()
    assert err.value.code == "PROVIDER_IDENTITY_MISMATCH"
    assert "mallory.provider" in err.value.detail
    assert fake.seen == []


async def test_a_server_certificate_from_another_ca_is_refused(
    pki: dict[str, Any], client: Callable[[str], HTTPSProvider]
) -> None:
    runner, fake = await serve(pki, cn=PROVIDER, ca=CertificateAuthority("rogue CA"))
    try:
        with pytest.raises(Denied) as err:
            await client(fake.url).confirm("instance", CONFIRMATION)
    finally:
        await runner.cleanup()
    assert err.value.code == "PROVIDER_CERT_INVALID"
    assert fake.seen == []


async def test_a_non_200_answer_is_a_deny_with_the_providers_message(
    pki: dict[str, Any], client: Callable[[str], HTTPSProvider]
) -> None:
    runner, fake = await serve(pki, cn=PROVIDER, status=403)
    try:
        with pytest.raises(Denied) as err:
            await client(fake.url).confirm("instance", CONFIRMATION)
    finally:
        await runner.cleanup()
    assert (err.value.code, err.value.detail) == (
        "PROVIDER_DENIED",
        "provider answered 403: SAN_DNS_NOT_ALLOWED",
    )


async def test_an_unreachable_provider_is_unavailable(
    client: Callable[[str], HTTPSProvider],
) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(Unavailable) as err:
        await client(f"https://127.0.0.1:{port}").confirm("instance", CONFIRMATION)
    assert err.value.code == "PROVIDER_UNAVAILABLE"


async def test_a_redirect_is_a_deny_and_the_confirmation_goes_nowhere_else(
    pki: dict[str, Any], client: Callable[[str], HTTPSProvider]
) -> None:
    # A 307/308 re-posts the body, attestation token included, wherever it points.
    elsewhere, sink = await serve(pki, cn=PROVIDER)
    runner, fake = await serve(pki, cn=PROVIDER, redirect_to=sink.url)
    try:
        with pytest.raises(Denied) as err:
            await client(fake.url).confirm("instance", CONFIRMATION)
    finally:
        await runner.cleanup()
        await elsewhere.cleanup()
    assert err.value.code == "PROVIDER_DENIED" and "308" in err.value.detail
    assert len(fake.seen) == 1 and sink.seen == []


async def test_an_answer_in_several_chunks_is_read_whole(
    pki: dict[str, Any], client: Callable[[str], HTTPSProvider]
) -> None:
    runner, fake = await serve(pki, cn=PROVIDER, chunked=True)
    try:
        answer = await client(fake.url).confirm("instance", CONFIRMATION)
    finally:
        await runner.cleanup()
    assert answer["attributes"]["certExpiryTime"] == "60"
