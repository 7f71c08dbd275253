"""The dev CA's pure part: request parsing, instance ids, the InstanceConfirmation, grants."""

from __future__ import annotations

import json
from typing import Any

import pytest

from identityd.devca.confirmation import (
    CertRequest,
    build_confirmation,
    check_csr,
    instance_id_of,
    lifetime_minutes,
    parse_refresh,
    parse_register,
    read_grant,
)
from identityd.errors import BadRequest, Unavailable
from identityd.keys.csr import build_csr, generate_key, parse_csr
from identityd.keys.csr_info import CSRInfo

PROVIDER = "sys.auth.k8s"
UID = "2b3c9a1e-7f00-4a51-9d0e-5f6a7b8c9d0e"
DNS = ["api.sports-web.k8s.example.com", f"{UID}.instanceid.athenz.k8s.example.com"]
URIS = ["spiffe://sports.web/sa/api", f"athenz://instanceid/{PROVIDER}/{UID}"]


def csr(
    cn: str = "sports.web.api",
    dns: list[str] | None = None,
    ips: list[str] | None = None,
    uris: list[str] | None = None,
) -> str:
    return build_csr(
        generate_key("EC"),
        cn=cn,
        dns=DNS if dns is None else dns,
        ips=["10.1.2.3"] if ips is None else ips,
        uris=URIS if uris is None else uris,
    )


def register_body(**fields: Any) -> bytes:
    body = {
        "provider": PROVIDER,
        "domain": "sports.web",
        "service": "api",
        "attestationData": "header.claims.signature",
        "csr": csr(),
    }
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def info(pem: str) -> CSRInfo:
    return parse_csr(pem)


