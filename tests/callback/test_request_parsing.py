"""Parsing the InstanceConfirmation: every malformed shape is a 400 with its code."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from identityd.callback.request import extract_token, parse_json, parse_request, split_list
from identityd.errors import BadRequest

GOOD = {
    "provider": "sys.auth.k8s",
    "domain": "sports.web",
    "service": "api",
    "attestationData": "aaa.bbb.ccc",
    "attributes": {
        "instanceId": "u1",
        "sanDNS": "a.example.com, b.example.com,,",
        "sanIP": "10.1.2.3",
        "extra": "kept",
    },
}


def body(**changes: object) -> bytes:
    doc = dict(GOOD)
    for key, value in changes.items():
        if value is ...:
            doc.pop(key, None)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


def test_good_request_is_parsed_and_lists_split() -> None:
    req = parse_request("instance", body())
    assert (req.provider, req.domain, req.service, req.instance_id) == (
        "sys.auth.k8s",
        "sports.web",
        "api",
        "u1",
    )
    assert req.list_attribute("sanDNS") == ["a.example.com", "b.example.com"]
    assert req.list_attribute("sanURI") == []
    assert req.attributes["extra"] == "kept"
    assert req.token == "aaa.bbb.ccc" and not req.token_wrapped
    assert "aaa.bbb.ccc" not in repr(req)


def test_wrapped_identity_token_is_unwrapped() -> None:
    req = parse_request("refresh", body(attestationData=json.dumps({"identityToken": "x.y.z"})))
    assert req.token == "x.y.z" and req.token_wrapped and req.kind == "refresh"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"not json", "BAD_JSON"),
        (b"\xff\xfe", "BAD_JSON"),
        (b"[1, 2]", "BAD_REQUEST"),
        (b'{"provider": "a", "provider": "b"}', "BAD_JSON"),
        (b'{"x": NaN}', "BAD_JSON"),
        (b"[" * 50 + b"]" * 50, "BAD_JSON"),
        (b"[" * 100000, "BAD_JSON"),
        (body(provider=...), "BAD_REQUEST"),
        (body(provider=7), "BAD_REQUEST"),
        (body(domain=""), "BAD_REQUEST"),
        (body(service=None), "BAD_REQUEST"),
        (body(attestationData=...), "BAD_REQUEST"),
        (body(attestationData=["a"]), "BAD_REQUEST"),
        (body(attestationData='{"identityToken": 5}'), "BAD_ATTESTATION_DATA"),
        (body(attestationData='{"other": "x"}'), "BAD_ATTESTATION_DATA"),
        (
            body(attestationData='{"identityToken": "a", "identityToken": "b"}'),
            "BAD_ATTESTATION_DATA",
        ),
        (body(attestationData="{broken"), "BAD_ATTESTATION_DATA"),
        (body(attributes=[]), "BAD_REQUEST"),
        (body(attributes={"instanceId": 5}), "BAD_REQUEST"),
        (body(attributes={"sanDNS": {"nested": "x"}}), "BAD_REQUEST"),
        (body(attributes={"instanceId": "a\x00b"}), "BAD_REQUEST"),
        (body(domain="sports.web\nX-Injected: 1"), "BAD_REQUEST"),
        (body(service="a" * 300), "BAD_REQUEST"),
        (
            body(attributes={"sanDNS": ",".join(f"h{i}.example.com" for i in range(40))}),
            "BAD_REQUEST",
        ),
        (body(attributes={f"k{i}": "v" for i in range(100)}), "BAD_REQUEST"),
        (body(attributes={"csr": "A" * 20000}), "BAD_CSR"),
    ],
)
def test_malformed_requests_are_refused_with_a_code(raw: bytes, code: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request("instance", raw)
    assert info.value.code == code
    assert info.value.status == 400


def test_unknown_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="kind"):
        parse_request("delete", body())


@pytest.mark.parametrize(
    ("value", "items"),
    [("", []), ("a", ["a"]), ("a,b", ["a", "b"]), (" a , ,b ,", ["a", "b"]), (",,,", [])],
)
def test_split_list(value: str, items: list[str]) -> None:
    assert split_list(value) == items


def test_raw_token_is_stripped() -> None:
    assert extract_token("  a.b.c\n") == ("a.b.c", False)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_anything_but_bad_request(raw: bytes) -> None:
    try:
        parse_request("instance", raw)
    except BadRequest as exc:
        assert exc.status == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*GOOD, "x"]), json_values, max_size=6))
def test_arbitrary_json_objects_parse_or_are_refused(doc: dict[str, object]) -> None:
    try:
        req = parse_request("instance", json.dumps(doc).encode())
    except BadRequest:
        return
    assert isinstance(req.provider, str) and req.provider
    assert all(isinstance(v, str) for v in req.attributes.values())


def test_parse_json_depth_limit_counts_nesting() -> None:
    assert parse_json(b'{"a": {"b": [1]}}') == {"a": {"b": [1]}}
