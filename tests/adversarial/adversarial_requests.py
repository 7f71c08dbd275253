"""Corpus cases against the request: a genuine token with a request that names another
identity, asks for SANs it may not have, comes from a pod that is gone or changed,
or abuses JSON and HTTP itself.
"""

from __future__ import annotations

import base64
import gzip
import ipaddress
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

from identityd.keys.csr import build_csr, generate_key
from identityd.settings import DEFAULT_MAX_BODY_BYTES
from tests.adversarial.adversarial_world import (
    FRAMING,
    Case,
    Wire,
    World,
    bound,
    case,
    custom_csr,
    honest_names,
    raw_request,
)


def _public_pem(key: Any) -> str:
    text: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return text.decode("ascii")


# --- identity confusion (a genuine token; the request names something else) -------------


def identity_confusion() -> Iterator[Case]:
    cat = "identity confusion"

    def deny(
        name: str,
        codes: str | set[str],
        build: Callable[[World], dict[str, Any]],
        status: int = 403,
    ) -> Case:
        return case(cat, name, status, codes, lambda w: Wire(body=build(w)))

    # A request name that is not an Athenz name at all is also *_NAME_INVALID.
    bad_domain = {"DOMAIN_MISMATCH", "DOMAIN_NAME_INVALID"}
    for label, domain, domain_codes in (
        ("domain of another namespace", "payments", "DOMAIN_MISMATCH"),
        ("domain spelled as the namespace", "sports-web", "DOMAIN_MISMATCH"),
        ("domain in title case", "Sports.Web", "DOMAIN_MISMATCH"),
        ("domain with a trailing dot", "sports.web.", bad_domain),
        ("domain with a leading dot", ".sports.web", bad_domain),
        ("domain with a leading space", " sports.web", bad_domain),
        ("domain with a trailing space", "sports.web ", bad_domain),
        ("domain with a Cyrillic a", "sports.w\u0435b", bad_domain),
        ("domain with a full-width letter", "sports.\uff57eb", bad_domain),
        ("domain with a zero-width space", "sports.web\u200b", bad_domain),
        ("domain with an underscore", "sports_web", "DOMAIN_MISMATCH"),
        ("domain a parent of the real one", "sports", "DOMAIN_MISMATCH"),
        ("domain a child of the real one", "sports.web.admin", "DOMAIN_MISMATCH"),
    ):
        yield deny(label, domain_codes, bound(domain, lambda w, d: w.confirmation(domain=d)))
    bad_service = {"SERVICE_MISMATCH", "SERVICE_NAME_INVALID"}
    for label, service, service_codes in (
        ("service of another namespace", "billing", "SERVICE_MISMATCH"),
        ("service in upper case", "API", "SERVICE_MISMATCH"),
        ("service with a trailing dot", "api.", bad_service),
        ("service with a leading space", " api", bad_service),
        ("service with a Cyrillic a", "\u0430pi", bad_service),
        ("service with a zero-width joiner", "a\u200dpi", bad_service),
    ):
        yield deny(
            label, service_codes, bound(service, lambda w, s: w.confirmation(service=s))
        )
    yield deny(
        "service with a trailing tab",
        "BAD_REQUEST",
        lambda w: w.confirmation(service="api\t"),
        status=400,
    )
    yield deny(
        "domain with a NUL byte",
        "BAD_REQUEST",
        lambda w: w.confirmation(domain="sports.web\u0000"),
        status=400,
    )
    for label, provider in (
        ("another provider", "sys.auth.other"),
        ("provider in upper case", "SYS.AUTH.K8S"),
        ("provider with a trailing dot", "sys.auth.k8s."),
        ("provider with a Cyrillic s", "sys.auth.k8\u0455"),
    ):
        yield deny(
            label, "PROVIDER_MISMATCH", bound(provider, lambda w, p: w.confirmation(provider=p))
        )

    # Namespace-to-domain mapping: team--x is domain team-x, team-x is domain team.x.
    yield deny(
        "team--x asks for domain team.x",
        "DOMAIN_MISMATCH",
        lambda w: w.confirmation(w.pods.dash, domain="team.x"),
    )
    yield deny(
        "team--x asks for domain team--x",
        "DOMAIN_MISMATCH",
        lambda w: w.confirmation(w.pods.dash, domain="team--x"),
    )
    yield deny(
        "team-x asks for domain team-x",
        "DOMAIN_MISMATCH",
        lambda w: w.confirmation(w.pods.dot, domain="team-x"),
    )
    yield deny(
        "team-x asks for domain team--x",
        "DOMAIN_MISMATCH",
        lambda w: w.confirmation(w.pods.dot, domain="team--x"),
    )
    yield deny(
        "team-x asks for the SPIFFE id of team--x",
        "SAN_URI_NOT_ALLOWED",
        lambda w: w.confirmation(
            w.pods.dot,
            san_uri=["spiffe://team-x/sa/svc", w.cluster.identity(w.pods.dot).instance_uri],
        ),
    )
    yield deny(
        "team--x asks for the CN of team-x",
        "CSR_CN_MISMATCH",
        lambda w: w.confirmation(
            w.pods.dash,
            attributes={"csr": custom_csr(cn="team.x.svc", names=honest_names(w, w.pods.dash))},
        ),
    )

    # Instance ids.
    yield deny(
        "instanceId of another pod",
        "INSTANCE_ID_MISMATCH",
        lambda w: w.confirmation(attributes={"instanceId": w.pods.other.uid}),
    )
    yield deny(
        "instanceId in upper case",
        "INSTANCE_ID_MISMATCH",
        lambda w: w.confirmation(attributes={"instanceId": w.pods.api.uid.upper()}),
    )
    yield deny(
        "instanceId empty",
        "INSTANCE_ID_MISSING",
        lambda w: w.confirmation(attributes={"instanceId": ""}),
    )

    def without_instance_id(w: World) -> dict[str, Any]:
        body = w.confirmation()
        del body["attributes"]["instanceId"]
        return body

    yield deny("instanceId absent", "INSTANCE_ID_MISSING", without_instance_id)

    # A genuine token of one pod presented for another pod's identity.
    def replay(w: World) -> dict[str, Any]:
        return w.confirmation(w.pods.api, token=w.token(w.pods.billing))

    yield deny(
        "billing's token presented for api's identity",
        {
            "DOMAIN_MISMATCH",
            "SERVICE_MISMATCH",
            "INSTANCE_ID_MISMATCH",
            "CLIENT_IP_MISMATCH",
            "SAN_IP_NOT_ALLOWED",
            "SAN_DNS_NOT_ALLOWED",
            "SAN_URI_NOT_ALLOWED",
            "CSR_CN_MISMATCH",
        },
        replay,
    )
    yield deny(
        "another api pod's token presented with this pod's instance",
        {
            "INSTANCE_ID_MISMATCH",
            "CLIENT_IP_MISMATCH",
            "SAN_IP_NOT_ALLOWED",
            "SAN_DNS_NOT_ALLOWED",
            "SAN_URI_NOT_ALLOWED",
        },
        lambda w: w.confirmation(w.pods.api, token=w.token(w.pods.other)),
    )


