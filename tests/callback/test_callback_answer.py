"""An allow answers with the request's instance-describing attributes and the policy's
grant, nothing else: attributes the CA reads as a grant (certSSH, certSubjectOU,
attestedSshCertPrincipals, ...) and unknown ones never come back because the request
carried them."""

from __future__ import annotations

from typing import Any

import pytest

from identityd.callback.answer import ECHOED_ATTRIBUTES, answer_attributes
from identityd.devca.workload import DevCluster
from tests.conftest import Pods, Service

# What a requester might try to grant itself (InstanceProvider's names and others).
SMUGGLED = {
    "certSSH": "true",
    "certSubjectOU": "admin",
    "attestedSshCertPrincipals": "root,*",
    "certUsage": "server",
    "certExpiryTime": "5256000",
    "certRefresh": "true",
    "certSubjectDn": "CN=admin",
    "certIssuerDn": "CN=Athenz CA",
    "certRsaModHash": "00",
    "principal": "sys.auth.admin",
    "instancePrivateIp": "10.9.9.9",
    "awsAccount": "123456789012",
    "x-grant": "everything",
}


@pytest.mark.parametrize(
    ("requested", "granted", "answer"),
    [
        ({}, {}, {}),
        ({"instanceId": "u", "sanDNS": "a,b"}, {}, {"instanceId": "u", "sanDNS": "a,b"}),
        (
            {"certSSH": "true", "certSubjectOU": "admin", "hostname": "h"},
            {"certExpiryTime": "60"},
            {"hostname": "h", "certExpiryTime": "60"},
        ),
        # The decision wins over an echoed value, and may grant any name.
        (
            {"clientIP": "10.1.2.3", "certUsage": "server"},
            {"certUsage": "client", "certSubjectOU": "web", "clientIP": "x"},
            {"clientIP": "x", "certUsage": "client", "certSubjectOU": "web"},
        ),
        (
            {name: "v" for name in ("csr", "csrPublicKey", "certHostname", "Instanceid")},
            {},
            {},
        ),
    ],
    ids=["empty", "echo", "drop-grants", "decision-wins", "drop-keys-and-case-variants"],
)
def test_answer_attributes(
    requested: dict[str, str], granted: dict[str, str], answer: dict[str, str]
) -> None:
    assert answer_attributes(requested, granted) == answer


def test_the_echo_allowlist_is_instance_description_only() -> None:
    assert {"instanceId", "sanDNS", "sanIP", "sanURI", "clientIP", "hostname"} == ECHOED_ATTRIBUTES


@pytest.mark.parametrize("path", ["instance", "refresh"])
@pytest.mark.parametrize("csr", [True, False], ids=["csr", "csrPublicKey"])
async def test_smuggled_grant_attributes_are_not_echoed(
    service: Service, cluster: DevCluster, pods: Pods, path: str, csr: bool
) -> None:
    status, control = await service.post(path, cluster.confirmation(pods.api, csr=csr))
    assert status == 200, control
    body = cluster.confirmation(pods.api, csr=csr, attributes=dict(SMUGGLED))
    status, answer = await service.post(path, body)
    assert status == 200, answer
    # Exactly what the honest request gets: the policy's grant and the instance echo.
    assert answer["attributes"] == control["attributes"]
    attributes: dict[str, Any] = answer["attributes"]
    assert attributes["certExpiryTime"] == str(service.settings.identity.cert_expiry_minutes)
    assert (attributes["certUsage"], attributes["certRefresh"]) == ("client", "true")
    for name in set(SMUGGLED) - {"certUsage", "certExpiryTime", "certRefresh"}:
        assert name not in attributes
    assert set(attributes) == ECHOED_ATTRIBUTES | {"certExpiryTime", "certRefresh", "certUsage"}
    assert {k: attributes[k] for k in ECHOED_ATTRIBUTES} == {
        k: body["attributes"][k] for k in ECHOED_ATTRIBUTES
    }
    # The rest of the confirmation is echoed as before (DESIGN §2).
    assert {k: answer[k] for k in ("provider", "domain", "service", "attestationData")} == {
        k: body[k] for k in ("provider", "domain", "service", "attestationData")
    }


async def test_neither_the_csr_nor_the_key_comes_back(
    service: Service, cluster: DevCluster, pods: Pods
) -> None:
    status, answer = await service.post("instance", cluster.confirmation(pods.api))
    assert status == 200, answer
    assert "csr" not in answer["attributes"] and "csrPublicKey" not in answer["attributes"]
    assert "BEGIN" not in str(answer)
