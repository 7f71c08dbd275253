"""Agent → dev CA → identityd over real HTTPS with mTLS: registration, refresh, rotation."""

from __future__ import annotations

import asyncio
import datetime
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from identityd.devca.stack import run_stack
from identityd.errors import Denied
from identityd.keys.csr import public_key_sha256
from identityd.sia.agent import Agent
from identityd.sia.client import ZTSClient
from identityd.sia.main import EXIT_OK, agent_once
from tests.doubles.waiting import eventually
from tests.e2e.e2e_support import World, running_world, sha256

PROVIDER = "sys.auth.k8s"


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with running_world(tmp_path) as w:
        yield w


async def test_first_registration_writes_a_verified_identity(world: World) -> None:
    argv, env = world.invocation(world.api)
    token = (world.stack.pod_dir("api-1") / "token").read_text()
    code, message = await agent_once(argv, env)
    assert code == EXIT_OK, message
    assert message.startswith("registered: certificate for sports.web.api")

    certs, uid = world.certs("api-1"), world.api.uid
    cert = x509.load_pem_x509_certificate((certs / "cert.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert (certs / "ca.pem").read_bytes() == world.stack.ca_files.ca_cert.read_bytes()
    key = serialization.load_pem_private_key((certs / "key.pem").read_bytes(), password=None)
    assert public_key_sha256(key.public_key()) == public_key_sha256(cert.public_key())
    assert stat.S_IMODE((certs / "key.pem").stat().st_mode) == 0o600

    facts = world.cert("api-1")
    assert facts.common_name == "sports.web.api"
    assert facts.dns == (
        "api.sports-web.k8s.example.com",
        f"{uid}.instanceid.athenz.k8s.example.com",
    )
    assert facts.ips == ("127.0.0.1",)
    assert facts.uris == ("spiffe://sports.web/sa/api", f"athenz://instanceid/{PROVIDER}/{uid}")
    # identityd's answer is honoured: 24 h (plus the CA's 5 min backdate), client use only.
    assert facts.lifetime == datetime.timedelta(minutes=24 * 60 + 5)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    [event] = world.ca.events
    assert (event.kind, event.instance_id, event.client_ip) == ("instance", uid, "127.0.0.1")
    assert event.attestation_sha256 == sha256(token)


async def test_second_run_refreshes_over_mtls_and_rotates_the_record(world: World) -> None:
    argv, env = world.invocation(world.api)
    assert (await agent_once(argv, env))[0] == EXIT_OK
    first = world.cert("api-1").serial
    code, message = await agent_once(argv, env)
    assert code == EXIT_OK, message
    assert message.startswith("refreshed:")
    second = world.cert("api-1").serial
    assert second != first
    assert [e.kind for e in world.ca.events] == ["instance", "refresh"]
    record = world.ca.records[(PROVIDER, world.api.uid)]
    assert (record.current_serial, record.previous_serial) == (second, first)


async def test_an_old_certificate_revokes_the_instance_and_the_agent_registers_again(
    world: World, tmp_path: Path
) -> None:
    config = world.config(world.api)
    agent = Agent(config)
    first = await agent.attempt()
    stolen = tmp_path / "stolen"
    shutil.copytree(first.directory, stolen)  # someone keeps the first key and cert
    await agent.attempt()
    await agent.attempt()  # now the first certificate is neither current nor previous

    client = ZTSClient(config.ca_url, ca_bundle=config.ca_bundle, timeout=10)
    token = (world.stack.pod_dir("api-1") / "token").read_text()
    with pytest.raises(Denied) as err:
        await client.refresh(
            {"attestationData": token, "csr": "unused"},
            provider=PROVIDER,
            domain="sports.web",
            service="api",
            instance_id=world.api.uid,
            cert_dir=stolen,
        )
    assert "CERT_REVOKED" in err.value.detail
    # The legitimate agent's refresh is now refused too; it registers again with its token.
    again = await agent.attempt()
    assert again.kind == "instance"
    assert [e.kind for e in world.ca.events] == ["instance", "refresh", "refresh", "instance"]


async def test_token_rotation_is_picked_up(world: World) -> None:
    config = world.config(world.api)
    agent = Agent(config)
    await agent.attempt()
    rotated = world.cluster.token(world.api)
    world.stack.write_token("api-1", rotated)
    assert (await agent.attempt()).kind == "refresh"
    assert world.ca.events[-1].attestation_sha256 == sha256(rotated)
    # The file is read on every attempt: an expired token there is what identityd sees.
    expired = world.cluster.token(world.api, now=datetime.datetime.now().timestamp() - 7200)
    world.stack.write_token("api-1", expired)
    with pytest.raises(Denied) as err:
        await agent.attempt()
    assert "TOKEN_EXPIRED" in err.value.detail


async def test_sidecar_loop_refreshes_when_the_fraction_of_lifetime_has_passed(
    world: World,
) -> None:
    argv, env = world.invocation(world.api)
    assert (await agent_once(argv, env))[0] == EXIT_OK
    before = world.cert("api-1").serial
    # 0.1% of a 24 h certificate backdated by 5 minutes: due at once, then in ~86 s.
    agent = Agent(world.config(world.api, refresh_fraction=0.001, jitter_fraction=0.0))
    stop = asyncio.Event()
    loop = asyncio.create_task(agent.run(stop))
    try:
        await eventually(lambda: agent.status.last_issued is not None, within=10)
    finally:
        stop.set()
        await loop
    issued = agent.status.last_issued
    assert issued is not None
    assert issued.kind == "refresh"
    assert world.cert("api-1").serial == issued.facts.serial != before
    assert agent.status.attempts == 1  # the next one waits for its time


async def test_rsa_keys_on_request(world: World) -> None:
    argv, env = world.invocation(world.api, extra_args=("--key-type", "RSA", "--key-bits", "3072"))
    assert (await agent_once(argv, env))[0] == EXIT_OK
    cert = x509.load_pem_x509_certificate((world.certs("api-1") / "cert.pem").read_bytes())
    assert cert.public_key().key_size == 3072  # type: ignore[union-attr]


async def test_the_demo_stack_runs_every_scenario_as_expected(tmp_path: Path) -> None:
    from identityd.cli.serve import serve_sockets
    from tests.conftest import POLICIES

    report = await run_stack(
        serve_identityd=serve_sockets, run_agent=agent_once, policies=POLICIES, workdir=tmp_path
    )
    assert report.ok, "\n".join(report.lines())
    assert [run.exit_code for run in report.runs] == [0, 0, 3, 3]
    text = "\n".join(report.lines())
    assert "subject CN=sports.web.api" in text
    assert "SERVICE_MISMATCH" in text
    assert "SAN_DNS_NOT_ALLOWED" in text
