"""One agent attempt against a programmable CA over real HTTPS on loopback: how the
answer is read, what is checked before anything is written, and failures that must
end as reason codes (exit 2/3/4), never as a traceback."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtensionOID, NameOID

from identityd.errors import Denied, Unavailable
from identityd.keys.certs import CertificateAuthority
from identityd.keys.issuer import TokenIssuer
from identityd.sia.agent import Agent
from identityd.sia.config import AgentConfig, add_arguments
from identityd.sia.files import KEY_FILE, read_current
from identityd.sia.main import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, agent_once, sia_main

UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
ENV = {
    "POD_NAMESPACE": "sports-web",
    "POD_NAME": "api-1",
    "POD_UID": UID,
    "POD_IP": "127.0.0.1",
    "POD_SERVICE_ACCOUNT": "api",
}
CA = CertificateAuthority("sia test CA")
SERVER = CA.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], usage="server")
ISSUER = TokenIssuer("https://kubernetes.default.svc.cluster.local", key_type="EC")
TOKEN = ISSUER.mint("sports-web", "api", "api-1", UID, audiences=["identityd"])

Answer = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


def sign(
    csr_pem: str,
    *,
    cn: str | None = None,
    uris: list[str] | None = None,
    not_before: datetime.datetime | None = None,
    lifetime: datetime.timedelta = datetime.timedelta(hours=1),
) -> str:
    """What a CA does with the CSR: its key and SANs, the CN it was given."""
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names: list[x509.GeneralName] = [
        n for n in san if not isinstance(n, x509.UniformResourceIdentifier) or uris is None
    ]
    names += [x509.UniformResourceIdentifier(u) for u in uris or ()]
    subject_cn = cn or str(csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    now = datetime.datetime.now(datetime.UTC)
    start = not_before or now - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(CA.certificate.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(max(start, now) + lifetime)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(CA.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def identity(cert_pem: str) -> dict[str, str]:
    return {
        "provider": "sys.auth.k8s",
        "name": "sports.web.api",
        "instanceId": UID,
        "x509Certificate": cert_pem,
        "x509CertificateSigner": CA.cert_pem.decode(),
    }


async def issue(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    return web.json_response(identity(sign(body["csr"])), status=201)


@dataclass
class FakeCA:
    url: str
    answer: Answer = issue
    bodies: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
async def fake_ca(tmp_path: Path) -> AsyncIterator[FakeCA]:
    ca = FakeCA(url="")

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        ca.bodies.append(body)
        return await ca.answer(request, body)

    app = web.Application()
    app.router.add_post("/zts/v1/instance", handle)
    app.router.add_post("/zts/v1/instance/{tail:.*}", handle)
    (tmp_path / "server.pem").write_bytes(SERVER.cert_pem)
    (tmp_path / "server.key").write_bytes(SERVER.key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    ca.url = f"https://localhost:{port}"
    try:
        yield ca
    finally:
        await runner.cleanup()


def config(fake_ca: FakeCA, tmp_path: Path, **overrides: Any) -> AgentConfig:
    (tmp_path / "ca.pem").write_bytes(CA.cert_pem)
    (tmp_path / "token").write_text(TOKEN + "\n")
    fields: dict[str, Any] = {
        "ca_url": fake_ca.url,
        "ca_bundle": tmp_path / "ca.pem",
        "token_file": tmp_path / "token",
        "out_dir": tmp_path / "certs",
        "timeout": 5.0,
        "pod_env": ENV,
        **overrides,
    }
    return AgentConfig(**fields)


def argv(fake_ca: FakeCA, tmp_path: Path) -> list[str]:
    config(fake_ca, tmp_path)  # writes the token and the CA bundle
    return [
        "--ca-url",
        fake_ca.url,
        "--ca-bundle",
        str(tmp_path / "ca.pem"),
        "--token-file",
        str(tmp_path / "token"),
        "--out-dir",
        str(tmp_path / "certs"),
        "--once-attempts",
        "1",
    ]


async def test_registers_and_writes_a_checked_certificate(fake_ca: FakeCA, tmp_path: Path) -> None:
    issued = await Agent(config(fake_ca, tmp_path)).attempt()
    assert issued.kind == "instance"
    assert issued.facts.common_name == "sports.web.api"
    assert fake_ca.bodies[0]["attestationData"] == TOKEN
    assert read_current(tmp_path / "certs") is not None


async def test_an_answer_in_several_chunks_is_read_whole(fake_ca: FakeCA, tmp_path: Path) -> None:
    """A CA may stream its answer (chunked, several TLS records): one read() is not all."""

    async def chunked(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        data = json.dumps(identity(sign(body["csr"]))).encode()
        resp = web.StreamResponse(status=201, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for start in range(0, len(data), 200):
            await resp.write(data[start : start + 200])
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    fake_ca.answer = chunked
    issued = await Agent(config(fake_ca, tmp_path)).attempt()
    assert issued.facts.common_name == "sports.web.api"


async def test_a_redirect_is_not_followed_with_the_token(fake_ca: FakeCA, tmp_path: Path) -> None:
    """A 307 would make the client re-POST the body (the token) wherever it points,
    plain HTTP included."""
    received: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    elsewhere = f"http://127.0.0.1:{runner.addresses[0][1]}/steal"

    async def redirect(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(elsewhere)

    fake_ca.answer = redirect
    try:
        with pytest.raises(Unavailable) as err:
            await Agent(config(fake_ca, tmp_path)).attempt()
    finally:
        await runner.cleanup()
    assert received == []
    assert "307" in err.value.detail


async def test_the_token_is_not_repeated_in_an_error(fake_ca: FakeCA, tmp_path: Path) -> None:
    async def echo(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        message = f"bad attestation data {body['attestationData']}"
        return web.json_response({"code": 403, "message": message}, status=403)

    fake_ca.answer = echo
    with pytest.raises(Denied) as err:
        await Agent(config(fake_ca, tmp_path)).attempt()
    assert "bad attestation data" in err.value.detail
    # Not the whole token, and not the start the message cut leaves either.
    assert TOKEN[:40] not in str(err.value)


@pytest.mark.parametrize(
    ("answer", "needle"),
    [
        pytest.param(
            lambda csr: sign(
                csr,
                not_before=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
            ),
            "not valid yet",
            id="not-yet-valid",
        ),
        pytest.param(
            lambda csr: sign(
                csr,
                uris=[
                    "spiffe://sports.web/sa/api",
                    f"athenz://instanceid/sys.auth.k8s/{UID}",
                    "spiffe://payments/sa/billing",
                ],
            ),
            "spiffe://payments/sa/billing",
            id="other-spiffe-id",
        ),
        pytest.param(
            lambda csr: sign(csr, uris=["spiffe://sports.web/sa/api"]),
            "athenz://instanceid",
            id="no-instance-uri",
        ),
        pytest.param(
            # A CA whose clock runs behind by nearly the whole lifetime.
            lambda csr: sign(
                csr,
                not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1),
                lifetime=datetime.timedelta(seconds=10),
            ),
            "ends within 30 s",
            id="nearly-spent",
        ),
        pytest.param(
            lambda csr: sign(csr, cn="payments.billing"),
            "payments.billing",
            id="other-cn",
        ),
    ],
)
async def test_a_certificate_that_is_not_for_this_identity_now_is_not_written(
    fake_ca: FakeCA, tmp_path: Path, answer: Callable[[str], str], needle: str
) -> None:
    agent = Agent(config(fake_ca, tmp_path))
    await agent.attempt()
    before = read_current(tmp_path / "certs")

    async def bad(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response(identity(answer(body["csr"])), status=201)

    fake_ca.answer = bad
    with pytest.raises(Unavailable) as err:
        await agent.attempt()
    assert err.value.code == "CA_BAD_RESPONSE"
    assert needle in err.value.detail
    assert read_current(tmp_path / "certs") == before


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        # CN would be longer than X.509's 64 characters: cryptography raises ValueError.
        ({"POD_NAMESPACE": "n" * 40, "POD_SERVICE_ACCOUNT": "s" * 30}, "64"),
        # A dotted service account would name another service (sports + web.api).
        ({"POD_NAMESPACE": "sports", "POD_SERVICE_ACCOUNT": "web.api"}, "service account"),
        # Not names Kubernetes gives: a comma would split into two SANs in sanDNS.
        ({"POD_SERVICE_ACCOUNT": "api,evil.example"}, "service account"),
        ({"POD_SERVICE_ACCOUNT": "ü"}, "service account"),
        ({"POD_NAMESPACE": "Sports_Web"}, "namespace"),
        ({"POD_UID": "a/b"}, "uid"),
    ],
)
async def test_names_that_make_no_identity_are_a_configuration_error(
    fake_ca: FakeCA, tmp_path: Path, env: dict[str, str], needle: str
) -> None:
    code, message = await agent_once(argv(fake_ca, tmp_path), {**ENV, **env})
    assert code == EXIT_USAGE, message
    assert message.startswith("SIA_NAME_INVALID")
    assert needle in message
    assert fake_ca.bodies == []


async def test_an_unwritable_output_directory_is_a_configuration_error(
    fake_ca: FakeCA, tmp_path: Path
) -> None:
    args = argv(fake_ca, tmp_path)
    (tmp_path / "certs").write_text("a file where the directory should be")
    code, message = await agent_once(args, ENV)
    assert code == EXIT_USAGE, message
    assert message.startswith("SIA_OUTPUT_UNWRITABLE")
    assert "PRIVATE KEY" not in message


async def test_the_loop_survives_an_unwritable_directory_and_backs_off(
    fake_ca: FakeCA, tmp_path: Path
) -> None:
    (tmp_path / "certs").write_text("in the way")
    agent = Agent(replace(config(fake_ca, tmp_path), retry_initial=0.01, retry_max=0.02))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    async with asyncio.timeout(5):
        while agent.status.consecutive_failures < 2:
            await asyncio.sleep(0.01)
            assert not task.done(), task.exception()
        assert (agent.status.last_error or "").startswith("SIA_OUTPUT_UNWRITABLE")
        assert all(d >= 0.005 for d in agent.status.retry_delays)  # backed off, not spun
        (tmp_path / "certs").unlink()
        while agent.status.last_issued is None:
            await asyncio.sleep(0.01)
            assert not task.done(), task.exception()
        stop.set()
        await task
    assert agent.status.last_error is None


async def test_once_happy_path_exit_code(fake_ca: FakeCA, tmp_path: Path) -> None:
    code, message = await agent_once(argv(fake_ca, tmp_path), ENV)
    assert (code, message.split(":")[0]) == (EXIT_OK, "registered")


async def test_a_certificate_whose_extensions_do_not_parse_is_a_bad_response(
    fake_ca: FakeCA, tmp_path: Path
) -> None:
    """cryptography parses extensions lazily: loading succeeds, reading the SANs raises."""

    async def garbled(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        csr = x509.load_pem_x509_csr(body["csr"].encode())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(CA.certificate.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(
                x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x01\x02"),
                critical=False,
            )
            .sign(CA.key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        return web.json_response(identity(pem), status=201)

    fake_ca.answer = garbled
    code, message = await agent_once(argv(fake_ca, tmp_path), ENV)
    assert code == EXIT_UNAVAILABLE, message
    assert "CA_BAD_RESPONSE" in message


def test_an_unknown_log_level_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            *("--ca-url", "https://127.0.0.1:9", "--token-file", str(tmp_path / "none")),
            *("--once", "--log-level", "chatty"),
        ]
    )
    assert sia_main(args) == EXIT_USAGE
    assert "--log-level" in capsys.readouterr().err


async def test_an_encrypted_key_left_on_disk_means_registering_again(
    fake_ca: FakeCA, tmp_path: Path
) -> None:
    # Files someone changed by hand must not end the loop (a TypeError escaped).
    agent = Agent(config(fake_ca, tmp_path))
    first = await agent.attempt()
    key_file = first.directory / KEY_FILE
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"by hand"),
        )
    )
    again = await agent.attempt()
    assert again.kind == "instance"  # not a refresh: that key cannot sign for one


async def test_a_certificate_of_another_pod_left_on_the_volume_is_replaced_at_once(
    fake_ca: FakeCA, tmp_path: Path
) -> None:
    # A volume that outlived its pod: its certificate is valid for an hour, and not ours.
    other_uid = "1a2b3c4d-5e6f-4a0b-8c9d-0e1f2a3b4c5d"
    other = config(fake_ca, tmp_path, pod_env={**ENV, "POD_NAME": "api-2", "POD_UID": other_uid})
    (tmp_path / "other-token").write_text(
        ISSUER.mint("sports-web", "api", "api-2", other_uid, audiences=["identityd"])
    )
    await Agent(replace(other, token_file=tmp_path / "other-token")).attempt()
    agent = Agent(config(fake_ca, tmp_path))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        async with asyncio.timeout(5):
            while agent.status.last_issued is None:
                await asyncio.sleep(0.01)
                assert not task.done(), task.exception()
    finally:
        stop.set()
        await task
    assert agent.status.last_issued is not None
    assert agent.status.last_issued.kind == "instance"  # registered, not refreshed as api-2
    assert f"athenz://instanceid/sys.auth.k8s/{UID}" in agent.status.last_issued.facts.uris
