"""A development stand-in for a cluster: a token issuer, pods, and the requests an
honest agent would cause. For the demo, the tests and the benchmarks; not for production."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from identityd.keys.csr import build_csr, generate_key
from identityd.keys.issuer import TokenIssuer
from identityd.naming import WorkloadIdentity
from identityd.settings import IdentitySettings, Settings, TokenSettings

DEV_ISSUER = "https://kubernetes.default.svc.cluster.local"
DEV_AUDIENCE = "identityd"
DEV_PROVIDER = "sys.auth.k8s"
DEV_DNS_SUFFIX = "k8s.example.com"
DEV_TRUST_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class DevPod:
    namespace: str
    name: str
    service_account: str
    ip: str
    node: str = "node-1"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    phase: str = "Running"
    terminating: bool = False

    def manifest(self) -> dict[str, Any]:
        """The Pod as the API server would serve it (the parts identityd reads)."""
        metadata: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "labels": {"app": self.service_account},
            "resourceVersion": "1",
        }
        if self.terminating:
            metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": {"serviceAccountName": self.service_account, "nodeName": self.node},
            "status": {
                "phase": self.phase,
                "podIP": self.ip,
                "podIPs": [{"ip": self.ip}],
                "startTime": "2026-01-01T00:00:00Z",
            },
        }


class DevCluster:
    """Pods plus a TokenIssuer that signs their bound tokens like TokenRequest does."""

    def __init__(
        self,
        *,
        issuer: str = DEV_ISSUER,
        audience: str = DEV_AUDIENCE,
        provider: str = DEV_PROVIDER,
        dns_suffix: str = DEV_DNS_SUFFIX,
        trust_domain: str = DEV_TRUST_DOMAIN,
        key_type: str = "RSA",
    ) -> None:
        self.issuer = TokenIssuer(issuer, key_type=key_type)
        self.audience = audience
        self.provider = provider
        self.dns_suffix = dns_suffix
        self.trust_domain = trust_domain
        self.pods: list[DevPod] = []
        self._node_uids: dict[str, str] = {}

    def add_pod(
        self, namespace: str, name: str, service_account: str, ip: str, **kwargs: Any
    ) -> DevPod:
        pod = DevPod(namespace, name, service_account, ip, **kwargs)
        self.pods.append(pod)
        return pod

    def write(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``pods.json`` (a v1/PodList) and ``jwks.json``; return their paths."""
        root = Path(directory)
        pods, jwks = root / "pods.json", root / "jwks.json"
        pods.write_text(
            json.dumps(
                {"apiVersion": "v1", "kind": "PodList", "items": [p.manifest() for p in self.pods]}
            )
        )
        self.issuer.write_jwks(jwks)
        return pods, jwks

    def settings(self, directory: str | Path, *, policies: str | Path, **fields: Any) -> Settings:
        """identityd's Settings for this cluster on embedded defaults: writes the pod
        list and JWKS into ``directory``; ``fields`` override Settings' own fields."""
        pods, jwks = self.write(directory)
        return Settings(
            identity=IdentitySettings(
                provider=self.provider,
                dns_suffixes=(self.dns_suffix,),
                trust_domain=self.trust_domain,
            ),
            tokens=TokenSettings(
                issuer=self.issuer.issuer, audiences=(self.audience,), jwks=str(jwks)
            ),
            pods=str(pods),
            policies=str(policies),
            workers=1,
            **fields,
        )

    def identity(self, pod: DevPod) -> WorkloadIdentity:
        return WorkloadIdentity(
            namespace=pod.namespace,
            service_account=pod.service_account,
            pod_uid=pod.uid,
            provider=self.provider,
            dns_suffix=self.dns_suffix,
            trust_domain=self.trust_domain,
        )

    def token(self, pod: DevPod, **kwargs: Any) -> str:
        kwargs.setdefault("audiences", [self.audience])
        kwargs.setdefault("node_name", pod.node)
        return self.issuer.mint(pod.namespace, pod.service_account, pod.name, pod.uid, **kwargs)

    def confirmation(
        self,
        pod: DevPod,
        *,
        token: str | None = None,
        csr: bool = True,
        public_key: bool = True,
        key: Any = None,
        san_dns: list[str] | None = None,
        san_ip: list[str] | None = None,
        san_uri: list[str] | None = None,
        attributes: dict[str, str] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """The InstanceConfirmation ZTS would send for an honest agent in ``pod``:
        the agent's CSR (``csr``) and, as ZTS adds it, attribute ``csrPublicKey``
        with that key (``public_key``); one key, ``key`` or a fresh P-256 one.

        Override any SAN list, attribute or top-level field to forge one."""
        ident = self.identity(pod)
        dns = ident.san_dns() if san_dns is None else san_dns
        ips = [pod.ip] if san_ip is None else san_ip
        uris = ident.san_uris() if san_uri is None else san_uri
        attrs = {
            "instanceId": pod.uid,
            "clientIP": pod.ip,
            "sanDNS": ",".join(dns),
            "sanIP": ",".join(ips),
            "sanURI": ",".join(uris),
            "hostname": pod.name,
            "certHostname": ident.service_dns,
        }
        if csr or public_key:
            key = key or generate_key("EC")
        if csr:
            attrs["csr"] = build_csr(key, cn=ident.common_name, dns=dns, ips=ips, uris=uris)
        attrs.update(attributes or {})
        given = attributes or {}
        if public_key and "csrPublicKey" not in given:
            # ZTS states the CSR's own key: a CSR the caller passed may be of another.
            given_key = _csr_key(given.get("csr")) if "csr" in given else None
            attrs["csrPublicKey"] = _public_pem(given_key or key.public_key())
        body = {
            "provider": self.provider,
            "domain": ident.domain,
            "service": ident.service,
            "attestationData": token if token is not None else self.token(pod),
            "attributes": attrs,
        }
        body.update(fields)
        return body


def _public_pem(public_key: Any) -> str:
    return str(
        public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
    )


def _csr_key(pem: object) -> Any:
    """The key of a CSR given as an attribute (ZTS states the CSR's own key);
    None when it is not a CSR (a test sending a broken one)."""
    if not isinstance(pem, str):
        return None
    try:
        return x509.load_pem_x509_csr(pem.encode()).public_key()
    except ValueError:
        return None
