"""The identity conventions of DESIGN §3 in Python, for the agent, the dev CA and the demo.

The default policies encode the same conventions in Rego (they are the
authority at decision time); tests check the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

_SENTINEL = "\x00"


def namespace_to_domain(namespace: str) -> str:
    """``sports-web`` → ``sports.web``; ``a--b`` → ``a-b`` (``--`` is a literal dash)."""
    return namespace.replace("--", _SENTINEL).replace("-", ".").replace(_SENTINEL, "-")


def domain_to_dns_label(domain: str) -> str:
    """``sports.web`` → ``sports-web``, the form used inside SAN DNS names."""
    return domain.replace(".", "-")


@dataclass(frozen=True)
class WorkloadIdentity:
    """What a pod is entitled to, derived from its namespace and service account."""

    namespace: str
    service_account: str
    pod_uid: str
    provider: str
    dns_suffix: str
    trust_domain: str

    @property
    def domain(self) -> str:
        return namespace_to_domain(self.namespace)

    @property
    def service(self) -> str:
        return self.service_account

    @property
    def common_name(self) -> str:
        return f"{self.domain}.{self.service}"

    @property
    def service_dns(self) -> str:
        return f"{self.service}.{domain_to_dns_label(self.domain)}.{self.dns_suffix}"

    @property
    def instance_dns(self) -> str:
        return f"{self.pod_uid}.instanceid.athenz.{self.dns_suffix}"

    @property
    def athenz_spiffe_uri(self) -> str:
        return f"spiffe://{self.domain}/sa/{self.service}"

    @property
    def k8s_spiffe_uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def instance_uri(self) -> str:
        return f"athenz://instanceid/{self.provider}/{self.pod_uid}"

    def san_dns(self) -> list[str]:
        return [self.service_dns, self.instance_dns]

    def san_uris(self) -> list[str]:
        return [self.athenz_spiffe_uri, self.instance_uri]
