"""Property: changing any one field of the legitimate `allow` input denies, unless the
field is one the default policies do not decide on (then nothing changes) or the new
value is one of the few that are equally legitimate (listed below, with why)."""

from __future__ import annotations

import asyncio
import copy
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from identityd.policy.base import Decision
from identityd.policy.cases import load_bases
from identityd.policy.embedded import EmbeddedEngine
from identityd.policy.sources import load_policy_dir

POLICIES = Path(__file__).resolve().parents[2] / "policies"
BASE = load_bases(POLICIES / "tests" / "_bases.yaml")["allow"]

Path_ = tuple[str | int, ...]


def _always(_: object) -> bool:
    return True


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# Fields the policies read but where other values are legitimate too.
TOLERANT: dict[str, Callable[[object], bool]] = {
    "kind": lambda v: v == "refresh",  # refresh is allowed by the base config
    "key.curve": lambda v: v in ("secp256r1", "secp384r1"),
    "config.cert_expiry_minutes": lambda v: _is_number(v) and v > 0,  # type: ignore[operator]
    "config.cert_usage": lambda v: isinstance(v, str) and v != "",
    # Only in the Kubernetes SPIFFE URI, which the base does not ask for.
    "config.trust_domain": lambda v: isinstance(v, str) and v != "",
    "config.allow_refresh": lambda v: isinstance(v, bool),  # only matters for refresh
    "config.min_rsa_bits": _is_number,  # the base key is EC
    "config.allowed_ec_curves.1": lambda v: isinstance(v, str),  # the base uses [0]
    "pod.annotations": lambda v: isinstance(v, dict),
    # Decided on facts.san_ips (normalised); the raw list must still be a string list.
    "request.attributes.sanIP.0": lambda v: isinstance(v, str),
}
# Fields the policies do not decide on: any value, same decision.
IGNORED = {
    "request.attributes.clientIP",  # decided on facts.client_ip (normalised)
    "request.attributes.hostname",
    "token.issuer", "token.audience.0", "token.subject",  # verified in Python
    "token.service_account_uid", "token.node.uid",
    "token.iat", "token.exp", "token.nbf", "token.verified_by",
    "pod.labels.app", "pod.start_time", "pod.found_by",
    # The key checks judge input.key; the CSR's key fields are there for other policies.
    "csr.key_type", "csr.key_bits", "csr.curve", "csr.public_key_sha256", "csr.subject",
    "key.source", "key.public_key_sha256",  # for other policies and the decision log
    "key.key_bits",  # EC: the curve decides
    "facts.now", "facts.token_age_seconds",
}


def _leaves(doc: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    if isinstance(doc, dict) and doc:
        for key, value in doc.items():
            yield from _leaves(value, (*prefix, key))
    elif isinstance(doc, list) and doc:
        for index, value in enumerate(doc):
            yield from _leaves(value, (*prefix, index))
    else:
        yield prefix


LEAVES = sorted(_leaves(BASE), key=str)


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


def _get(doc: Any, path: Path_) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def _set(doc: Any, path: Path_, value: object) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    target = out
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return out  # type: ignore[no-any-return]


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


TEXT = st.text(alphabet=string.ascii_letters + string.digits + ".-_:/*@", max_size=16)


def _near_misses(original: object) -> list[object]:
    if isinstance(original, str):
        return [original + "x", original.upper(), original[:-1], original + ".", " " + original,
                "x" + original, ""]
    if isinstance(original, bool):
        return [not original, str(original).lower()]
    if _is_number(original):
        return [original + 1, -original, 0, str(original)]  # type: ignore[operator]
    return [None]


@st.composite
def mutations(draw: st.DrawFn) -> tuple[Path_, object]:
    path = draw(st.sampled_from(LEAVES))
    original = _get(BASE, path)
    value = draw(st.one_of(
        st.sampled_from(_near_misses(original)),
        st.none(), st.booleans(), st.integers(-10, 5000), TEXT,
        st.lists(TEXT, max_size=3),
        st.dictionaries(TEXT, TEXT, max_size=2),
    ))
    return path, value


def test_every_leaf_of_the_base_is_classified() -> None:
    # A field added to the base without a decision here would default to "must deny";
    # this keeps the tables honest about fields that no longer exist.
    dotted = {_dotted(p) for p in LEAVES}
    assert set(TOLERANT) <= dotted
    assert dotted >= IGNORED


def test_one_field_changed_denies_unless_harmless() -> None:
    loop = asyncio.new_event_loop()
    engine = EmbeddedEngine()
    try:
        loop.run_until_complete(engine.load(load_policy_dir(POLICIES)))
        base_decision = loop.run_until_complete(engine.evaluate(BASE))
        assert base_decision.allow

        @settings(max_examples=400, deadline=None, derandomize=True)
        @given(mutations())
        def check(mutation: tuple[Path_, object]) -> None:
            path, value = mutation
            if _same(value, _get(BASE, path)):
                return
            decision: Decision = loop.run_until_complete(engine.evaluate(_set(BASE, path, value)))
            name = _dotted(path)
            if name in IGNORED:
                assert decision == base_decision, (name, value)
            elif name in TOLERANT:
                assert decision.allow == TOLERANT[name](value), (name, value, decision.reasons)
            else:
                assert not decision.allow, (name, value)
                assert decision.attributes == {}

        check()
    finally:
        loop.run_until_complete(engine.aclose())
        loop.close()