def test_register_is_parsed_and_names_lower_cased() -> None:
    req = parse_register(register_body(domain="Sports.Web", expiryTime=60, hostname="H.example"))
    assert (req.kind, req.provider, req.domain, req.service) == (
        "instance",
        PROVIDER,
        "sports.web",
        "api",
    )
    assert (req.principal, req.expiry_minutes, req.hostname) == ("sports.web.api", 60, "h.example")
    assert "header.claims" not in repr(req)  # the token stays out of repr


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"provider": None}, "provider"),
        ({"domain": "sports web"}, "domain"),
        ({"service": "a.b"}, "service"),  # a SimpleName has no dots
        ({"attestationData": ""}, "attestationData"),
        ({"csr": None}, "csr"),
        ({"expiryTime": "60"}, "expiryTime"),
        ({"expiryTime": True}, "expiryTime"),
    ],
)
def test_register_refuses_malformed_fields(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_register(register_body(**fields))
    assert needle in err.value.detail


def test_register_refuses_non_objects_and_duplicate_keys() -> None:
    with pytest.raises(BadRequest):
        parse_register(b"[]")
    with pytest.raises(BadRequest, match="duplicate"):
        parse_register(b'{"provider": "a", "provider": "b"}')


def test_refresh_takes_names_from_the_path_and_allows_no_attestation() -> None:
    body = json.dumps({"csr": csr()}).encode()
    req = parse_refresh(
        body, provider=PROVIDER, domain="sports.web", service="api", instance_id=UID
    )
    assert (req.kind, req.instance_id, req.attestation_data) == ("refresh", UID, "")
    with pytest.raises(BadRequest, match="instanceId"):
        parse_refresh(body, provider=PROVIDER, domain="d", service="s", instance_id="../etc")


@pytest.mark.parametrize(
    ("dns", "uris", "expected"),
    [
        (DNS, URIS, UID),
        ([DNS[0]], URIS, UID),  # URI only
        (DNS, [URIS[0]], UID),  # DNS only
    ],
)
def test_instance_id_from_uri_or_dns(dns: list[str], uris: list[str], expected: str) -> None:
    assert instance_id_of(info(csr(dns=dns, uris=uris)), PROVIDER) == expected


@pytest.mark.parametrize(
    ("dns", "uris", "code"),
    [
        ([DNS[0]], [URIS[0]], "CSR_INSTANCE_ID_MISSING"),
        (DNS, [f"athenz://instanceid/other.provider/{UID}"], "CSR_INSTANCE_ID_PROVIDER_MISMATCH"),
        ([DNS[0], "x.instanceid.athenz.k8s.example.com"], URIS, "CSR_INSTANCE_ID_CONFLICT"),
        ([DNS[0]], [*URIS, f"athenz://instanceid/{PROVIDER}/other"], "CSR_INSTANCE_ID_CONFLICT"),
        ([DNS[0]], [f"athenz://instanceid/{PROVIDER}"], "CSR_INSTANCE_ID_INVALID"),
    ],
)
def test_instance_id_problems(dns: list[str], uris: list[str], code: str) -> None:
    with pytest.raises(BadRequest) as err:
        instance_id_of(info(csr(dns=dns, uris=uris)), PROVIDER)
    assert err.value.code == code


def test_check_csr_wants_cn_domain_dot_service_and_the_path_instance() -> None:
    req = parse_register(register_body())
    assert check_csr(req, info(csr())) == UID
    with pytest.raises(BadRequest) as err:
        check_csr(req, info(csr(cn="payments.billing")))
    assert err.value.code == "CSR_CN_MISMATCH"
    refresh = parse_refresh(
        json.dumps({"csr": csr()}).encode(),
        provider=PROVIDER,
        domain="sports.web",
        service="api",
        instance_id="another-instance",
    )
    with pytest.raises(BadRequest) as err:
        check_csr(refresh, info(csr()))
    assert err.value.code == "INSTANCE_ID_MISMATCH"


def test_confirmation_has_zts_attribute_names_and_comma_joined_lists() -> None:
    pem = csr(uris=[*URIS, "athenz://hostname/host1.example.com"])
    req: CertRequest = parse_register(register_body(csr=pem, hostname="host1.example.com"))
    got = build_confirmation(
        req,
        info(pem),
        instance_id=UID,
        client_ip="10.1.2.3",
        public_key_pem="-----BEGIN PUBLIC KEY-----\n...",
        principal="sports.web.api",
    )
    assert {k: v for k, v in got.items() if k != "attributes"} == {
        "provider": PROVIDER,
        "domain": "sports.web",
        "service": "api",
        "attestationData": "header.claims.signature",
    }
    assert got.get("attributes") == {
        "sanDNS": ",".join(DNS),
        "sanURI": ",".join([*URIS, "athenz://hostname/host1.example.com"]),
        "sanIP": "10.1.2.3",
        "clientIP": "10.1.2.3",
        "instanceId": UID,
        "csrPublicKey": "-----BEGIN PUBLIC KEY-----\n...",
        "hostname": "host1.example.com",
        "certHostname": "host1.example.com",
        "principal": "sports.web.api",
        "csr": pem,
    }


def test_confirmation_leaves_out_what_is_absent() -> None:
    pem = csr(ips=[])
    got = build_confirmation(
        parse_register(register_body(csr=pem)),
        info(pem),
        instance_id=UID,
        client_ip="127.0.0.1",
        forward_csr=False,
    )
    assert sorted(got.get("attributes", {})) == [
        "clientIP",
        "instanceId",
        "sanDNS",
        "sanURI",
    ]


@pytest.mark.parametrize(
    ("attributes", "expiry", "refresh", "usage", "ou"),
    [
        ({}, None, True, None, None),
        (
            {"certExpiryTime": "60", "certRefresh": "false", "certUsage": "client"},
            60,
            False,
            "client",
            None,
        ),
        (
            {"certExpiryTime": "0", "certUsage": "server", "certSubjectOU": "k8s"},
            None,
            True,
            "server",
            "k8s",
        ),
    ],
)
def test_grant_reads_the_cert_attributes(
    attributes: dict[str, str], expiry: int | None, refresh: bool, usage: str | None, ou: str | None
) -> None:
    grant = read_grant({"attributes": attributes})
    assert (grant.expiry_minutes, grant.refresh, grant.usage, grant.subject_ou) == (
        expiry,
        refresh,
        usage,
        ou,
    )


@pytest.mark.parametrize(
    "answer",
    [
        [],
        {"attributes": []},
        {"attributes": {"certExpiryTime": 60}},
        {"attributes": {"certExpiryTime": "-5"}},
        {"attributes": {"certUsage": "codeSigning"}},
    ],
)
def test_broken_grant_is_the_providers_fault(answer: object) -> None:
    with pytest.raises(Unavailable) as err:
        read_grant(answer)
    assert err.value.code == "PROVIDER_ANSWER_INVALID"


@pytest.mark.parametrize(
    ("requested", "granted", "expected"),
    [
        (None, None, 1440),
        (30, None, 30),
        (None, 90, 90),
        (30, 90, 30),
        (120, 90, 90),
        (None, 10**9, 43200),
        (10**9, None, 43200),
    ],
)
def test_lifetime_is_the_shortest_asked(
    requested: int | None, granted: int | None, expected: int
) -> None:
    assert lifetime_minutes(requested, granted, default=1440, maximum=43200) == expected
