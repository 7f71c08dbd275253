"""The PolicyEngine edge: an input document in, a Decision out.

The engine evaluates ``data.identityd.decision`` (an object, so that ``false``
and undefined cannot be confused). Undefined, a malformed decision, an engine
error or a dead engine never become an allow: they raise PolicyUnavailable,
except that undefined has its own reason code ``POLICY_UNDEFINED``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from identityd.errors import BadRequest, PolicyCompileError, PolicyUnavailable

__all__ = ["DECISION_QUERY", "Decision", "PolicyCompileError", "PolicyEngine"]

DECISION_PATH = "identityd/decision"
DECISION_QUERY = "data.identityd.decision"
INPUT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Decision:
    allow: bool
    reasons: tuple[str, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)

    @property
    def codes(self) -> tuple[str, ...]:
        """The stable reason codes: the part of each reason before ``:``."""
        return tuple(r.split(":", 1)[0].strip() for r in self.reasons)

    def as_document(self) -> dict[str, Any]:
        return {
            "allow": self.allow,
            "reasons": list(self.reasons),
            "attributes": dict(self.attributes),
        }


def input_json(input_doc: Mapping[str, Any]) -> str:
    """The input document as compact JSON text, for either engine; BadRequest when it
    is not JSON (NaN, a value or key JSON has no form for)."""
    try:
        return json.dumps(dict(input_doc), allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise BadRequest("POLICY_INPUT_NOT_JSON", f"the policy input is not JSON: {exc}") from None


def decision_from_document(doc: object) -> Decision:
    """Validate an engine's decision document; anything off is PolicyUnavailable."""
    if doc is None:
        raise PolicyUnavailable("POLICY_UNDEFINED", "the decision is undefined")
    if not isinstance(doc, dict):
        raise PolicyUnavailable("POLICY_BAD_DECISION", "decision is not an object")
    allow = doc.get("allow")
    reasons = doc.get("reasons", [])
    attributes = doc.get("attributes", {})
    if not isinstance(allow, bool):
        raise PolicyUnavailable("POLICY_BAD_DECISION", "decision.allow is not a boolean")
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise PolicyUnavailable("POLICY_BAD_DECISION", "decision.reasons is not a string list")
    if not isinstance(attributes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise PolicyUnavailable("POLICY_BAD_DECISION", "decision.attributes is not string map")
    if allow and reasons:
        # A policy that allows while giving reasons to deny is broken: fail closed.
        raise PolicyUnavailable("POLICY_BAD_DECISION", "allow with deny reasons")
    if not allow and not reasons:
        reasons = ["POLICY_DENY: no reason given"]
    return Decision(allow=allow, reasons=tuple(reasons), attributes=dict(attributes))


class PolicyEngine(Protocol):
    @property
    def ready(self) -> bool:
        """True when a compiled policy set is loaded and the engine answers."""
        ...

    async def load(self, modules: Mapping[str, str]) -> None:
        """Compile and install ``{module_id: rego_source}`` as the whole policy set.

        Raises PolicyCompileError and keeps the previous set on any failure."""
        ...

    async def evaluate(self, input_doc: Mapping[str, Any]) -> Decision:
        """Evaluate the decision for ``input_doc``; raise PolicyUnavailable if unable."""
        ...

    async def aclose(self) -> None: ...
