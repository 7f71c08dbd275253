"""Read a PEM CSR into a :class:`CSRInfo`, and the key/CSR recipes the agent and dev CA use.

Parsing is an edge: whatever cryptography raises on hostile input is translated
here into ``BadRequest("BAD_CSR")``; a CSR that parses but whose self-signature
does not verify is ``InvalidCSR("CSR_SIGNATURE_INVALID")``. Details name what
was wrong, never the CSR's bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import unicodedata
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dh, dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from identityd.errors import BadRequest, InvalidCSR
from identityd.keys.csr_info import CSRInfo
from identityd.keys.key_checks import check_public_key, csr_spki_der
from identityd.keys.key_info import SOURCE_CSR_PUBLIC_KEY, KeyInfo
from identityd.settings import MAX_CSR_BYTES, MAX_SAN_ENTRIES

# The keys the recipes make and sign with.
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

# The second label is what old Netscape and Microsoft tools write.
_PEM_LABELS = ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
# ZTS sends a SubjectPublicKeyInfo; PKCS#1 is read too (an RSA key only).
_PUBLIC_KEY_LABELS = ("PUBLIC KEY", "RSA PUBLIC KEY")
_PEM_BLOCK = re.compile(
    r"-----BEGIN (?P<label>[A-Z0-9 ]+)-----\r?\n(?P<body>.*?)-----END (?P=label)-----", re.DOTALL
)
_ANY_BEGIN = re.compile(r"-----BEGIN ")
_NAME_LENGTHS = {  # (min, max) UTF-8 bytes, RFC 5280 upper bounds
    NameOID.COUNTRY_NAME: (2, 2),
    NameOID.JURISDICTION_COUNTRY_NAME: (2, 2),
    NameOID.COMMON_NAME: (1, 64),
}
_RSA_BITS = (2048, 3072, 4096)


def _bad(detail: str) -> BadRequest:
    return BadRequest("BAD_CSR", detail)


# --- parsing -----------------------------------------------------------------------------------


def parse_csr(pem: str) -> CSRInfo:
    """Parse and verify one PEM CSR.

    Raises ``BadRequest("BAD_CSR")`` for anything malformed, oversized or
    ambiguous, or whose key is broken or not canonically encoded (see
    key_checks; checked before the signature), and
    ``InvalidCSR("CSR_SIGNATURE_INVALID")`` when the self-signature does not
    verify. Weak keys parse fine: policy judges them.
    """
    if not isinstance(pem, str):
        raise TypeError(f"pem: expected str, got {type(pem).__name__}")
    der = _pem_to_der(pem)
    try:
        csr = x509.load_der_x509_csr(der)
        info = _read(csr, der)
        signature_ok = csr.is_signature_valid
    except BadRequest:
        raise
    except Exception as exc:
        # The boundary: on hostile DER cryptography raises ValueError, InvalidVersion,
        # DuplicateExtension, UnsupportedAlgorithm, ... with no common base but Exception.
        raise _bad(f"unreadable CSR ({type(exc).__name__})") from exc
    if not signature_ok:
        raise InvalidCSR("CSR_SIGNATURE_INVALID", "the CSR's self-signature does not verify")
    return info


def _pem_to_der(pem: str, labels: Sequence[str] = _PEM_LABELS, code: str = "BAD_CSR") -> bytes:
    """The DER of the one PEM block in ``pem`` whose label is one of ``labels``."""
    # Checked on characters before any work; non-ASCII is refused, so chars == bytes.
    if len(pem) > MAX_CSR_BYTES:
        raise BadRequest(code, f"PEM larger than {MAX_CSR_BYTES} bytes")
    if not pem.isascii():
        raise BadRequest(code, "PEM contains non-ASCII characters")
    if len(_ANY_BEGIN.findall(pem)) != 1:
        raise BadRequest(code, "expected exactly one PEM block")
    match = _PEM_BLOCK.search(pem)
    if match is None or match["label"] not in labels:
        raise BadRequest(code, f"not a PEM {' or '.join(labels)}")
    # Only whitespace may surround the block: a CSR is not a place for prose.
    if pem[: match.start()].strip() or pem[match.end() :].strip():
        raise BadRequest(code, "unexpected text around the PEM block")
    body = "".join(match["body"].split())
    if not body:
        raise BadRequest(code, "empty PEM block")
    try:
        return base64.b64decode(body, validate=True)
    except binascii.Error as exc:
        raise BadRequest(code, "broken base64 in the PEM block") from exc


def _read(csr: x509.CertificateSigningRequest, der: bytes) -> CSRInfo:
    _check_name(csr.subject, "subject")
    cn = _common_name(csr.subject)
    dns, ips, uris, other = _sans(csr)
    public_key = csr.public_key()
    facts = _key_facts(public_key)
    if facts is None:
        raise _bad(f"unsupported key type {type(public_key).__name__}")
    key_type, key_bits, curve = facts
    # The same rules as for csrPublicKey, on the key exactly as the CSR carries it.
    spki = check_public_key(public_key, csr_spki_der(der), code="BAD_CSR")
    return CSRInfo(
        cn=cn,
        dns=dns,
        ips=ips,
        uris=uris,
        other_sans=other,
        key_type=key_type,
        key_bits=key_bits,
        curve=curve,
        public_key_sha256=hashlib.sha256(spki).hexdigest(),
        subject=csr.subject.rfc4514_string(),
    )


def _common_name(subject: x509.Name) -> str | None:
    values = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not values:
        return None
    if len(values) > 1:
        # Which CN would the CA put in the certificate? Refuse rather than guess.
        raise _bad(f"{len(values)} CNs in the subject")
    value = values[0].value
    if not isinstance(value, str):
        raise _bad("CN is not a string")
    return _check_text(value, "CN")


def _sans(
    csr: x509.CertificateSigningRequest,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    # Reading .extensions parses them all; a repeated extension raises DuplicateExtension.
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return (), (), (), ()
    dns: list[str] = []
    ips: list[str] = []
    uris: list[str] = []
    other: list[str] = []
    for name in ext.value:
        if isinstance(name, x509.DNSName):
            dns.append(_check_text(name.value, "SAN DNS"))
        elif isinstance(name, x509.IPAddress):
            if not isinstance(name.value, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise _bad("SAN IP is a network, not an address")
            ips.append(name.value.compressed)
        elif isinstance(name, x509.UniformResourceIdentifier):
            uris.append(_check_text(name.value, "SAN URI"))
        else:
            other.append(_check_text(_other_san(name), "SAN"))
    for kind, values in (("DNS", dns), ("IP", ips), ("URI", uris), ("other", other)):
        _check_count(kind, values)
    return tuple(dns), tuple(ips), tuple(uris), tuple(other)


def _other_san(name: x509.GeneralName) -> str:
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    if isinstance(name, x509.DirectoryName):
        _check_name(name.value, "SAN dirName")
        return f"dirName:{name.value.rfc4514_string()}"
    if isinstance(name, x509.RegisteredID):
        return f"registeredID:{name.value.dotted_string}"
    if isinstance(name, x509.OtherName):
        return f"otherName:{name.type_id.dotted_string}:{name.value.hex()}"
    return f"{type(name).__name__}:?"


def _check_name(name: x509.Name, where: str) -> None:
    for attribute in name:
        value = attribute.value
        if not isinstance(value, str):
            continue
        _check_text(value, where)
        # RFC 5280 bounds; cryptography only warns on them when loading, and a warning
        # is not a decision.
        low, high = _NAME_LENGTHS.get(attribute.oid, (0, len(value)))
        if not low <= len(value.encode()) <= high:
            raise _bad(f"{where}: {attribute.rfc4514_attribute_name} must be {low}..{high} bytes")


def _check_count(kind: str, values: Sequence[str]) -> None:
    if len(values) > MAX_SAN_ENTRIES:
        raise _bad(f"{len(values)} SAN {kind} entries, at most {MAX_SAN_ENTRIES} allowed")


def _check_text(value: str, where: str) -> str:
    # NUL cuts strings short in the embedded Rego engine, and control or invisible
    # characters (Unicode categories C*, line/paragraph separators) only serve to
    # spoof names in logs and comparisons.
    for char in value:
        if unicodedata.category(char)[0] == "C" or char in "\u2028\u2029":
            raise _bad(f"control character U+{ord(char):04X} in {where}")
    return value


def _key_facts(key: PublicKeyTypes) -> tuple[str, int, str | None] | None:
    """(type, bits, curve) of a signature key, weak ones too (policy judges them); else None."""
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA", key.key_size, None
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC", key.key_size, key.curve.name
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519", 256, None
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448", 456, None  # 57-byte public key
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA", key.key_size, None
    return None


def _any_key_facts(key: PublicKeyTypes) -> tuple[str, int, str | None] | None:
    """As _key_facts, and key-agreement keys: no CSR is signed with one (BAD_CSR stays
    as it was), but csrPublicKey may name one, and policy refuses its type."""
    facts = _key_facts(key)
    if facts is not None:
        return facts
    if isinstance(key, x25519.X25519PublicKey):
        return "X25519", 256, None
    if isinstance(key, x448.X448PublicKey):
        return "X448", 448, None
    if isinstance(key, dh.DHPublicKey):
        return "DH", key.key_size, None
    return None


# --- recipes for the agent and the dev CA ------------------------------------------------------


def generate_key(kind: str = "EC", bits: int | None = None) -> PrivateKey:
    """A fresh private key: "EC" (P-256), "EC384" (P-384), "RSA" (2048 default, 3072, 4096),
    or "Ed25519"."""
    if kind == "RSA":
        size = 2048 if bits is None else bits
        if size not in _RSA_BITS:
            raise ValueError(f"bits: RSA keys are {_RSA_BITS} bits, got {bits!r}")
        return rsa.generate_private_key(public_exponent=65537, key_size=size)
    curves: dict[str, tuple[ec.EllipticCurve, int]] = {
        "EC": (ec.SECP256R1(), 256),
        "EC384": (ec.SECP384R1(), 384),
    }
    if kind in curves:
        curve, size = curves[kind]
        if bits not in (None, size):
            raise ValueError(f"bits: {kind} keys are {size} bits, got {bits!r}")
        return ec.generate_private_key(curve)
    if kind == "Ed25519":
        if bits not in (None, 256):
            raise ValueError(f"bits: Ed25519 keys are 256 bits, got {bits!r}")
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"kind: expected EC, EC384, RSA or Ed25519, got {kind!r}")


def build_csr(
    key: PrivateKey,
    *,
    cn: str,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    uris: Sequence[str] = (),
    ou: str | None = None,
) -> str:
    """A PEM CSR with subject ``[OU=ou,]CN=cn`` and the given SANs, signed by ``key``."""
    if not isinstance(key, PrivateKey):
        raise TypeError(f"key: expected an RSA, EC or Ed25519 key, got {type(key).__name__}")
    attributes = []
    if ou is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in _strings("dns", dns)]
    names += [x509.IPAddress(_ip(i)) for i in _strings("ips", ips)]
    names += [x509.UniformResourceIdentifier(u) for u in _strings("uris", uris)]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    # Ed25519 signs the message itself: no separate digest.
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, digest)
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _strings(argument: str, values: Sequence[str]) -> Iterable[str]:
    # A bare string is a Sequence[str] too; iterating it would give one SAN per character.
    if isinstance(values, str | bytes):
        raise TypeError(f"{argument}: expected a sequence of strings, got a single string")
    for value in values:
        if not isinstance(value, str):
            raise TypeError(f"{argument}: expected strings, got {type(value).__name__}")
        yield value


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"ips: not an IP address: {value!r}") from None


def key_to_pem(key: PrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM (the agent writes it with mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_sha256(public_key: PublicKeyTypes) -> str:
    """Hex SHA-256 of the SubjectPublicKeyInfo DER: the key's fingerprint across CSR and cert."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def parse_public_key(pem: str) -> KeyInfo:
    """Read ZTS's ``csrPublicKey`` (the PEM public key it will certify) into a KeyInfo.

    Raises ``BadRequest("BAD_CSR_PUBLIC_KEY")`` when it is not one PEM public key
    (``PUBLIC KEY``, or PKCS#1 ``RSA PUBLIC KEY``), or the key is broken or not
    canonically encoded (see key_checks). Weak keys and other key types parse
    fine: policy judges them.
    """
    if not isinstance(pem, str):
        raise TypeError(f"pem: expected str, got {type(pem).__name__}")
    der = _pem_to_der(pem, _PUBLIC_KEY_LABELS, "BAD_CSR_PUBLIC_KEY")
    try:
        key = serialization.load_der_public_key(der)
    except Exception:  # noqa: BLE001 - cryptography raises several types; all mean "not a key"
        raise BadRequest("BAD_CSR_PUBLIC_KEY", "csrPublicKey is not a public key") from None
    facts = _any_key_facts(key)
    if facts is None:
        raise BadRequest("BAD_CSR_PUBLIC_KEY", f"unsupported key type {type(key).__name__}")
    spki = check_public_key(key, der, code="BAD_CSR_PUBLIC_KEY")
    key_type, key_bits, curve = facts
    return KeyInfo(
        source=SOURCE_CSR_PUBLIC_KEY,
        key_type=key_type,
        key_bits=key_bits,
        curve=curve,
        public_key_sha256=hashlib.sha256(spki).hexdigest(),
    )
