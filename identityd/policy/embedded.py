"""The embedded policy engine: regopy (rego-cpp) in-process.

Every regopy call runs on one dedicated worker thread owned by the engine: an
interpreter is not thread-safe, and a ctypes call releases the GIL, so the
event loop keeps serving while a decision is computed. Compiling, the swap to
a new set and freeing the old one happen on that thread too, so an evaluation
always sees one whole policy set.

A decision that overruns the timeout is reported as POLICY_TIMEOUT; the
native call cannot be interrupted, so it finishes in the background and
decisions queued behind it time out too (fail closed) until it does.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import regopy

from identityd.errors import BadRequest, PolicyCompileError, PolicyUnavailable
from identityd.policy.base import (
    DECISION_QUERY,
    INPUT_VERSION,
    Decision,
    decision_from_document,
)
from identityd.policy.sources import refuse_with
from identityd.settings import DEFAULT_DECISION_TIMEOUT_SECONDS

__all__ = ["EmbeddedEngine"]

_T = TypeVar("_T")

# The decision is queried as a binding, never as a bare rule value: regopy
# reports a rule whose value is `false` as undefined (REGO_PORTABILITY.md).
_BINDING = "d"
_QUERY = f"{_BINDING} = {DECISION_QUERY}"

# The smallest input a policy set must answer with an object decision before
# it may replace the one in force; every section is present but empty.
_SMOKE_INPUT = {
    "version": INPUT_VERSION, "kind": "instance", "request": {}, "token": {},
    "pod": None, "csr": None, "config": {}, "facts": {},
}

_ERROR_MODULE = re.compile(r"\(error \d+:([^|\s]+)\|")
_ERROR_MESSAGE = re.compile(r"\(errormsg \d+:([^)\n]*)")


@dataclass(frozen=True, slots=True)
class _Compiled:
    interpreter: Any  # regopy.Interpreter (untyped library)
    bundle: Any  # regopy.Bundle
    module_ids: tuple[str, ...]


class EmbeddedEngine:
    """PolicyEngine on regopy; see identityd.policy.base for the contract."""

    def __init__(self, *, timeout: float = DEFAULT_DECISION_TIMEOUT_SECONDS) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout: expected seconds as a number, got {type(timeout).__name__}")
        if not timeout > 0:
            raise ValueError(f"timeout: must be positive, got {timeout!r}")
        self._timeout = float(timeout)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="identityd-rego")
        # Written only on the worker thread, so an evaluation never sees a half swap.
        self._compiled: _Compiled | None = None
        # Mirrors "a set is installed" for the event loop's side.
        self._loaded = False
        self._closed = False
        # Set by the worker while a decision runs; read by `ready`.
        self._busy_since: float | None = None

    @property
    def ready(self) -> bool:
        """A set is installed and the worker is not stuck in an overrunning decision."""
        if not self._loaded or self._closed:
            return False
        since = self._busy_since
        return since is None or time.monotonic() - since < self._timeout

    @property
    def module_ids(self) -> tuple[str, ...]:
        """Ids of the modules in force (empty before the first load)."""
        compiled = self._compiled
        return compiled.module_ids if compiled is not None else ()

    async def load(self, modules: Mapping[str, str]) -> None:
        if not isinstance(modules, Mapping):
            raise TypeError(f"modules: expected a mapping, got {type(modules).__name__}")
        if not modules:
            raise PolicyCompileError("the policy set has no modules")
        for module_id, source in modules.items():
            if not isinstance(module_id, str) or not isinstance(source, str):
                raise TypeError("modules: expected {module_id: rego_source} strings")
            refuse_with(module_id, source)
        if self._closed:
            raise PolicyCompileError("the engine is closed")
        await self._on_worker(self._install, dict(modules))
        self._loaded = True

    async def evaluate(self, input_doc: Mapping[str, Any]) -> Decision:
        if self._closed or not self._loaded:
            raise PolicyUnavailable("POLICY_NOT_LOADED", "no policy set is loaded")
        text = _input_json(input_doc)
        try:
            document = await asyncio.wait_for(
                self._on_worker(self._evaluate_installed, text), self._timeout
            )
        except TimeoutError:
            raise PolicyUnavailable(
                "POLICY_TIMEOUT", f"no decision within {self._timeout:g} s"
            ) from None
        return decision_from_document(document)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loaded = False
        # Free the interpreter on its own thread; do not wait for a runaway decision.
        self._executor.submit(self._uninstall)
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> EmbeddedEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _on_worker(self, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:  # the executor was shut down under us
            if self._closed:
                raise PolicyUnavailable("POLICY_NOT_LOADED", "the engine is closed") from exc
            raise

    # --- on the worker thread ----------------------------------------------

    def _install(self, modules: dict[str, str]) -> None:
        compiled = _compile(modules)
        # A set that cannot answer the smallest input is refused, not installed.
        try:
            decision_from_document(_query(compiled, json.dumps(_SMOKE_INPUT)))
        except PolicyUnavailable as exc:
            raise PolicyCompileError(f"the policy set gives no usable decision: {exc}") from exc
        self._compiled = compiled  # the old set is freed here, on this thread

    def _uninstall(self) -> None:
        self._compiled = None

    def _evaluate_installed(self, text: str) -> object:
        compiled = self._compiled
        if compiled is None:
            raise PolicyUnavailable("POLICY_NOT_LOADED", "no policy set is loaded")
        self._busy_since = time.monotonic()
        try:
            return _query(compiled, text)
        finally:
            self._busy_since = None


def _compile(modules: dict[str, str]) -> _Compiled:
    interpreter = regopy.Interpreter()
    # regopy prints compile errors to stdout; they come back in RegoError anyway.
    interpreter.log_level = regopy.LogLevel.NONE
    try:
        for module_id, source in modules.items():
            interpreter.add_module(module_id, source)
        bundle = interpreter.build(_QUERY)
    except regopy.RegoError as exc:
        module, message = _describe_rego_error(str(exc))
        raise PolicyCompileError(message, module=module) from None
    if not bundle.ok():
        raise PolicyCompileError("the policy set does not build")
    return _Compiled(interpreter, bundle, tuple(modules))


def _query(compiled: _Compiled, text: str) -> object:
    """The decision document for one input (JSON text), or None when undefined."""
    try:
        compiled.interpreter.set_input_term(text)
        output = compiled.interpreter.query_bundle(compiled.bundle)
        ok = output.ok()
        raw = str(output)
    # The edge: regopy.Output raises ValueError when an error value is embedded in
    # its JSON, RegoError for native failures; whatever else escapes the binding is
    # the engine's failure too, never a crash of the request. Only the type is kept:
    # regopy's messages can quote the input.
    except Exception as exc:  # noqa: BLE001
        raise PolicyUnavailable(
            "POLICY_ENGINE_ERROR", f"evaluation failed: {type(exc).__name__}"
        ) from None
    # Conflicting rule values come back as the bare text `<error>`.
    if not ok or raw.strip() == "<error>":
        raise PolicyUnavailable("POLICY_ENGINE_ERROR", "the engine reported an error")
    if raw.strip() == "undefined":
        return None
    try:
        result = json.loads(raw)
    except ValueError:
        raise PolicyUnavailable("POLICY_ENGINE_ERROR", "the engine's output is not JSON") from None
    if isinstance(result, list):
        if len(result) != 1:
            raise PolicyUnavailable(
                "POLICY_ENGINE_ERROR", f"the query gave {len(result)} results, expected one"
            )
        result = result[0]
    bindings = result.get("bindings") if isinstance(result, dict) else None
    if not isinstance(bindings, dict):
        return None
    return bindings.get(_BINDING)


# --- pure helpers -----------------------------------------------------------


def _input_json(input_doc: Mapping[str, Any]) -> str:
    if not isinstance(input_doc, Mapping):
        raise TypeError(f"input_doc: expected a mapping, got {type(input_doc).__name__}")
    try:
        text = json.dumps(dict(input_doc), allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise BadRequest("POLICY_INPUT_NOT_JSON", f"the policy input is not JSON: {exc}") from None
    # regopy cuts strings at NUL (REGO_PORTABILITY.md); Python should have refused it already.
    if "\\u0000" in text:
        raise BadRequest("POLICY_INPUT_NOT_JSON", "the policy input contains NUL")
    return text


def _describe_rego_error(text: str) -> tuple[str | None, str]:
    """(module id, first message) out of regopy's error AST dump."""
    module = _ERROR_MODULE.search(text)
    message = _ERROR_MESSAGE.search(text)
    return (
        module.group(1) if module else None,
        message.group(1).strip() if message else "the policy set does not compile",
    )