# --- SAN abuse ------------------------------------------------------------------------------


def san_abuse() -> Iterator[Case]:
    cat = "SAN abuse"

    def deny(
        name: str,
        codes: str | set[str],
        build: Callable[[World], dict[str, Any]],
        status: int = 403,
    ) -> Case:
        return case(cat, name, status, codes, lambda w: Wire(body=build(w)))

    def dns_with(
        extra: Callable[[World], str], csr: bool = True
    ) -> Callable[[World], dict[str, Any]]:
        def build(w: World) -> dict[str, Any]:
            ident = w.cluster.identity(w.pods.api)
            return w.confirmation(san_dns=[ident.service_dns, extra(w)], csr=csr)

        return build

    for label, name in (
        ("wildcard for another service", "*.billing.payments.k8s.example.com"),
        ("wildcard for another namespace", "*.api.payments.k8s.example.com"),
        ("double wildcard", "*.*.k8s.example.com"),
        ("wildcard over the namespace", "*.sports-web.k8s.example.com"),
        ("wildcard over the suffix", "*.k8s.example.com"),
        ("bare wildcard", "*"),
        ("suffix confusion: .evil.com appended", "api.sports-web.k8s.example.com.evil.com"),
        ("suffix confusion: evil-k8s.example.com", "api.sports-web.evil-k8s.example.com"),
        ("suffix confusion: missing dot", "api.sports-webk8s.example.com"),
        ("suffix confusion: shortened suffix", "api.sports-web.k8s.example.co"),
        ("the dns suffix itself", "k8s.example.com"),
        ("service name in upper case", "API.sports-web.k8s.example.com"),
        ("trailing dot", "api.sports-web.k8s.example.com."),
        ("another service's name", "billing.payments.k8s.example.com"),
        ("the dotted domain instead of the label", "api.sports.web.k8s.example.com"),
        ("instance name of another pod", None),
        ("localhost", "localhost"),
    ):
        yield deny(
            f"SAN DNS {label}",
            "SAN_DNS_NOT_ALLOWED",
            dns_with(
                bound(name, lambda w, name: name or w.cluster.identity(w.pods.other).instance_dns)
            ),
        )
    for label, name in (
        ("with a Cyrillic a", "\u0430pi.sports-web.k8s.example.com"),
        ("with a leading space inside the item", "api .sports-web.k8s.example.com"),
        ("with a NUL-free zero-width space", "api\u200b.sports-web.k8s.example.com"),
    ):
        yield deny(
            f"SAN DNS {label} (no CSR)",
            "SAN_DNS_NOT_ALLOWED",
            dns_with(bound(name, lambda w, name: name), csr=False),
        )

    def ip_with(
        value: Callable[[World], str], csr: bool = True
    ) -> Callable[[World], dict[str, Any]]:
        return lambda w: w.confirmation(san_ip=[w.pods.api.ip, value(w)], csr=csr)

    yield deny("SAN IP of another pod", "SAN_IP_NOT_ALLOWED", ip_with(lambda w: w.pods.other.ip))
    yield deny(
        "SAN IP of a pod in another namespace",
        "SAN_IP_NOT_ALLOWED",
        ip_with(lambda w: w.pods.billing.ip),
    )
    yield deny(
        "SAN IP IPv4-mapped IPv6 of the pod",
        "SAN_IP_NOT_ALLOWED",
        ip_with(lambda w: "::ffff:" + w.pods.api.ip),
    )
    yield deny(
        "SAN IP IPv4-compatible IPv6 of the pod",
        "SAN_IP_NOT_ALLOWED",
        ip_with(lambda w: "::" + w.pods.api.ip),
    )
    yield deny("SAN IP loopback", "SAN_IP_NOT_ALLOWED", ip_with(lambda w: "127.0.0.1"))
    yield deny("SAN IP unspecified", "SAN_IP_NOT_ALLOWED", ip_with(lambda w: "0.0.0.0"))
    for label, text in (
        ("with leading zeros", "010.001.002.003"),
        ("as a /32 network", "10.1.2.3/32"),
        ("as one integer", "167838211"),
        ("in hex", "0x0a.0x01.0x02.0x03"),
        ("with a zone id", "fe80::1%eth0"),
        ("that is a hostname", "pod.local"),
        ("with a Cyrillic character", "10.1.2.\u0417"),
    ):
        yield deny(
            f"SAN IP {label} (no CSR)",
            "SAN_IP_NOT_ALLOWED",
            ip_with(bound(text, lambda w, text: text), csr=False),
        )

    for label, client_ip in (
        ("of another pod", lambda w: w.pods.other.ip),
        ("IPv4-mapped", lambda w: "::ffff:" + w.pods.api.ip),
        ("as a /32 network", lambda w: w.pods.api.ip + "/32"),
        ("with leading zeros", lambda w: "010.001.002.003"),
        ("empty", lambda w: ""),
    ):
        yield deny(
            f"clientIP {label}",
            "CLIENT_IP_MISMATCH",
            bound(client_ip, lambda w, c: w.confirmation(attributes={"clientIP": c(w)})),
        )

    def uri_with(
        value: Callable[[World], str], csr: bool = True
    ) -> Callable[[World], dict[str, Any]]:
        def build(w: World) -> dict[str, Any]:
            ident = w.cluster.identity(w.pods.api)
            return w.confirmation(san_uri=[ident.instance_uri, value(w)], csr=csr)

        return build

    for label, uri in (
        ("another trust domain", lambda w: "spiffe://evil.local/ns/sports-web/sa/api"),
        ("another Athenz domain", lambda w: "spiffe://payments/sa/billing"),
        (
            "another namespace in the trust domain",
            lambda w: "spiffe://cluster.local/ns/payments/sa/billing",
        ),
        ("another instance", lambda w: w.cluster.identity(w.pods.other).instance_uri),
        (
            "another provider's instance",
            lambda w: f"athenz://instanceid/sys.auth.other/{w.pods.api.uid}",
        ),
        ("spiffe path traversal", lambda w: "spiffe://sports.web/sa/api/../../payments/sa/billing"),
        (
            "k8s spiffe path traversal",
            lambda w: "spiffe://cluster.local/ns/sports-web/sa/../../payments/sa/billing",
        ),
        ("spiffe with userinfo", lambda w: "spiffe://admin@sports.web/sa/api"),
        ("spiffe with a query", lambda w: "spiffe://sports.web/sa/api?admin=true"),
        ("spiffe with a fragment", lambda w: "spiffe://sports.web/sa/api#admin"),
        ("spiffe with a port", lambda w: "spiffe://sports.web:443/sa/api"),
        ("spiffe with a trailing slash", lambda w: "spiffe://sports.web/sa/api/"),
        ("spiffe in upper case", lambda w: "SPIFFE://sports.web/sa/api"),
        ("spiffe percent-encoded", lambda w: "spiffe://sports.web/sa/%61pi"),
        ("https instead of spiffe", lambda w: "https://sports.web/sa/api"),
    ):
        yield deny(f"SAN URI {label}", "SAN_URI_NOT_ALLOWED", uri_with(uri))

    # The CSR asks for more (or other) than the request.
    def csr_of(
        names: Callable[[World], list[x509.GeneralName]],
        cn: str | None = "sports.web.api",
        key: Any = None,
    ) -> Callable[[World], dict[str, Any]]:
        return lambda w: w.confirmation(
            attributes={"csr": custom_csr(cn=cn, names=names(w), key=key() if key else None)}
        )

    yield deny(
        "CSR with an extra allowed DNS name the request lacks",
        "CSR_SAN_MISMATCH",
        csr_of(
            lambda w: [
                *honest_names(w, w.pods.api),
                x509.DNSName("*.api.sports-web.k8s.example.com"),
            ]
        ),
    )
    yield deny(
        "CSR with another pod's IP",
        {"CSR_SAN_MISMATCH", "SAN_IP_NOT_ALLOWED"},
        csr_of(
            lambda w: [
                *honest_names(w, w.pods.api),
                x509.IPAddress(ipaddress.ip_address(w.pods.other.ip)),
            ]
        ),
    )
    yield deny(
        "CSR without the request's URIs",
        "CSR_SAN_MISMATCH",
        csr_of(
            lambda w: [
                n
                for n in honest_names(w, w.pods.api)
                if not isinstance(n, x509.UniformResourceIdentifier)
            ]
        ),
    )
    yield deny(
        "CSR with another service's DNS name",
        {"CSR_SAN_MISMATCH", "SAN_DNS_NOT_ALLOWED"},
        csr_of(
            lambda w: [
                *honest_names(w, w.pods.api),
                x509.DNSName("billing.payments.k8s.example.com"),
            ]
        ),
    )
    for label, other in (
        ("an email SAN", lambda: x509.RFC822Name("admin@example.com")),
        (
            "a directoryName SAN",
            lambda: x509.DirectoryName(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "payments.billing")])
            ),
        ),
        ("a registeredID SAN", lambda: x509.RegisteredID(ObjectIdentifier("1.2.3.4"))),
        (
            "an otherName SAN",
            lambda: x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x05admin"),
        ),
    ):
        yield deny(
            f"CSR with {label}",
            "CSR_SAN_MISMATCH",
            csr_of(bound(other, lambda w, other: [*honest_names(w, w.pods.api), other()])),
        )
    for label, cn in (
        ("CN of another service", "payments.billing"),
        ("CN with a trailing dot", "sports.web.api."),
        ("CN in upper case", "SPORTS.WEB.API"),
        ("CN with a Cyrillic a", "sports.web.\u0430pi"),
        ("CN a wildcard", "*.sports.web.api"),
        ("CN missing", None),
    ):
        yield deny(
            f"CSR {label}", "CSR_CN_MISMATCH", csr_of(lambda w: honest_names(w, w.pods.api), cn=cn)
        )
    yield deny(
        "CSR with two CNs",
        "BAD_CSR",
        lambda w: w.confirmation(
            attributes={
                "csr": custom_csr(
                    cn=["sports.web.api", "payments.billing"], names=honest_names(w, w.pods.api)
                )
            }
        ),
        status=400,
    )
    yield deny(
        "CSR CN with a zero-width space",
        "BAD_CSR",
        csr_of(lambda w: honest_names(w, w.pods.api), cn="sports.web.api\u200b"),
        status=400,
    )
    yield deny(
        "CSR with an Ed25519 key",
        "CSR_KEY_TYPE_NOT_ALLOWED",
        csr_of(lambda w: honest_names(w, w.pods.api), key=ed25519.Ed25519PrivateKey.generate),
    )
    yield deny(
        "CSR with an RSA-1024 key",
        "CSR_KEY_WEAK",
        csr_of(
            lambda w: honest_names(w, w.pods.api),
            key=lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        ),
    )
    yield deny(
        "CSR with a P-521 key",
        "CSR_KEY_WEAK",
        csr_of(
            lambda w: honest_names(w, w.pods.api),
            key=lambda: ec.generate_private_key(ec.SECP521R1()),
        ),
    )
    yield deny(
        "CSR with a secp256k1 key",
        "CSR_KEY_WEAK",
        csr_of(
            lambda w: honest_names(w, w.pods.api),
            key=lambda: ec.generate_private_key(ec.SECP256K1()),
        ),
    )

    # No CSR, only csrPublicKey (what ZTS sends by default): the key is judged the same.
    def public_key_only(key: Callable[[], Any]) -> Callable[[World], dict[str, Any]]:
        return lambda w: w.confirmation(csr=False, attributes={"csrPublicKey": _public_pem(key())})

    yield deny(
        "csrPublicKey alone with an RSA-1024 key",
        "CSR_KEY_WEAK",
        public_key_only(lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024)),
    )
    yield deny(
        "csrPublicKey alone with a secp256k1 key",
        "CSR_KEY_WEAK",
        public_key_only(lambda: ec.generate_private_key(ec.SECP256K1())),
    )
    yield deny(
        "csrPublicKey alone with a P-192 key",
        "CSR_KEY_WEAK",
        public_key_only(lambda: ec.generate_private_key(ec.SECP192R1())),
    )
    yield deny(
        "csrPublicKey alone with an Ed25519 key",
        "CSR_KEY_TYPE_NOT_ALLOWED",
        public_key_only(ed25519.Ed25519PrivateKey.generate),
    )

    def damaged_signature(w: World) -> dict[str, Any]:
        ident = w.cluster.identity(w.pods.api)
        pem = build_csr(
            generate_key("EC"),
            cn=ident.common_name,
            dns=ident.san_dns(),
            ips=[w.pods.api.ip],
            uris=ident.san_uris(),
        )
        lines = pem.strip().splitlines()
        der = bytearray(base64.b64decode("".join(lines[1:-1])))
        der[-5] ^= 0xFF
        body = base64.encodebytes(bytes(der)).decode()
        return w.confirmation(attributes={"csr": f"{lines[0]}\n{body}{lines[-1]}\n"})

    yield deny("CSR whose signature does not verify", "CSR_SIGNATURE_INVALID", damaged_signature)
    yield deny(
        "two PEM blocks in the csr attribute",
        "BAD_CSR",
        lambda w: w.confirmation(attributes={"csr": 2 * w.confirmation()["attributes"]["csr"]}),
        status=400,
    )
    yield deny(
        "prose around the CSR",
        "BAD_CSR",
        lambda w: w.confirmation(
            attributes={"csr": "hello\n" + w.confirmation()["attributes"]["csr"]}
        ),
        status=400,
    )
    yield deny(
        "more SAN DNS entries than allowed",
        "BAD_REQUEST",
        lambda w: w.confirmation(san_dns=[f"n{i}.x" for i in range(40)], csr=False),
        status=400,
    )


