"""The DevCA core with a provider double: it signs what the provider's answer says
(lifetime, usage, OU, refresh) and sends the confirmation ZTS would."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identityd.devca.ca import DevCA, DevCASettings
from identityd.errors import BadRequest, Denied
from identityd.keys.certs import CertificateAuthority
from identityd.keys.csr import build_csr, generate_key
from identityd.keys.zts_wire import InstanceConfirmation

PROVIDER = "sys.auth.k8s"
UID = "9a8b7c6d-0000-4000-8000-000000000001"


class ProviderDouble:
    """Answers with the confirmation plus ``grant``, or refuses; records what it got."""

    name = PROVIDER

    def __init__(self, grant: dict[str, str] | None = None, deny: str | None = None) -> None:
        self.grant = grant or {}
        self.deny = deny
        self.seen: list[tuple[str, InstanceConfirmation]] = []

    async def confirm(self, kind: str, confirmation: InstanceConfirmation) -> Any:
        self.seen.append((kind, confirmation))
        if self.deny:
            raise Denied("PROVIDER_DENIED", f"provider answered 403: {self.deny}")
        answer = json.loads(json.dumps(confirmation))
        answer["attributes"].update(self.grant)
        return answer


def body(**overrides: Any) -> bytes:
    csr = build_csr(
        generate_key("EC"),
        cn="sports.web.api",
        dns=[f"{UID}.instanceid.athenz.k8s.example.com"],
        uris=[f"athenz://instanceid/{PROVIDER}/{UID}"],
    )
    doc = {
        "provider": PROVIDER,
        "domain": "sports.web",
        "service": "api",
        "attestationData": "t.o.k",
        "csr": csr,
        **overrides,
    }
    return json.dumps(doc).encode()


def make(provider: ProviderDouble, **settings: Any) -> DevCA:
    return DevCA(CertificateAuthority("dev CA"), {PROVIDER: provider}, DevCASettings(**settings))


async def test_register_signs_as_the_answer_says() -> None:
    provider = ProviderDouble(
        {"certExpiryTime": "90", "certUsage": "server", "certSubjectOU": "k8s-pods"}
    )
    ca = make(provider)
    identity, location = await ca.register(body(), client_ip="10.1.2.3")
    assert location == f"/zts/v1/instance/{PROVIDER}/sports.web/api/{UID}"
    assert (identity["provider"], identity["name"], identity["instanceId"]) == (
        PROVIDER,
        "sports.web.api",
        UID,
    )
    cert = x509.load_pem_x509_certificate(identity["x509Certificate"].encode())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(minutes=95)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [a.value for a in ou] == ["k8s-pods"]
    [(kind, sent)] = provider.seen
    assert kind == "instance"
    assert sent.get("attributes", {})["clientIP"] == "10.1.2.3"
    assert ca.records[(PROVIDER, UID)].current_serial == cert.serial_number


async def test_no_usage_means_both_and_the_agents_shorter_expiry_wins() -> None:
    ca = make(ProviderDouble({"certExpiryTime": "600"}))
    identity, _ = await ca.register(body(expiryTime=30), client_ip="10.1.2.3")
    cert = x509.load_pem_x509_certificate(identity["x509Certificate"].encode())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(minutes=35)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}


async def test_cert_refresh_false_keeps_no_record_so_refresh_is_refused() -> None:
    ca = make(ProviderDouble({"certRefresh": "false"}))
    identity, _ = await ca.register(body(), client_ip="10.1.2.3")
    assert ca.records == {}
    cert = x509.load_pem_x509_certificate(identity["x509Certificate"].encode())
    with pytest.raises(Denied) as err:
        await ca.refresh(
            body(),
            provider=PROVIDER,
            domain="sports.web",
            service="api",
            instance_id=UID,
            client_ip="10.1.2.3",
            client_cert=cert,
        )
    assert err.value.code == "CERT_RECORD_NOT_FOUND"


async def test_a_provider_deny_passes_through_and_nothing_is_issued() -> None:
    ca = make(ProviderDouble(deny="SAN_IP_NOT_ALLOWED"))
    with pytest.raises(Denied) as err:
        await ca.register(body(), client_ip="10.1.2.3")
    assert err.value.detail == "provider answered 403: SAN_IP_NOT_ALLOWED"
    assert (ca.records, ca.events) == ({}, [])


async def test_csr_and_public_key_are_forwarded_unless_switched_off() -> None:
    on, off = ProviderDouble(), ProviderDouble()
    await make(on).register(body(), client_ip="10.1.2.3")
    await make(off, forward_csr=False, send_csr_public_key=False).register(
        body(), client_ip="10.1.2.3"
    )
    on_attrs = on.seen[0][1].get("attributes", {})
    off_attrs = off.seen[0][1].get("attributes", {})
    assert on_attrs["csr"].startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert on_attrs["csrPublicKey"].startswith("-----BEGIN PUBLIC KEY-----")
    assert "csr" not in off_attrs
    assert "csrPublicKey" not in off_attrs


async def test_unknown_provider_is_a_bad_request_before_any_call() -> None:
    provider = ProviderDouble()
    with pytest.raises(BadRequest) as err:
        await make(provider).register(body(provider="sys.auth.other"), client_ip="10.1.2.3")
    assert err.value.code == "UNKNOWN_PROVIDER"
    assert provider.seen == []
