"""Refusals end to end: impostors, a provider with the wrong name, a CA identityd does not
allow, and the dev CA's own checks. A refusal writes nothing and exits 3 with the reason."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from identityd.devca.stack import StackOptions
from identityd.errors import Denied
from identityd.keys.csr import build_csr, generate_key
from identityd.keys.zts_wire import refresh_path
from identityd.sia.client import ZTSClient
from identityd.sia.main import EXIT_OK, EXIT_REFUSED, agent_once
from tests.e2e.e2e_support import World, running_world

PROVIDER = "sys.auth.k8s"


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with running_world(tmp_path) as w:
        yield w


Impostor = Callable[[World], dict[str, Any]]

IMPOSTORS: list[tuple[str, Impostor, str]] = [
    (
        "another pod's token",
        lambda w: {"pod": w.api, "token": w.cluster.token(w.billing)},
        "INSTANCE_ID_MISMATCH",
    ),
    (
        "a SAN of another service",
        lambda w: {"pod": w.api, "extra_args": ("--extra-dns", "billing.payments.k8s.example.com")},
        "SAN_DNS_NOT_ALLOWED",
    ),
    (
        # api-2's own token, but the request comes from 127.0.0.1, not its 10.1.2.4
        "the wrong client IP",
        lambda w: {"pod": w.other},
        "CLIENT_IP_MISMATCH",
    ),
    (
        "another pod's IP in the CSR",
        lambda w: {"pod": w.api, "env": {"POD_IP": w.other.ip}},
        "SAN_IP_NOT_ALLOWED",
    ),
    (
        "another service's identity",
        lambda w: {
            "pod": w.billing,
            "env": {"POD_NAMESPACE": "sports-web", "POD_SERVICE_ACCOUNT": "api"},
        },
        "SERVICE_MISMATCH",
    ),
]


@pytest.mark.parametrize(("title", "impostor", "reason"), IMPOSTORS, ids=[i[0] for i in IMPOSTORS])
async def test_impostor_is_refused_with_the_providers_reason(
    world: World, title: str, impostor: Impostor, reason: str
) -> None:
    kwargs = impostor(world)
    argv, env = world.invocation(kwargs.pop("pod"), name="impostor", **kwargs)
    code, message = await agent_once(argv, env)
    assert code == EXIT_REFUSED, message
    assert message.startswith("refused by the CA: 403: PROVIDER_DENIED: provider answered 403:")
    assert reason in message
    assert not (world.certs("impostor") / "cert.pem").exists()
    assert world.ca.events == []


async def test_provider_certificate_with_the_wrong_cn_is_rejected(tmp_path: Path) -> None:
    async with running_world(tmp_path, StackOptions(provider_cert_cn="mallory.provider")) as w:
        code, message = await agent_once(*w.invocation(w.api))
        assert code == EXIT_REFUSED
        assert "PROVIDER_IDENTITY_MISMATCH" in message
        assert "mallory.provider" in message
        assert w.ca.events == []


async def test_a_ca_client_certificate_identityd_does_not_allow_is_refused(tmp_path: Path) -> None:
    async with running_world(tmp_path, StackOptions(ca_client_cn="mallory.ca")) as w:
        code, message = await agent_once(*w.invocation(w.api))
        assert code == EXIT_REFUSED
        assert message.endswith("provider answered 403: CLIENT_NOT_ALLOWED")


def client(world: World) -> ZTSClient:
    return ZTSClient(world.stack.ca_url, ca_bundle=world.stack.ca_files.ca_cert, timeout=10)


def token_of(world: World, name: str) -> str:
    return world.cluster.token(getattr(world, name))


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"cn": "payments.billing"}, "400: CSR_CN_MISMATCH"),
        ({"uris": ["spiffe://sports.web/sa/api"], "dns": []}, "400: CSR_INSTANCE_ID_MISSING"),
        ({"provider": "sys.auth.other"}, "400: UNKNOWN_PROVIDER"),
    ],
)
async def test_the_dev_ca_checks_the_request_before_asking_the_provider(
    world: World, fields: dict[str, Any], reason: str
) -> None:
    uid = world.api.uid
    csr = build_csr(
        generate_key("EC"),
        cn=fields.get("cn", "sports.web.api"),
        dns=fields.get("dns", [f"{uid}.instanceid.athenz.k8s.example.com"]),
        uris=fields.get("uris", [f"athenz://instanceid/{PROVIDER}/{uid}"]),
    )
    with pytest.raises(Denied) as err:
        await client(world).register(
            {
                "provider": fields.get("provider", PROVIDER),
                "domain": "sports.web",
                "service": "api",
                "attestationData": token_of(world, "api"),
                "csr": csr,
            }
        )
    assert err.value.detail.startswith(reason)


async def test_refresh_without_a_client_certificate_is_unauthenticated(world: World) -> None:
    assert (await agent_once(*world.invocation(world.api)))[0] == EXIT_OK
    ctx = ssl.create_default_context(cafile=str(world.stack.ca_files.ca_cert))
    path = refresh_path(PROVIDER, "sports.web", "api", world.api.uid)
    async with (
        aiohttp.ClientSession() as http,
        http.post(world.stack.ca_url + path, json={"csr": "x"}, ssl=ctx) as resp,
    ):
        assert resp.status == 401
        assert (await resp.json())["message"].startswith("CLIENT_CERT_REQUIRED")


async def test_refresh_with_another_services_certificate_is_refused(world: World) -> None:
    assert (await agent_once(*world.invocation(world.api)))[0] == EXIT_OK
    assert (await agent_once(*world.invocation(world.billing)))[0] == EXIT_OK
    with pytest.raises(Denied) as err:
        await client(world).refresh(
            {"attestationData": token_of(world, "api"), "csr": "x"},
            provider=PROVIDER,
            domain="sports.web",
            service="api",
            instance_id=world.api.uid,
            cert_dir=world.certs("billing-0"),
        )
    assert err.value.detail.startswith("400: PRINCIPAL_MISMATCH")
