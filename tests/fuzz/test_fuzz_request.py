"""Properties of request parsing, attribute splitting, IP normalisation and the policy
input built from whatever parses: only BadRequest escapes, what parses is clean, and
the input document always encodes to UTF-8 JSON (what every engine is handed)."""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from identityd.callback.policy_input import build_input, normalise_ip
from identityd.callback.request import (
    LIST_ATTRIBUTES,
    PEM_ATTRIBUTES,
    CallbackRequest,
    parse_request,
    split_list,
)
from identityd.errors import BadRequest
from identityd.inventory.base import PodRecord
from identityd.settings import MAX_SAN_ENTRIES, IdentitySettings
from identityd.tokens.base import TokenClaims
from tests.fuzz.fuzz_mutations import characters, mutate_bytes, mutate_doc

PROFILE = settings(max_examples=300, deadline=None)
PARSE_CODES = {"BAD_JSON", "BAD_REQUEST", "BAD_ATTESTATION_DATA", "BAD_CSR"}
# What parse_request must never let through in a single-line string.
UNCLEAN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

CLAIMS = TokenClaims(
    issuer="https://kubernetes.default.svc.cluster.local",
    audience=("identityd",),
    subject="system:serviceaccount:sports-web:api",
    namespace="sports-web",
    service_account="api",
    service_account_uid="sa-uid",
    pod_name="api-1",
    pod_uid="3f1c9a52-7d1e-4c1b-9d9e-2f5a3b7c8d10",
    node_name="node-1",
    node_uid="node-uid",
    issued_at=1_800_000_000,
    expires_at=1_800_003_600,
    not_before=1_800_000_000,
)
POD = PodRecord(
    uid=CLAIMS.pod_uid,
    namespace="sports-web",
    name="api-1",
    service_account="api",
    phase="Running",
    ips=("10.1.2.3",),
    node_name="node-1",
)
LEGIT: dict[str, Any] = {
    "provider": "sys.auth.k8s",
    "domain": "sports.web",
    "service": "api",
    "attestationData": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
    "attributes": {
        "instanceId": CLAIMS.pod_uid,
        "clientIP": "10.1.2.3",
        "sanDNS": ",".join(
            [
                "api.sports-web.k8s.example.com",
                f"{CLAIMS.pod_uid}.instanceid.athenz.k8s.example.com",
            ]
        ),
        "sanIP": "10.1.2.3",
        "sanURI": f"spiffe://sports.web/sa/api,athenz://instanceid/sys.auth.k8s/{CLAIMS.pod_uid}",
        "hostname": "api-1",
    },
}


def parse_or_refuse(body: bytes) -> CallbackRequest | None:
    try:
        return parse_request("instance", body)
    except BadRequest as exc:
        assert exc.status in (400, 413)
        assert exc.code in PARSE_CODES, exc.code
        return None


def assert_clean(req: CallbackRequest) -> None:
    for name in ("provider", "domain", "service"):
        value = getattr(req, name)
        assert value and not UNCLEAN.search(value), name
    for key, value in req.attributes.items():
        assert not UNCLEAN.search(key)
        text = value.replace("\n", "").replace("\r", "") if key in PEM_ATTRIBUTES else value
        assert not UNCLEAN.search(text), key
    for name in LIST_ATTRIBUTES:
        assert len(req.list_attribute(name)) <= MAX_SAN_ENTRIES


def assert_input_encodes(req: CallbackRequest) -> None:
    doc = build_input(req, CLAIMS, POD, None, IdentitySettings(), now=1_800_000_100)
    # ensure_ascii=False: an engine gets UTF-8; a lone surrogate would fail here.
    encoded = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    assert json.loads(encoded) == doc
    for name in LIST_ATTRIBUTES:
        items = doc["request"]["attributes"][name]
        assert all(isinstance(i, str) and i and i == i.strip() for i in items)
    facts = doc["facts"]
    assert all(ipaddress.ip_address(ip).compressed == ip for ip in facts["san_ips"])


@PROFILE
@given(st.data())
def test_damaged_legitimate_documents_parse_clean_or_are_refused(data: st.DataObject) -> None:
    body = json.dumps(mutate_doc(data, LEGIT)).encode()
    req = parse_or_refuse(body)
    if req is not None:
        assert_clean(req)
        assert_input_encodes(req)


@PROFILE
@given(st.data())
def test_damaged_legitimate_bytes_parse_clean_or_are_refused(data: st.DataObject) -> None:
    req = parse_or_refuse(mutate_bytes(data, json.dumps(LEGIT).encode()))
    if req is not None:
        assert_clean(req)
        assert_input_encodes(req)


@PROFILE
@given(
    st.dictionaries(st.sampled_from(list(LEGIT["attributes"])), st.text(characters, max_size=40))
)
def test_any_attribute_text_parses_clean_or_is_refused(changes: dict[str, str]) -> None:
    doc = {**LEGIT, "attributes": {**LEGIT["attributes"], **changes}}
    req = parse_or_refuse(json.dumps(doc).encode())
    if req is not None:
        assert_clean(req)
        assert_input_encodes(req)


@PROFILE
@given(st.text(characters, max_size=80))
def test_split_list_items_are_trimmed_nonempty_and_comma_free(value: str) -> None:
    items = split_list(value)
    assert all(item and item == item.strip() and "," not in item for item in items)
    assert split_list(",".join(items)) == items  # splitting is idempotent
    assert split_list(" , ".join(items) + ",") == items


@PROFILE
@given(st.lists(st.text(characters, max_size=12).filter(lambda s: "," not in s), max_size=8))
def test_split_list_inverts_join_up_to_trimming(items: list[str]) -> None:
    assert split_list(",".join(items)) == [i.strip() for i in items if i.strip()]


ip_texts = (
    st.ip_addresses().map(str)
    | st.ip_addresses(v=6).map(lambda ip: ip.exploded.upper())
    | st.ip_addresses(v=4).map(lambda ip: f"::ffff:{ip}")
    | st.text(st.sampled_from("0123456789abcdefABCDEF:.%/x -\u0660"), max_size=24)
)


@PROFILE
@given(ip_texts)
def test_normalise_ip_is_canonical_idempotent_and_keeps_families_apart(text: str) -> None:
    ip = normalise_ip(text)
    if ip is None:
        return
    assert normalise_ip(ip) == ip
    parsed = ipaddress.ip_address(ip)
    assert parsed.compressed == ip and "%" not in ip
    if ":" in text:  # IPv6 text never becomes an IPv4 address (::ffff:a.b.c.d included)
        assert parsed.version == 6
