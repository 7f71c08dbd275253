"""Building the policy input document: table-driven over the pure builder."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from identityd.callback.policy_input import build_input, normalise_ip
from identityd.callback.request import CallbackRequest, parse_request
from identityd.inventory.base import PodRecord
from identityd.settings import IdentitySettings
from identityd.tokens.base import TokenClaims

CLAIMS = TokenClaims(
    issuer="iss",
    audience=("identityd",),
    subject="system:serviceaccount:sports-web:api",
    namespace="sports-web",
    service_account="api",
    service_account_uid="sa-uid",
    pod_name="api-1",
    pod_uid="uid-1",
    node_name="node-1",
    node_uid="node-uid",
    issued_at=1000,
    expires_at=4600,
    not_before=1000,
)
POD = PodRecord(
    uid="uid-1",
    namespace="sports-web",
    name="api-1",
    service_account="api",
    phase="Running",
    ips=("10.1.2.3", "fd00:0:0::1"),
    node_name="node-1",
)


def request(**attributes: str) -> CallbackRequest:
    body = {
        "provider": "p",
        "domain": "sports.web",
        "service": "api",
        "attestationData": "a.b.c",
        "attributes": attributes,
    }
    return parse_request("instance", json.dumps(body).encode())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.3", "10.1.2.3"),
        (" 10.1.2.3 ", "10.1.2.3"),
        ("FD00:0:0::1", "fd00::1"),
        ("::ffff:10.1.2.3", "::ffff:a01:203"),
        ("fe80::1%eth0", None),
        ("010.1.2.3", None),
        ("10.1.2", None),
        ("", None),
        ("1.2.3.4/32", None),
    ],
)
def test_normalise_ip(text: str, expected: str | None) -> None:
    assert normalise_ip(text) == expected


def test_input_document_shape() -> None:
    req = request(
        instanceId="uid-1",
        clientIP="10.1.2.3",
        sanIP="10.1.2.3, bogus, FD00::1",
        sanDNS="a,b",
        csr="-----BEGIN...",
    )
    doc = build_input(req, CLAIMS, POD, None, IdentitySettings(), now=1100)
    assert doc["version"] == 1 and doc["kind"] == "instance"
    assert doc["request"]["attributes"]["sanDNS"] == ["a", "b"]
    assert doc["request"]["attributes"]["sanURI"] == []
    assert "csr" not in doc["request"]["attributes"]
    assert doc["token"]["pod"] == {"name": "api-1", "uid": "uid-1"}
    assert doc["token"]["node"] == {"name": "node-1", "uid": "node-uid"}
    assert doc["pod"]["ips"] == ["10.1.2.3", "fd00::1"] and doc["pod"]["found_by"] == "uid"
    assert doc["pod"]["terminating"] is False
    assert doc["csr"] is None
    assert doc["facts"] == {
        "now": 1100,
        "token_age_seconds": 100,
        "client_ip": "10.1.2.3",
        "client_ip_valid": True,
        "san_ips": ["10.1.2.3", "fd00::1"],
        "san_ips_invalid": ["bogus"],
        "csr_ips_invalid": [],
    }
    json.dumps(doc, allow_nan=False)  # the engines get JSON


@pytest.mark.parametrize(
    ("attributes", "client_ip", "valid"),
    [({}, "", False), ({"clientIP": "nope"}, "", False), ({"clientIP": "::1"}, "::1", True)],
)
def test_client_ip_fact(attributes: dict[str, str], client_ip: str, valid: bool) -> None:
    doc = build_input(request(**attributes), CLAIMS, POD, None, IdentitySettings(), now=1000)
    assert (doc["facts"]["client_ip"], doc["facts"]["client_ip_valid"]) == (client_ip, valid)


def test_missing_pod_and_node_are_null() -> None:

    claims = replace(CLAIMS, node_name=None, node_uid=None)
    doc = build_input(request(), claims, None, None, IdentitySettings(), now=1000)
    assert doc["pod"] is None and doc["token"]["node"] is None


def test_terminating_pod_and_name_lookup() -> None:

    pod = replace(POD, deletion_timestamp="2026-01-01T00:00:00Z", uid="uid-new")
    doc = build_input(request(), CLAIMS, pod, None, IdentitySettings(), now=1000, found_by="name")
    assert doc["pod"]["terminating"] is True and doc["pod"]["found_by"] == "name"