# --- stale identity ---------------------------------------------------------------------------


def stale_identity() -> Iterator[Case]:
    cat = "stale identity"

    def deny(
        name: str,
        codes: str | set[str],
        build: Callable[[World], dict[str, Any]],
        path: str = "/instance",
    ) -> Case:
        return case(cat, name, 403, codes, lambda w: Wire(path=path, body=build(w)))

    for path in ("/instance", "/refresh"):
        kind = path[1:]
        yield deny(
            f"{kind}: deleted pod", "POD_NOT_FOUND", lambda w: w.confirmation(w.pods.gone), path
        )
        yield deny(
            f"{kind}: terminating pod",
            "POD_TERMINATING",
            lambda w: w.confirmation(w.pods.terminating),
            path,
        )
        yield deny(
            f"{kind}: pending pod",
            "POD_NOT_RUNNING",
            lambda w: w.confirmation(w.pods.pending),
            path,
        )

        def recycled(w: World) -> dict[str, Any]:
            old = replace(w.pods.api, uid="0badc0de-0000-4000-8000-000000000001")
            return w.confirmation(old)

        yield deny(
            f"{kind}: recycled name, the token names the old uid",
            "POD_UID_MISMATCH",
            recycled,
            path,
        )
        yield deny(
            f"{kind}: token names another node than the pod's",
            "NODE_MISMATCH",
            lambda w: w.confirmation(token=w.token(w.pods.api, node_name="node-2")),
            path,
        )
    yield deny("succeeded pod", "POD_NOT_RUNNING", lambda w: w.confirmation(w.pods.succeeded))
    yield deny("failed pod", "POD_NOT_RUNNING", lambda w: w.confirmation(w.pods.failed))
    yield deny(
        "pod runs as another service account",
        "POD_SERVICE_ACCOUNT_MISMATCH",
        lambda w: w.confirmation(w.pods.wrong_sa),
    )

    def renamed(w: World) -> dict[str, Any]:
        return w.confirmation(replace(w.pods.api, name="api-renamed"))

    yield deny("token names the pod's uid under another name", "POD_NAME_MISMATCH", renamed)

    def deleted_recreated_elsewhere(w: World) -> dict[str, Any]:
        # The token names pod api-1's uid but a namespace it was never in.
        moved = replace(w.pods.api, namespace="payments")
        return w.confirmation(moved)

    yield deny(
        "token names the pod's uid in another namespace",
        "POD_NAMESPACE_MISMATCH",
        deleted_recreated_elsewhere,
    )
    yield deny(
        "terminating pod on another node",
        {"POD_TERMINATING", "NODE_MISMATCH"},
        lambda w: w.confirmation(
            w.pods.terminating, token=w.token(w.pods.terminating, node_name="node-9")
        ),
    )


