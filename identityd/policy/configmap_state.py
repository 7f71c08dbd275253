"""The pure core of policies from ConfigMaps (kube-mgmt's convention): which content
to offer the engine, what is held back, and the status each ConfigMap should carry.
No I/O, no clock; :mod:`identityd.policy.configmaps` feeds it from the API server and
writes the statuses it asks for.

Which ConfigMaps: those labelled ``openpolicyagent.org/policy=rego``. As kube-mgmt
does, every key of ``data`` is one Rego module, whatever its name, with the id
``<namespace>/<configmap>/<key>``; ``binaryData`` is ignored.

A ConfigMap that breaks the set is held back, as kube-mgmt loads each ConfigMap on its
own: when the engine rejects a set and names a module of a ConfigMap whose content is
new, the next snapshot carries that ConfigMap's last loaded content instead (or none),
so the other ConfigMaps' edits still come into force. When the culprit cannot be told
(no module named, or the named one is unchanged), every changed ConfigMap is held back.
Any later change of data releases every hold and the whole current set is tried again.
A set that fails never replaces the one in force (the engines guarantee that).

Status: each ConfigMap's ``openpolicyagent.org/kube-mgmt-status`` annotation carries the
JSON kube-mgmt writes, ``{"status":"ok"}`` or ``{"status":"error","error":<OPA's error
body>}``, derived from state (held back → error; its current content in force → ok;
not tried yet → nothing).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from identityd.kubeapi import JSONObject
from identityd.policy.reload import ReloadOutcome, ReloadResult

__all__ = [
    "OK",
    "POLICY_LABEL_SELECTOR",
    "STATUS_ANNOTATION",
    "Key",
    "PolicyConfigMap",
    "PolicyState",
    "module_id",
    "status_value",
]

log = logging.getLogger("identityd.policy.configmaps")

POLICY_LABEL_SELECTOR = "openpolicyagent.org/policy=rego"
STATUS_ANNOTATION = "openpolicyagent.org/kube-mgmt-status"
# OPA's error body for a module that does not compile (PUT /v1/policies → 400), the
# value kube-mgmt puts under "error".
_OPA_ERROR_CODE = "invalid_parameter"
_OPA_ERROR_MESSAGE = "error(s) occurred while compiling module(s)"
# The OPA engine's detail: "rego_parse_error: message (row 3, col 1)".
_DETAIL = re.compile(
    r"^(?:(?P<code>rego_[a-z_]+):\s*)?(?P<message>.*?)"
    r"(?:\s*\(row (?P<row>\d+), col (?P<col>\d+)\))?(?P<more>\s*\(and \d+ more\))?$",
    re.DOTALL,
)

Key = tuple[str, str]  # (namespace, name)
OK = '{"status":"ok"}'


def module_id(namespace: str, name: str, key: str) -> str:
    """kube-mgmt's policy id: ``<namespace>/<configmap>/<key>``."""
    return f"{namespace}/{name}/{key}"


def _go_json(value: object) -> str:
    """JSON as Go's encoding/json writes it (compact; <, >, & and U+2028/9 escaped)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    return text


def status_value(error: str | None, module: str | None = None) -> str:
    """The annotation value: ``{"status":"ok"}`` for ``error=None``, otherwise
    ``{"status":"error","error":{...}}`` with the error in OPA's shape, the way kube-mgmt
    writes a module OPA refused: ``{"code", "message", "errors": [{"code", "message",
    "location": {"file", "row", "col"}}]}`` (``location`` when a module is named; row
    and col when the engine said)."""
    if error is None:
        return OK
    match = _DETAIL.match(error.strip())
    detail: JSONObject = {"code": "rego_compile_error", "message": error.strip()}
    if match is not None:
        detail = {
            "code": match["code"] or "rego_compile_error",
            "message": (match["message"] + (match["more"] or "")).strip(),
        }
    if module is not None:
        location: JSONObject = {"file": module}
        if match is not None and match["row"] is not None:
            location |= {"row": int(match["row"]), "col": int(match["col"])}
        detail["location"] = location
    return _go_json(
        {
            "status": "error",
            "error": {"code": _OPA_ERROR_CODE, "message": _OPA_ERROR_MESSAGE, "errors": [detail]},
        }
    )


@dataclass(frozen=True, slots=True)
class PolicyConfigMap:
    """What the source keeps of a ConfigMap: its modules' text and its status annotation."""

    namespace: str
    name: str
    data: Mapping[str, str]
    status: str | None = None  # the kube-mgmt-status annotation as last seen
    resource_version: str = ""

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @staticmethod
    def from_object(obj: JSONObject) -> PolicyConfigMap | None:
        """None for an object without a namespace and name. Non-string data values
        (the API server never sends them) are dropped."""
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            return None
        namespace, name = meta.get("namespace"), meta.get("name")
        if not isinstance(namespace, str) or not namespace or not isinstance(name, str) or not name:
            return None
        data = obj.get("data")
        modules = (
            {k: v for k, v in sorted(data.items()) if isinstance(k, str) and isinstance(v, str)}
            if isinstance(data, dict)
            else {}
        )
        annotations = meta.get("annotations")
        status = annotations.get(STATUS_ANNOTATION) if isinstance(annotations, dict) else None
        rv = meta.get("resourceVersion")
        return PolicyConfigMap(
            namespace,
            name,
            modules,
            status if isinstance(status, str) else None,
            rv if isinstance(rv, str) else "",
        )


