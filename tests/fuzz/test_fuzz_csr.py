"""CSR parsing over damaged DER and PEM: a damaged CSR is refused (BAD_CSR or
CSR_SIGNATURE_INVALID) or, when it still parses and verifies, says exactly what the
original said; and CSRs built from arbitrary SAN values parse back to those values
or are refused as BAD_CSR (never another exception)."""

from __future__ import annotations

import base64
import textwrap

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from identityd.errors import BadRequest, InvalidCSR
from identityd.keys.csr import PrivateKey, build_csr, generate_key, parse_csr
from identityd.keys.csr_info import CSRInfo
from tests.fuzz.fuzz_mutations import characters

PROFILE = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
UID = "3f1c9a52-7d1e-4c1b-9d9e-2f5a3b7c8d10"


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return generate_key("EC")


@pytest.fixture(scope="module")
def good_pem(key: PrivateKey) -> str:
    return build_csr(
        key,
        cn="sports.web.api",
        dns=["api.sports-web.k8s.example.com", f"{UID}.instanceid.athenz.k8s.example.com"],
        ips=["10.1.2.3", "fd00::1"],
        uris=["spiffe://sports.web/sa/api", f"athenz://instanceid/sys.auth.k8s/{UID}"],
    )


def der_of(pem: str) -> bytes:
    return base64.b64decode("".join(pem.strip().splitlines()[1:-1]))


def pem_of(der: bytes, label: str = "CERTIFICATE REQUEST") -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def outcome(pem: str) -> CSRInfo | str:
    try:
        return parse_csr(pem)
    except InvalidCSR as exc:
        assert exc.code == "CSR_SIGNATURE_INVALID"
        return exc.code
    except BadRequest as exc:
        assert exc.code == "BAD_CSR" and exc.status == 400
        assert "BEGIN" not in exc.detail
        return exc.code


def damage_der(data: st.DataObject, der: bytes) -> bytes:
    buf = bytearray(der)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["set", "flip", "insert", "delete", "truncate", "splice"]))
        at = data.draw(st.integers(0, len(buf) - 1)) if buf else 0
        if op == "set" and buf:
            buf[at] = data.draw(st.integers(0, 255))
        elif op == "flip" and buf:
            buf[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=3))
        elif op == "delete":
            del buf[at : at + data.draw(st.integers(1, 8))]
        elif op == "truncate":
            del buf[at:]
        else:  # copy a run of bytes elsewhere (a repeated TLV, a doubled length)
            end = data.draw(st.integers(at, min(len(buf), at + 24)))
            to = data.draw(st.integers(0, len(buf)))
            buf[to:to] = buf[at:end]
    return bytes(buf)


@PROFILE
@given(st.data())
def test_damaged_der_is_refused_or_means_the_same(good_pem: str, data: st.DataObject) -> None:
    original = parse_csr(good_pem)
    damaged = damage_der(data, der_of(good_pem))
    result = outcome(pem_of(damaged))
    event(result if isinstance(result, str) else "parsed")
    if isinstance(result, CSRInfo):
        # Any change under the signature breaks it: what verifies is the original.
        assert result == original


@PROFILE
@given(
    wrap=st.sampled_from([64, 76, 16, 10_000]),
    newline=st.sampled_from(["\n", "\r\n"]),
    label=st.sampled_from(["CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"]),
    around=st.sampled_from(["", "\n", "  \n\t"]),
)
def test_pem_layout_does_not_change_the_meaning(
    good_pem: str, wrap: int, newline: str, label: str, around: str
) -> None:
    body = newline.join(textwrap.wrap(base64.b64encode(der_of(good_pem)).decode(), wrap))
    pem = f"{around}-----BEGIN {label}-----{newline}{body}{newline}-----END {label}-----{around}"
    assert parse_csr(pem) == parse_csr(good_pem)


@PROFILE
@given(st.data())
def test_damaged_pem_text_is_refused_or_means_the_same(good_pem: str, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(good_pem)))
    edit = data.draw(st.text(characters, min_size=1, max_size=3))
    cut = data.draw(st.integers(0, 4))
    result = outcome(good_pem[:at] + edit + good_pem[at + cut :])
    if isinstance(result, CSRInfo):
        assert result == parse_csr(good_pem)


label_chars = st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-*.") | characters
san_text = st.text(label_chars, min_size=1, max_size=20)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    cn=st.text(characters, min_size=1, max_size=70),
    dns=st.lists(san_text, max_size=3),
    uris=st.lists(san_text.map(lambda s: f"spiffe://{s}"), max_size=3),
    ips=st.lists(st.ip_addresses().map(str), max_size=3),
)
def test_any_san_values_round_trip_or_are_bad_csr(
    key: PrivateKey, cn: str, dns: list[str], uris: list[str], ips: list[str]
) -> None:
    try:
        pem = build_csr(key, cn=cn, dns=dns, ips=ips, uris=uris)
    except (ValueError, UnicodeError):
        return  # cryptography refuses to build it (non-ASCII SAN, empty name, ...)
    result = outcome(pem)
    if isinstance(result, str):
        assert result == "BAD_CSR"
        return
    assert (result.cn, result.dns, result.uris) == (cn, tuple(dns), tuple(uris))
    assert len(result.ips) == len(ips) and result.other_sans == ()
