"""Corpus cases of requests that try to grant themselves something through the answer.

An allow hands the InstanceConfirmation back to the CA, and ZTS reads attributes of
that answer as the provider's grant (certSSH, certSubjectOU, certUsage,
certExpiryTime, ...). These requests are otherwise legitimate, so they are allowed:
a case is judged by the answer's attributes, which must be exactly those of the same
request without the smuggled attributes (the policy's grant and the instance echo).
Before, every smuggled attribute came back unchanged, as if approved.
"""

from __future__ import annotations

from dataclasses import dataclass

# InstanceProvider's attribute names a provider may return (and a few more it sends).
GRANTS = {
    "certSSH": "true",
    "certSubjectOU": "admin",
    "attestedSshCertPrincipals": "root,*",
    "certUsage": "server",
    "certExpiryTime": "5256000",
    "certRefresh": "true",
    "certSubjectDn": "CN=admin,O=Athenz",
    "certIssuerDn": "CN=Athenz CA",
    "certRsaModHash": "00ff",
    "certHostname": "admin.example.com",
    "instanceCloud": "aws",
    "instancePrivateIp": "10.9.9.9",
    "awsAccount": "123456789012",
    "azureSubscription": "sub",
    "gcpProject": "project",
    "principal": "sys.auth.admin",
}


@dataclass(frozen=True)
class GrantCase:
    name: str
    attributes: dict[str, str]
    path: str = "/instance"
    csr: bool = True


def grant_smuggling() -> list[GrantCase]:
    cases = [GrantCase(f"{name}={value}", {name: value}) for name, value in GRANTS.items()]
    cases += [
        GrantCase("every grant at once", dict(GRANTS)),
        GrantCase("every grant at once, no CSR", dict(GRANTS), csr=False),
        GrantCase("every grant at once on /refresh", dict(GRANTS), path="/refresh"),
        GrantCase(
            "every grant at once on /refresh, no CSR", dict(GRANTS), path="/refresh", csr=False
        ),
        GrantCase("certSSH in other case", {"CertSSH": "true", "CERTSSH": "true"}),
        GrantCase("certSSH with a space", {"certSSH ": "true", " certSSH": "true"}),
        GrantCase("an unknown attribute", {"x-identityd-admin": "true"}),
        GrantCase("instanceId in lower case", {"instanceid": "0badc0de"}),
    ]
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError("duplicate grant case names")
    return cases