@dataclass(frozen=True, slots=True)
class _Verdict:
    data: Mapping[str, str]  # the content it is about
    status: str  # the annotation value


class PolicyState:
    """The pure core: the ConfigMaps seen, the content in force, what is held back,
    and the status each ConfigMap should carry. No I/O, no clock."""

    def __init__(self) -> None:
        self.configmaps: dict[Key, PolicyConfigMap] = {}
        self._good: dict[Key, Mapping[str, str]] | None = None  # per ConfigMap, in force
        self._held: dict[Key, _Verdict] = {}  # held back from the set, with their error
        self._failed: dict[Key, _Verdict] = {}  # blamed, not held (nothing else to blame)
        self._offer: dict[Key, Mapping[str, str]] | None = None  # the last snapshot

    # -- what the watch saw -------------------------------------------------------------------

    def upsert(self, cm: PolicyConfigMap) -> bool:
        """Keep ``cm``; True when its data changed (a new set to try)."""
        old = self.configmaps.get(cm.key)
        self.configmaps[cm.key] = cm
        changed = old is None or old.data != cm.data
        if changed:
            self._held.clear()
        return changed

    def remove(self, namespace: str, name: str) -> bool:
        changed = self.configmaps.pop((namespace, name), None) is not None
        if changed:
            self._held.clear()
        return changed

    def replace_namespace(self, namespace: str, cms: list[PolicyConfigMap]) -> bool:
        """A relist of one namespace; True when any data changed."""
        fresh = {cm.key: cm for cm in cms if cm.namespace == namespace}
        old = {k: cm for k, cm in self.configmaps.items() if k[0] == namespace}
        changed = {k: cm.data for k, cm in old.items()} != {k: cm.data for k, cm in fresh.items()}
        for key in old:
            del self.configmaps[key]
        self.configmaps.update(fresh)
        if changed:
            self._held.clear()
        return changed

    # -- what the reloader asks and is told ---------------------------------------------------

    def snapshot(self) -> dict[str, str]:
        """The set to try: each ConfigMap's current content, or for one held back, the
        content of it in force (nothing if none). Remembered for :meth:`observe`."""
        offer: dict[Key, Mapping[str, str]] = {}
        for key, cm in sorted(self.configmaps.items()):
            held = self._held.get(key)
            if held is not None and held.data == cm.data:
                if self._good is not None and key in self._good:
                    offer[key] = self._good[key]
                continue
            offer[key] = cm.data
        self._offer = offer
        return {
            module_id(ns, name, k): text
            for (ns, name), data in offer.items()
            for k, text in data.items()
        }

    def observe(self, result: ReloadResult) -> bool:
        """Take the outcome of trying the last snapshot. True when a ConfigMap was newly
        held back, so a set without it should be tried now."""
        offer = self._offer
        if offer is None:
            return False
        if result.outcome is ReloadOutcome.LOADED:
            self._good = dict(offer)
            self._failed.clear()
            return False
        if result.outcome is not ReloadOutcome.REJECTED:
            return False  # engine down or source unreadable: nothing learnt about the policy
        status = status_value(_message(result), result.module)
        culprit = _key_of(result.module)
        good = self._good or {}
        changed = [k for k, data in offer.items() if good.get(k) != data]
        if culprit in changed:
            blamed = [culprit]
        elif changed:
            blamed = changed  # cannot tell which: hold back every change
        else:
            if culprit is not None and culprit in offer:
                self._failed[culprit] = _Verdict(offer[culprit], status)
            return False
        for key in blamed:
            self._held[key] = _Verdict(offer[key], status)
        log.warning(
            "policy ConfigMaps held back until they change: %s",
            ", ".join(f"{ns}/{name}" for ns, name in blamed),
        )
        return True

    # -- status -------------------------------------------------------------------------------

    def desired_status(self, key: Key) -> str | None:
        """The annotation the ConfigMap should carry; None while its content is untried."""
        cm = self.configmaps.get(key)
        if cm is None:
            return None
        for verdicts in (self._held, self._failed):
            verdict = verdicts.get(key)
            if verdict is not None and verdict.data == cm.data:
                return verdict.status
        if self._good is not None and self._good.get(key) == cm.data:
            return OK
        return None

    def pending_writes(self) -> list[tuple[PolicyConfigMap, str]]:
        """(ConfigMap, value) for every annotation that differs from what it should be."""
        out = []
        for key, cm in sorted(self.configmaps.items()):
            wanted = self.desired_status(key)
            if wanted is not None and wanted != cm.status:
                out.append((cm, wanted))
        return out

    @property
    def held(self) -> tuple[Key, ...]:
        return tuple(sorted(self._held))


def _message(result: ReloadResult) -> str:
    """The engine's message without the ``<module>: `` prefix PolicyCompileError adds."""
    error = result.error or "the policy set does not compile"
    prefix = f"{result.module}: " if result.module else ""
    return error[len(prefix) :] if prefix and error.startswith(prefix) else error


def _key_of(module: str | None) -> Key | None:
    if module is None:
        return None
    parts = module.split("/", 2)  # namespaces, names and data keys hold no "/"
    return (parts[0], parts[1]) if len(parts) == 3 else None
