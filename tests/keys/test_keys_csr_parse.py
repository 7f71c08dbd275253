"""parse_csr against real CSRs (cryptography-built or hand-edited DER), broken input and fuzz."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import textwrap
import warnings
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from identityd.errors import BadRequest, InvalidCSR
from identityd.keys import CSRInfo, build_csr, generate_key, parse_csr
from identityd.settings import MAX_CSR_BYTES, MAX_SAN_ENTRIES

# --- a minimal DER walker, to edit signed CSRs where the builder refuses to -------------------

Node = tuple[int, "bytes | list[Node]"]


def der_decode(data: bytes) -> Node:
    node, end = _decode_at(data, 0)
    assert end == len(data)
    return node


def _decode_at(data: bytes, pos: int) -> tuple[Node, int]:
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    content = data[pos : pos + length]
    if tag & 0x20:  # constructed
        children: list[Node] = []
        at = 0
        while at < len(content):
            child, at = _decode_at(content, at)
            children.append(child)
        return (tag, children), pos + length
    return (tag, content), pos + length


def der_encode(node: Node) -> bytes:
    tag, value = node
    content = value if isinstance(value, bytes) else b"".join(der_encode(c) for c in value)
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def to_pem(der: bytes, label: str = "CERTIFICATE REQUEST") -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def pem_der(pem: str) -> bytes:
    return x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)


def resign(root: Node, key: ec.EllipticCurvePrivateKey) -> str:
    """Re-sign an edited CertificationRequestInfo so only the edit can be wrong."""
    children = root[1]
    assert isinstance(children, list)
    info, algorithm, _ = children
    signature = key.sign(der_encode(info), ec.ECDSA(hashes.SHA256()))
    return to_pem(der_encode((0x30, [info, algorithm, (0x03, b"\x00" + signature)])))


def children(node: Node) -> list[Node]:
    assert isinstance(node[1], list)
    return node[1]


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    key = generate_key("EC")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


@pytest.fixture(scope="module")
def good_pem(ec_key: ec.EllipticCurvePrivateKey) -> str:
    return build_csr(
        ec_key,
        cn="sports.web.api",
        dns=["api.sports-web.k8s.example.com"],
        ips=["10.1.2.3"],
        uris=["spiffe://sports.web/sa/api"],
    )


def spki_sha256(key: object) -> str:
    public = key.public_key()  # type: ignore[attr-defined]
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def raw_csr(
    key: object,
    names: list[x509.NameAttribute[str]],
    sans: list[x509.GeneralName] | None = None,
    digest: hashes.HashAlgorithm | None = None,
) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, digest)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def cn(value: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def bad_csr(pem: str) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_csr(pem)
    assert info.value.code == "BAD_CSR"
    assert info.value.status == 400
    return info.value


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "bits", "key_type", "key_bits", "curve"),
    [
        ("RSA", 2048, "RSA", 2048, None),
        ("RSA", 4096, "RSA", 4096, None),
        ("EC", None, "EC", 256, "secp256r1"),
        ("EC384", None, "EC", 384, "secp384r1"),
        ("Ed25519", None, "Ed25519", 256, None),
    ],
)
def test_round_trip(
    kind: str, bits: int | None, key_type: str, key_bits: int, curve: str | None
) -> None:
    key = generate_key(kind, bits)
    pem = build_csr(
        key,
        cn="sports.web.api",
        dns=["api.sports-web.k8s.example.com", "uid-1.instanceid.athenz.k8s.example.com"],
        ips=["10.1.2.3", "2001:db8::7"],
        uris=["spiffe://sports.web/sa/api", "athenz://instanceid/sys.auth.k8s/uid-1"],
        ou="sys.auth.k8s",
    )
    info = parse_csr(pem)
    assert info == CSRInfo(
        cn="sports.web.api",
        dns=("api.sports-web.k8s.example.com", "uid-1.instanceid.athenz.k8s.example.com"),
        ips=("10.1.2.3", "2001:db8::7"),
        uris=("spiffe://sports.web/sa/api", "athenz://instanceid/sys.auth.k8s/uid-1"),
        other_sans=(),
        key_type=key_type,
        key_bits=key_bits,
        curve=curve,
        public_key_sha256=spki_sha256(key),
        subject="CN=sports.web.api,OU=sys.auth.k8s",
    )


def test_weak_rsa_still_parses_policy_decides() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    info = parse_csr(raw_csr(key, [cn("a.b")], digest=hashes.SHA256()))
    assert (info.key_type, info.key_bits, info.cn) == ("RSA", 1024, "a.b")


def test_dsa_and_ed448_keys_are_described() -> None:
    dsa_key = dsa.generate_private_key(key_size=2048)
    assert parse_csr(raw_csr(dsa_key, [cn("a.b")], digest=hashes.SHA256())).key_type == "DSA"
    info = parse_csr(raw_csr(ed448.Ed448PrivateKey.generate(), [cn("a.b")]))
    assert (info.key_type, info.key_bits, info.curve) == ("Ed448", 456, None)


def test_no_cn_and_no_sans(ec_key: ec.EllipticCurvePrivateKey) -> None:
    info = parse_csr(raw_csr(ec_key, [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme")],
                             digest=hashes.SHA256()))
    assert (info.cn, info.dns, info.ips, info.uris, info.subject) == (None, (), (), (), "O=Acme")


def test_ipv6_san_is_normalised(ec_key: ec.EllipticCurvePrivateKey) -> None:
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("2001:0db8:0000:0000:0000:0000:0000:0001")),
        x509.IPAddress(ipaddress.ip_address("fd00:0:0:0:0:0:a:1")),
    ]
    info = parse_csr(raw_csr(ec_key, [cn("a.b")], sans, hashes.SHA256()))
    assert info.ips == ("2001:db8::1", "fd00::a:1")


def test_other_san_kinds_are_kept_apart(ec_key: ec.EllipticCurvePrivateKey) -> None:
    sans: list[x509.GeneralName] = [
        x509.DNSName("ok.example.com"),
        x509.RFC822Name("admin@example.com"),
        x509.DirectoryName(x509.Name([cn("evil")])),
        x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4")),
        x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x03a@b"),
    ]
    info = parse_csr(raw_csr(ec_key, [cn("a.b")], sans, hashes.SHA256()))
    assert info.dns == ("ok.example.com",)
    assert info.other_sans == (
        "email:admin@example.com",
        "dirName:CN=evil",
        "registeredID:1.2.3.4",
        "otherName:1.3.6.1.4.1.311.20.2.3:0c03614062",
    )


def test_old_new_certificate_request_label_and_crlf(good_pem: str) -> None:
    relabelled = good_pem.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
    assert parse_csr(relabelled) == parse_csr(good_pem)
    assert parse_csr("\r\n" + good_pem.replace("\n", "\r\n") + "\n\n").cn == "sports.web.api"


# --- signatures --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["EC", "RSA", "Ed25519"])
def test_corrupted_signature_is_denied(kind: str) -> None:
    pem = build_csr(generate_key(kind), cn="a.b", dns=["a.example.com"])
    root = der_decode(pem_der(pem))
    info, algorithm, (tag, signature) = children(root)
    assert isinstance(signature, bytes)
    flipped = bytearray(signature)
    flipped[-2] ^= 0xFF  # inside the signature value, clear of any DER framing
    edited = to_pem(der_encode((0x30, [info, algorithm, (tag, bytes(flipped))])))
    with pytest.raises(InvalidCSR) as exc:
        parse_csr(edited)
    assert exc.value.code == "CSR_SIGNATURE_INVALID"
    assert exc.value.status == 403


def test_signature_by_another_key_is_denied(ec_key: ec.EllipticCurvePrivateKey) -> None:
    mine = children(der_decode(pem_der(build_csr(ec_key, cn="a.b"))))
    theirs = children(der_decode(pem_der(build_csr(generate_key("EC"), cn="a.b"))))
    swapped = to_pem(der_encode((0x30, [mine[0], mine[1], theirs[2]])))
    with pytest.raises(InvalidCSR):
        parse_csr(swapped)


# --- refused shapes ----------------------------------------------------------------------------


def test_two_cns_are_ambiguous(ec_key: ec.EllipticCurvePrivateKey) -> None:
    error = bad_csr(raw_csr(ec_key, [cn("a.b"), cn("c.d")], digest=hashes.SHA256()))
    assert "2 CNs" in error.detail


def test_duplicate_san_extension(ec_key: ec.EllipticCurvePrivateKey) -> None:
    pem = build_csr(ec_key, cn="a.b", dns=["a.example.com"])
    root = der_decode(pem_der(pem))
    info = children(root)[0]
    extension_request = children(children(info)[3])[0]  # SEQUENCE {OID, SET {Extensions}}
    extensions = children(children(children(extension_request)[1])[0])
    assert len(extensions) == 1
    extensions.append(extensions[0])
    assert "DuplicateExtension" in bad_csr(resign(root, ec_key)).detail


def test_resigned_edit_without_change_still_parses(ec_key: ec.EllipticCurvePrivateKey) -> None:
    # Guards the DER helper: the duplicate test fails for the duplicate, not the re-signing.
    root = der_decode(pem_der(build_csr(ec_key, cn="a.b", dns=["a.example.com"])))
    assert parse_csr(resign(root, ec_key)).dns == ("a.example.com",)


@pytest.mark.parametrize(
    "make_sans",
    [
        lambda n: [x509.DNSName(f"h{i}.example.com") for i in range(n)],
        lambda n: [x509.IPAddress(ipaddress.ip_address(f"10.0.0.{i}")) for i in range(n)],
        lambda n: [x509.UniformResourceIdentifier(f"spiffe://d/{i}") for i in range(n)],
        lambda n: [x509.RFC822Name(f"u{i}@example.com") for i in range(n)],
    ],
)
def test_too_many_sans_of_one_kind(
    ec_key: ec.EllipticCurvePrivateKey, make_sans: Callable[[int], list[x509.GeneralName]]
) -> None:
    at_limit = raw_csr(ec_key, [cn("a.b")], make_sans(MAX_SAN_ENTRIES), hashes.SHA256())
    parse_csr(at_limit)
    over = raw_csr(ec_key, [cn("a.b")], make_sans(MAX_SAN_ENTRIES + 1), hashes.SHA256())
    assert "SAN" in bad_csr(over).detail


@pytest.mark.parametrize(
    ("names", "sans"),
    [
        ([cn("a\x00b")], None),
        ([cn("a.b"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x\ny")], None),
        ([cn("a\u202eb")], None),
        ([cn("a.b")], [x509.UniformResourceIdentifier("spiffe://d/\x07")]),
        ([cn("a.b")], [x509.RFC822Name("a\x00@b")]),
    ],
)
def test_control_characters_are_refused(
    ec_key: ec.EllipticCurvePrivateKey,
    names: list[x509.NameAttribute[str]],
    sans: list[x509.GeneralName] | None,
) -> None:
    assert "control character" in bad_csr(raw_csr(ec_key, names, sans, hashes.SHA256())).detail


@pytest.mark.parametrize(
    ("oid", "value"),
    [
        (NameOID.COMMON_NAME, "a" * 65),
        (NameOID.COMMON_NAME, ""),
        (NameOID.COUNTRY_NAME, "USA"),
    ],
)
def test_rfc5280_name_bounds_are_enforced(
    ec_key: ec.EllipticCurvePrivateKey, oid: x509.ObjectIdentifier, value: str
) -> None:
    with warnings.catch_warnings():  # the builder refuses these; the wire does not
        warnings.simplefilter("ignore")
        attribute = x509.NameAttribute(oid, value, _validate=False)
        pem = raw_csr(ec_key, [attribute], digest=hashes.SHA256())
    # cryptography only warns when loading; outside pytest's warnings-as-errors the
    # parser must still refuse, not pass the name on.
    with pytest.warns(UserWarning, match="length"):
        assert "must be" in bad_csr(pem).detail


def test_cn_of_64_bytes_is_fine(ec_key: ec.EllipticCurvePrivateKey) -> None:
    assert parse_csr(raw_csr(ec_key, [cn("a" * 64)], digest=hashes.SHA256())).cn == "a" * 64


def _garbage_cases(pem: str) -> list[str]:
    body = pem.splitlines()[1:-1]
    return [
        "",
        "not a csr",
        "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n",
        pem[: len(pem) // 2],  # truncated: no END line
        "\n".join([pem.splitlines()[0], *body[:-2], pem.splitlines()[-1]]),  # truncated DER
        pem + pem,  # two blocks
        pem.replace("CERTIFICATE REQUEST", "CERTIFICATE"),  # wrong kind of block
        pem.replace("END CERTIFICATE REQUEST", "END NEW CERTIFICATE REQUEST"),  # mismatched
        "Certificate Request:\n    Data: ...\n" + pem,  # prose around the block
        to_pem(b"\x30\x03\x02\x01\x00"),  # valid DER, not a CSR
        to_pem(pem_der(pem) + b"\x00"),  # trailing bytes after the DER
        to_pem(_with_version(pem_der(pem), 52)),  # InvalidVersion, not a ValueError
        base64.b64encode(pem_der(pem)).decode(),  # bare base64, no PEM framing
        pem.replace("A", "é", 1),  # non-ASCII
        pem + " " * MAX_CSR_BYTES,  # huge
    ]


def _with_version(der: bytes, version: int) -> bytes:
    root = der_decode(der)
    info = children(root)[0]
    children(info)[0] = (0x02, bytes([version]))
    return der_encode(root)


def test_garbage_is_a_bad_request(good_pem: str) -> None:
    for case in _garbage_cases(good_pem):
        with pytest.raises(BadRequest) as info:
            parse_csr(case)
        assert info.value.code == "BAD_CSR", repr(case[:40])


def test_details_never_carry_the_csr(good_pem: str) -> None:
    body_line = good_pem.splitlines()[1]
    for case in _garbage_cases(good_pem):
        with pytest.raises(BadRequest) as info:
            parse_csr(case)
        assert body_line[:16] not in str(info.value)


def test_wrong_type_is_a_type_error(good_pem: str) -> None:
    with pytest.raises(TypeError, match="pem"):
        parse_csr(good_pem.encode())  # type: ignore[arg-type]


# --- fuzz --------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_fuzz_text_only_raises_our_errors(text: str) -> None:
    with pytest.raises((BadRequest, InvalidCSR)):
        parse_csr(text)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_framed_bytes_only_raise_our_errors(data: bytes) -> None:
    with pytest.raises((BadRequest, InvalidCSR)):
        parse_csr(to_pem(data))


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_fuzz_mutated_der_parses_or_raises_our_errors(
    good_pem: str, data: st.DataObject
) -> None:
    der = bytearray(pem_der(good_pem))
    for _ in range(data.draw(st.integers(1, 4))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    try:
        info = parse_csr(to_pem(bytes(der)))
    except (BadRequest, InvalidCSR):
        return
    assert isinstance(info, CSRInfo)  # a mutation that left a valid, verified CSR
