"""Hypothesis strategies that damage legitimate inputs a little (the inputs a fuzzer
finds bugs with), and the views used to judge what an allow may grant."""

from __future__ import annotations

import copy
import json
import string
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from identityd.callback.policy_input import normalise_ip
from identityd.callback.request import parse_request
from identityd.errors import BadRequest, InvalidCSR
from identityd.keys.csr import parse_csr

# Characters a mutation inserts: the printable set, separators, and the troublemakers
# (controls, C1, lone surrogates, zero-width and look-alike characters).
TRICKY = "\x00\x01\x1f\x7f\x85\x9b\u200b\u200d\u2028\ufeff\u0430\u0435\uff0e\ud800\udfff"
characters = st.sampled_from(string.printable + TRICKY) | st.characters()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(characters, max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _string_edit(data: st.DataObject, text: str) -> str:
    op = data.draw(st.sampled_from(["insert", "delete", "replace", "case", "pad", "double"]))
    at = data.draw(st.integers(0, len(text)))
    if op == "insert":
        return text[:at] + data.draw(st.text(characters, min_size=1, max_size=3)) + text[at:]
    if op == "delete" and text:
        end = data.draw(st.integers(at, min(len(text), at + 8)))
        return text[:at] + text[end:]
    if op == "replace" and text:
        at = min(at, len(text) - 1)
        return text[:at] + data.draw(characters) + text[at + 1 :]
    if op == "case":
        return text.swapcase()
    if op == "pad":
        return data.draw(st.sampled_from([" ", "\t", ",", "."])) + text
    return text + text


def _paths(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = [(key,) for key in doc]
    attrs = doc.get("attributes")
    if isinstance(attrs, dict):
        paths += [("attributes", key) for key in attrs]
    return paths


def mutate_doc(data: st.DataObject, doc: dict[str, Any]) -> dict[str, Any]:
    """One to three JSON-level edits: delete, retype, edit a string, add a key."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(doc)
        op = data.draw(st.sampled_from(["delete", "retype", "edit", "edit", "add"]))
        if op == "add" or not paths:
            target = doc
            if isinstance(doc.get("attributes"), dict) and data.draw(st.booleans()):
                target = doc["attributes"]
            target[data.draw(st.text(characters, max_size=10))] = data.draw(json_values)
            continue
        path = data.draw(st.sampled_from(paths))
        parent = doc if len(path) == 1 else doc["attributes"]
        if op == "delete":
            del parent[path[-1]]
        elif op == "retype":
            parent[path[-1]] = data.draw(json_values)
        elif isinstance(parent[path[-1]], str):
            parent[path[-1]] = _string_edit(data, parent[path[-1]])
    return doc


def mutate_bytes(data: st.DataObject, raw: bytes) -> bytes:
    """One to three byte-level edits: flip, insert, delete a run, truncate."""
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del buf[at : at + data.draw(st.integers(1, 16))]
        else:
            del buf[at:]
    return bytes(buf)


def mutated_body(data: st.DataObject, doc: dict[str, Any]) -> bytes:
    if data.draw(st.booleans()):
        return json.dumps(mutate_doc(data, doc)).encode()
    return mutate_bytes(data, json.dumps(doc).encode())


@dataclass(frozen=True)
class Claimed:
    """What a callback body asks for, as far as identity goes."""

    names: tuple[str, str, str, str, str]  # provider, domain, service, token, instanceId
    client_ip: str | None
    dns: frozenset[str]
    ips: frozenset[str]
    uris: frozenset[str]
    csr: tuple[str, frozenset[str], frozenset[str], frozenset[str], tuple[str, ...], str] | None


def claimed(kind: str, body: bytes) -> Claimed | None:
    """The identity a body asks for; None when it does not parse."""
    try:
        req = parse_request(kind, body)
        info = parse_csr(req.csr_pem) if req.csr_pem else None
    except (BadRequest, InvalidCSR):
        return None
    ips = {normalise_ip(i) or f"invalid:{i}" for i in req.list_attribute("sanIP")}
    client = req.attributes.get("clientIP", "")
    csr = None
    if info is not None:
        csr = (
            info.cn or "",
            frozenset(info.dns),
            frozenset(info.ips),
            frozenset(info.uris),
            info.other_sans,
            info.public_key_sha256,
        )
    return Claimed(
        names=(req.provider, req.domain, req.service, req.token, req.instance_id),
        client_ip=normalise_ip(client) if client else None,
        dns=frozenset(req.list_attribute("sanDNS")),
        ips=frozenset(ips),
        uris=frozenset(req.list_attribute("sanURI")),
        csr=csr,
    )


def within(asked: Claimed, legit: Claimed) -> bool:
    """Whether ``asked`` claims nothing beyond the legitimate request ``legit``: the
    same names, token, instance and client IP; SANs a subset; no CSR, or one for
    the same key with the same CN and SANs a subset."""
    if (asked.names, asked.client_ip) != (legit.names, legit.client_ip):
        return False
    if not (asked.dns <= legit.dns and asked.ips <= legit.ips and asked.uris <= legit.uris):
        return False
    if asked.csr is None:
        return True
    if legit.csr is None:
        return False
    cn, dns, ips, uris, other, key = asked.csr
    legit_cn, legit_dns, legit_ips, legit_uris, _, legit_key = legit.csr
    return (
        (cn, key) == (legit_cn, legit_key)
        and not other
        and dns <= legit_dns
        and ips <= legit_ips
        and uris <= legit_uris
    )