# --- protocol abuse ------------------------------------------------------------------------


def _legit_bytes(w: World) -> bytes:
    return json.dumps(w.confirmation(csr=False)).encode()


def protocol_abuse() -> Iterator[Case]:
    cat = "protocol abuse"
    json_type = {"Content-Type": "application/json"}

    def data(
        name: str,
        status: int,
        code: str,
        body: Callable[[World], bytes],
        headers: dict[str, str] | None = None,
    ) -> Case:
        return case(
            cat, name, status, code, lambda w: Wire(data=body(w), headers=headers or json_type)
        )

    def raw(
        name: str,
        status: int,
        code: str,
        pieces: Callable[[World], tuple[bytes, ...]],
        pause: float = 0.0,
    ) -> Case:
        return case(cat, name, status, code, lambda w: Wire(raw=pieces(w), pause=pause))

    limit = DEFAULT_MAX_BODY_BYTES
    yield data(
        "body over the limit", 413, "BODY_TOO_LARGE", lambda w: b'{"x":"' + b"a" * limit + b'"}'
    )
    yield raw(
        "body over the limit, Content-Length announces it",
        413,
        "BODY_TOO_LARGE",
        lambda w: raw_request("/instance", b"{}", headers={"Content-Length": str(10**9)}),
    )
    yield raw(
        "chunked body over the limit",
        413,
        "BODY_TOO_LARGE",
        lambda w: raw_request(
            "/instance",
            b"".join(b"4000\r\n" + b" " * 0x4000 + b"\r\n" for _ in range(6)) + b"0\r\n\r\n",
            headers={"Content-Length": None, "Transfer-Encoding": "chunked"},
        ),
    )
    yield data("JSON nested 9 deep", 400, "BAD_JSON", lambda w: b'{"a":' * 9 + b"1" + b"}" * 9)
    yield data("JSON nested 30000 deep", 400, "BAD_JSON", lambda w: b"[" * 30000 + b"]" * 30000)
    yield data(
        "duplicate top-level key",
        400,
        "BAD_JSON",
        lambda w: _legit_bytes(w)[:-1] + b', "domain": "payments"}',
    )
    yield data(
        "duplicate attribute key",
        400,
        "BAD_JSON",
        lambda w: _legit_bytes(w).replace(
            b'"attributes": {', b'"attributes": {"instanceId": "x", ', 1
        ),
    )
    yield data("NaN value", 400, "BAD_JSON", lambda w: _legit_bytes(w)[:-1] + b', "x": NaN}')
    yield data(
        "Infinity value", 400, "BAD_JSON", lambda w: _legit_bytes(w)[:-1] + b', "x": -Infinity}'
    )
    yield data(
        "UTF-8 byte-order mark", 400, "BAD_JSON", lambda w: b"\xef\xbb\xbf" + _legit_bytes(w)
    )
    yield data(
        "UTF-16 body",
        400,
        "BAD_JSON",
        lambda w: _legit_bytes(w).decode().encode("utf-16"),
        {"Content-Type": "application/json; charset=utf-16"},
    )
    yield data("invalid UTF-8", 400, "BAD_JSON", lambda w: b'{"provider": "\xff\xfe"}')
    yield data("empty body", 400, "BAD_JSON", lambda w: b"")
    yield data(
        "trailing garbage after the object", 400, "BAD_JSON", lambda w: _legit_bytes(w) + b"{}"
    )
    for label, body in (
        ("null", b"null"),
        ("an array", b"[]"),
        ("a number", b"7"),
        ("a string", b'"x"'),
    ):
        yield data(f"body that is {label}", 400, "BAD_REQUEST", bound(body, lambda w, b: b))
    yield data(
        "attributes a list",
        400,
        "BAD_REQUEST",
        lambda w: json.dumps({**w.confirmation(csr=False), "attributes": []}).encode(),
    )
    yield data(
        "attribute value a number",
        400,
        "BAD_REQUEST",
        lambda w: json.dumps(w.confirmation(csr=False, attributes={"x": 1})).encode(),
    )
    yield data(
        "attestationData an object",
        400,
        "BAD_REQUEST",
        lambda w: json.dumps(
            {**w.confirmation(csr=False), "attestationData": {"identityToken": "x"}}
        ).encode(),
    )
    yield data(
        "65 attributes",
        400,
        "BAD_REQUEST",
        lambda w: json.dumps(
            w.confirmation(csr=False, attributes={f"a{i}": "x" for i in range(65)})
        ).encode(),
    )
    yield data(
        "attribute longer than 4096 characters",
        400,
        "BAD_REQUEST",
        lambda w: json.dumps(
            w.confirmation(csr=False, attributes={"hostname": "h" * 4097})
        ).encode(),
    )
    yield data(
        "newline in an attribute",
        400,
        "BAD_REQUEST",
        lambda w: json.dumps(w.confirmation(csr=False, attributes={"hostname": "a\nb"})).encode(),
    )
    yield data(
        "C1 control character (NEL) in the domain",
        400,
        "BAD_REQUEST",
        lambda w: _legit_bytes(w).replace(b'"sports.web"', b'"sports.web\\u0085"', 1),
    )
    yield data(
        "C1 control character in an attribute",
        400,
        "BAD_REQUEST",
        lambda w: json.dumps(
            w.confirmation(csr=False, attributes={"hostname": "a\u009bb"})
        ).encode(),
    )
    yield data(
        "lone surrogate in the domain",
        400,
        "BAD_REQUEST",
        lambda w: _legit_bytes(w).replace(b'"sports.web"', b'"sports.web\\ud800"', 1),
    )
    yield data(
        "lone surrogate in an attribute",
        400,
        "BAD_REQUEST",
        lambda w: json.dumps(w.confirmation(csr=False, attributes={"hostname": "\udc00"})).encode(),
    )
    yield data(
        "csr attribute over 16 KiB",
        400,
        "BAD_CSR",
        lambda w: json.dumps(
            w.confirmation(csr=False, attributes={"csr": "A" * (16 * 1024 + 1)})
        ).encode(),
    )
    for label, content_type in (
        ("text/plain", "text/plain"),
        ("form-urlencoded", "application/x-www-form-urlencoded"),
        ("application/jsonx", "application/jsonx"),
        ("JSON patch", "application/json-patch+json"),
        ("multipart", "multipart/form-data; boundary=x"),
    ):
        yield data(
            f"Content-Type {label}",
            400,
            "BAD_CONTENT_TYPE",
            _legit_bytes,
            {"Content-Type": content_type},
        )
    yield raw(
        "no Content-Type",
        400,
        "BAD_CONTENT_TYPE",
        lambda w: raw_request("/instance", _legit_bytes(w), headers={"Content-Type": None}),
    )

    def bomb(compress: Callable[[bytes], bytes], encoding: str) -> Callable[[World], Wire]:
        payload = b'{"x":"' + b"0" * (16 * 1024 * 1024) + b'"}'
        packed = compress(payload)
        return lambda w: Wire(
            data=packed, headers={"Content-Type": "application/json", "Content-Encoding": encoding}
        )

    yield case(
        cat, "gzip bomb (16 MiB in a few KiB)", 413, "BODY_TOO_LARGE", bomb(gzip.compress, "gzip")
    )
    yield case(
        cat,
        "deflate bomb (16 MiB in a few KiB)",
        413,
        "BODY_TOO_LARGE",
        bomb(zlib.compress, "deflate"),
    )
    yield case(
        cat,
        "gzip Content-Encoding over bytes that are not gzip",
        400,
        "BAD_BODY",
        lambda w: Wire(
            data=_legit_bytes(w),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ),
    )

    # Framing lies: refused by the HTTP parser or cut off by the body timeout.
    yield raw(
        "Content-Length shorter than the body",
        400,
        FRAMING,
        lambda w: raw_request("/instance", _legit_bytes(w), headers={"Content-Length": "10"}),
    )
    yield raw(
        "Content-Length longer than the body, then silence",
        400,
        "BODY_TIMEOUT",
        lambda w: raw_request("/instance", b'{"provider":', headers={"Content-Length": "1000"}),
    )
    yield raw(
        "chunk size larger than the data sent, then silence",
        400,
        "BODY_TIMEOUT",
        lambda w: raw_request(
            "/instance",
            b'1000\r\n{"provider":',
            headers={"Content-Length": None, "Transfer-Encoding": "chunked"},
        ),
    )
    yield raw(
        "chunk size that is not hex",
        400,
        FRAMING,
        lambda w: raw_request(
            "/instance",
            b"zz\r\n{}\r\n0\r\n\r\n",
            headers={"Content-Length": None, "Transfer-Encoding": "chunked"},
        ),
    )
    yield raw(
        "both Content-Length and Transfer-Encoding",
        400,
        FRAMING,
        lambda w: raw_request(
            "/instance", b"2\r\n{}\r\n0\r\n\r\n", headers={"Transfer-Encoding": "chunked"}
        ),
    )
    yield raw(
        "negative Content-Length",
        400,
        FRAMING,
        lambda w: raw_request("/instance", b"{}", headers={"Content-Length": "-1"}),
    )
    yield raw(
        "two different Content-Length headers",
        400,
        FRAMING,
        lambda w: (
            b"POST /instance HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\nContent-Length: 20\r\nConnection: close\r\n\r\n{}",
        ),
    )
    yield raw(
        "Transfer-Encoding other than chunked",
        400,
        FRAMING,
        lambda w: raw_request(
            "/instance", b"{}", headers={"Content-Length": None, "Transfer-Encoding": "gzip"}
        ),
    )
    yield raw(
        "slow client: the body one piece every 0.1 s",
        400,
        "BODY_TIMEOUT",
        lambda w: raw_request("/instance", _legit_bytes(w), pieces=12),
        pause=0.1,
    )
