"""The embedded engine's two ways to hand regopy an input: rego-cpp's C input API (the
fast path) and JSON text (the reference). Policies must not be able to tell them apart,
whatever the strings hold; inputs the C path cannot represent exactly take the JSON path."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from identityd.errors import BadRequest
from identityd.policy.base import Decision
from identityd.policy.embedded import EmbeddedEngine

HEADER = "package identityd\n\nimport rego.v1\n\n"

# Every attribute is a string the policy computed from the input, so the engine's
# output parsing round-trips it: comparisons, lengths (regopy counts escaped text),
# key lookups, concatenation, and the strings themselves.
ECHO = HEADER + r'''
attributes["q"] := input.q

attributes["q_is_literal"] := json_bool(input.q == "a\"b")

attributes["bs_is_literal"] := json_bool(input.bs == "c\\d")

attributes["ctrl_is_literal"] := json_bool(input.ctrl == "t\tn\nr\r")

attributes["u"] := input.u

attributes["u_count"] := format_int(count(input.u), 10)

attributes["key_with_quote"] := input.keys["k\"q"]

attributes["key_empty"] := input.keys[""]

attributes["keys"] := concat(",", sort(object.keys(input.keys)))

attributes["joined"] := concat("|", [input.q, input.bs, input.u])

attributes["big"] := format_int(input.ints[2], 10)

attributes["small"] := format_int(input.ints[3], 10)

attributes["neg"] := json_bool(input.ints[1] < 0)

attributes["nested"] := json_bool(input.nested[2][0][0].x == [null])

attributes["empties"] := json_bool(count(input.nested[0]) + count(input.nested[1]) == 0)

attributes["bools"] := json_bool(input.flags == [true, false, null])

attributes["float"] := json_bool(input.extra == object.get(input, "extra", null)) if input.extra

attributes["missing"] := json_bool(object.get(input, "absent", "default") == "default")

json_bool(x) := "true" if x

json_bool(x) := "false" if not x

decision := {"allow": true, "reasons": [], "attributes": attributes}
'''

TRICKY: dict[str, Any] = {
    "q": 'a"b',
    "bs": "c\\d",
    "ctrl": "t\tn\nr\r",
    "u": "é☃\U0001f600",
    "keys": {'k"q': "quoted key", "": "empty key", "é": "e-acute", "a\\b": "backslash"},
    "ints": [0, -1, 2**63 - 1, -(2**63)],
    "nested": [[], {}, [[{"x": [None]}]]],
    "flags": [True, False, None],
}


@pytest.fixture
async def engines() -> AsyncIterator[tuple[EmbeddedEngine, EmbeddedEngine]]:
    async with EmbeddedEngine() as native, EmbeddedEngine(native_input=False) as text:
        await native.load({"echo.rego": ECHO})
        await text.load({"echo.rego": ECHO})
        yield native, text


async def _both(
    engines: tuple[EmbeddedEngine, EmbeddedEngine], doc: Mapping[str, Any]
) -> tuple[Decision, Decision]:
    native, text = engines
    return await native.evaluate(doc), await text.evaluate(doc)


async def test_the_fast_path_is_in_use(engines: tuple[EmbeddedEngine, EmbeddedEngine]) -> None:
    # If regopy changes so that the probe at load disagrees, this says so (and every
    # decision quietly takes the slower JSON path).
    native, text = engines
    assert native.native_input
    assert not text.native_input


async def test_tricky_strings_and_values_read_the_same(
    engines: tuple[EmbeddedEngine, EmbeddedEngine],
) -> None:
    by_c, by_text = await _both(engines, TRICKY)
    assert by_c == by_text
    got = by_c.attributes
    # ... and what the policy read is what was sent.
    assert got["q"] == TRICKY["q"]
    assert got["u"] == TRICKY["u"]
    assert got["joined"] == 'a"b|c\\d|é☃\U0001f600'
    assert got["key_with_quote"] == "quoted key"
    assert got["key_empty"] == "empty key"
    assert got["big"] == str(2**63 - 1) and got["small"] == str(-(2**63))
    assert {k: got[k] for k in got if k.endswith(("_is_literal",))} == {
        "q_is_literal": "true", "bs_is_literal": "true", "ctrl_is_literal": "true",
    }
    assert got["neg"] == got["nested"] == got["empties"] == got["bools"] == "true"
    assert got["missing"] == "true"


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (1.5, "a float: the C API would store it with another spelling"),
        (1e-07, "a float the C API would round to 0"),
        (2**64, "beyond 64 bits"),
        (-(2**70), "beyond 64 bits, negative"),
        (("a", "b"), "a tuple: JSON makes it a list"),
        ({1: "int key"}, "a non-string key: JSON makes it a string"),
    ],
)
async def test_values_the_c_path_cannot_represent_take_the_json_path(
    engines: tuple[EmbeddedEngine, EmbeddedEngine], extra: object, why: str
) -> None:
    by_c, by_text = await _both(engines, {**TRICKY, "extra": extra})
    assert by_c == by_text, why
    assert by_c.attributes["float"] == "true"


async def test_strings_and_keys_agree_beyond_the_probe(
    engines: tuple[EmbeddedEngine, EmbeddedEngine],
) -> None:
    # Every printable ASCII character and a few control and non-ASCII ones, in values
    # and in keys.
    alphabet = "".join(chr(i) for i in range(1, 128)) + "\u00a0\u2028\ufeff\U0010ffff"
    doc = {
        **TRICKY,
        "q": alphabet,
        "u": alphabet[::-1],
        "keys": {alphabet: "all", 'k"q': "quoted key", "": "empty key"},
    }
    by_c, by_text = await _both(engines, doc)
    assert by_c == by_text
    assert by_c.attributes["q"] == alphabet
    assert by_c.attributes["keys"] == by_text.attributes["keys"]


@pytest.mark.parametrize(
    "doc",
    [
        {"q": "a\x00b"},
        {"keys": {"a\x00": "nul in a key"}},
        {"x": float("nan")},
        {"x": float("inf")},
        {"x": object()},
        {"x": {1.5: "float key in a nested map"}, "y": [b"bytes"]},
    ],
)
async def test_what_json_refuses_is_refused_on_both_paths(
    engines: tuple[EmbeddedEngine, EmbeddedEngine], doc: dict[str, Any]
) -> None:
    for engine in engines:
        with pytest.raises(BadRequest) as info:
            await engine.evaluate(doc)
        assert info.value.code == "POLICY_INPUT_NOT_JSON"


async def test_a_mapping_that_is_not_a_dict_is_read_the_same(
    engines: tuple[EmbeddedEngine, EmbeddedEngine],
) -> None:
    from types import MappingProxyType

    by_c, by_text = await _both(engines, MappingProxyType(json.loads(json.dumps(TRICKY))))
    assert by_c == by_text
    assert by_c.attributes["q"] == 'a"b'


async def test_many_decisions_reuse_one_interpreter_cleanly(
    engines: tuple[EmbeddedEngine, EmbeddedEngine],
) -> None:
    native, _ = engines
    # Alternating inputs: nothing of one input leaks into the next decision.
    for i in range(200):
        doc = {**TRICKY, "q": f"q{i}"} if i % 2 else TRICKY
        decision = await native.evaluate(doc)
        assert decision.attributes["q"] == doc["q"]
