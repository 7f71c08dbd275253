"""The embedded policy engine: regopy (rego-cpp) in-process.

Decisions are evaluated in-line, on the event loop's thread. A worker process
has one core's worth of work to do and the evaluation is pure CPU, so handing it
to a thread bought no parallelism; it cost a thread hop per decision and, worse,
GIL hand-offs: a thread returning from native code waits up to the interpreter's
switch interval (5 ms) for a busy event loop to let go (bench/load.py measured
~0.15 ms of CPU and milliseconds of p99 per decision). Every regopy call thus
happens on the one thread that uses the engine (an interpreter is not
thread-safe), loading included; a compile pauses that loop for its duration
(~25 ms for the default set).

A decision that takes longer than the timeout is reported as POLICY_TIMEOUT
(its answer is discarded: fail closed). A native call cannot be interrupted, so
an evaluation that never ends wedges its worker: ``identityd serve`` runs a
watchdog (identityd/cli/watchdog.py) that ends a worker whose loop stops
turning, and the supervisor starts a new one while the others serve.

Speed (bench/policy_eval.py). regopy's own ways in and out cost more than the
policy: parsing the input as JSON text is ~0.6 ms for a 2 KB document and its
``set_input(dict)`` wrapper ~0.3 ms. This engine builds the input through
rego-cpp's C input API directly (~1 us a value, called without releasing the
GIL, which ctypes would otherwise do around each of a few hundred calls), with
every string escaped exactly as the JSON path stores it, so both give the same
answers; it evaluates the decision as a bundle entry point rather than a
compiled query, and reads the output once. Whatever that path cannot represent
identically (floats, integers beyond 64 bits, types other than dict/list/str/
int/bool/None) goes the JSON way; so does everything when the C library or
regopy's internals are not as expected, which a probe checks when the engine
starts.
"""

from __future__ import annotations

import ctypes
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any

import regopy

from identityd.errors import BadRequest, PolicyCompileError, PolicyUnavailable
from identityd.policy.base import (
    DECISION_PATH,
    INPUT_VERSION,
    Decision,
    decision_from_document,
    input_json,
)
from identityd.policy.sources import refuse_with
from identityd.settings import DEFAULT_DECISION_TIMEOUT_SECONDS

__all__ = ["EmbeddedEngine"]

# The decision is evaluated as an entry point of the compiled bundle, whose
# output is `{"expressions": [<decision>]}`: cheaper than a `d = data...`
# query, and a rule whose value is `false` comes back as false, not undefined.
_ENTRYPOINT = DECISION_PATH

# The smallest input a policy set must answer with an object decision before
# it may replace the one in force; every section is present but empty.
_SMOKE_INPUT = {
    "version": INPUT_VERSION,
    "kind": "instance",
    "request": {},
    "token": {},
    "pod": None,
    "csr": None,
    "config": {},
    "facts": {},
}

# Values whose native and JSON renderings must agree before the native input
# path is used: escapes, non-ASCII, control characters, keys that need
# escaping, extreme integers, nesting, empty containers.
_PROBE_INPUT = {
    "q": 'a"b',
    "bs": "c\\d",
    "u": "é☃\U0001f600",
    "ctrl": "t\tn\nr\r\x7f",
    "keys": {'k"q': 1, "é": 2, "": 3, "a\\b": [True, False, None]},
    "ints": [0, -1, 2**63 - 1, -(2**63), 9007199254740993],
    "nested": [[], {}, [[{"x": [None]}]]],
    "slash": "</script>",
}
_PROBE_ENTRYPOINT = "identityd_probe/echo"
_PROBE_MODULE = """package identityd_probe

import rego.v1

echo := {"input": input, "q": input.q == "a\\"b", "u": count(input.u), "k": input.keys["k\\"q"]}
"""

_ERROR_MODULE = re.compile(r"\(error \d+:([^|\s]+)\|")
_ERROR_MESSAGE = re.compile(r"\(errormsg \d+:([^)\n]*)")

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
# Keys and most values repeat from request to request; their escaped bytes are
# kept, up to this many (values come from callers, so the cache is bounded).
_TEXT_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class _Compiled:
    interpreter: Any  # regopy.Interpreter (untyped library)
    bundle: Any  # regopy.Bundle
    module_ids: tuple[str, ...]


class _Unsupported(Exception):
    """A value the native input path cannot represent exactly like JSON text."""


class _RegoC:
    """The rego-cpp C functions the fast path calls, declared on our own handle.

    regopy wraps each in Python (and its ``set_input(dict)`` checks every return
    code with a Python call), which costs more than the C work itself. The short
    calls keep the GIL (``PyDLL``): releasing and taking it back around each of
    the few hundred calls that build an input costs more than the call. The
    query releases it (``CDLL``), so a watchdog thread can still run while an
    evaluation does.
    """

    def __init__(self, library_path: str) -> None:
        keeps_gil = ctypes.PyDLL(library_path)
        releases_gil = ctypes.CDLL(library_path)

        def fn(name: str, restype: Any, *argtypes: Any, lib: ctypes.CDLL = keeps_gil) -> Any:
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = list(argtypes)
            return function

        handle, u32, text = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p

        self.new_input = fn("regoNewInput", handle)
        self.free_input = fn("regoFreeInput", None, handle)
        self.input_string = fn("regoInputString", u32, handle, text)
        self.input_int = fn("regoInputInt", u32, handle, ctypes.c_int64)
        self.input_bool = fn("regoInputBoolean", u32, handle, ctypes.c_bool)
        self.input_null = fn("regoInputNull", u32, handle)
        self.input_item = fn("regoInputObjectItem", u32, handle)
        self.input_object = fn("regoInputObject", u32, handle, u32)
        self.input_array = fn("regoInputArray", u32, handle, u32)
        self.set_input = fn("regoSetInput", u32, handle, handle)
        self.query_entrypoint = fn(
            "regoBundleQueryEntrypoint", handle, handle, handle, text, lib=releases_gil
        )
        self.output_ok = fn("regoOutputOk", ctypes.c_bool, handle)
        self.output_size = fn("regoOutputJSONSize", u32, handle)
        self.output_json = fn("regoOutputJSON", u32, handle, ctypes.c_char_p, u32)
        self.free_output = fn("regoFreeOutput", None, handle)


def _load_rego_c() -> _RegoC | None:
    """The C functions, or None when regopy does not say where its library is.

    The handles of regopy's objects (``_impl``) are private too: the probe at the
    first load finds out whether all of it still fits together."""
    path = getattr(getattr(regopy, "rego_shared", None), "path", None)
    if not isinstance(path, str):
        return None
    try:
        return _RegoC(path)
    except (OSError, AttributeError):
        return None


class _NativeInput:
    """An input document built in rego-cpp memory, freed exactly once: as soon
    as it is the interpreter's input, or, if it never gets there (an error in
    between), when the last reference goes."""

    def __init__(self, c: _RegoC, handle: int) -> None:
        self._c = c
        self._handle: int | None = handle

    def install(self, interpreter_handle: int) -> int:
        """Make this the interpreter's input and free it; the C return code."""
        handle, self._handle = self._handle, None
        if handle is None:
            return 1
        try:
            return int(self._c.set_input(interpreter_handle, handle))
        finally:
            self._c.free_input(handle)

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._c.free_input(handle)

    def __del__(self) -> None:
        self.release()


@dataclass(frozen=True, slots=True)
class _Prepared:
    """The input as it will be handed to regopy: native, or JSON text."""

    native: _NativeInput | None
    text: str | None


class EmbeddedEngine:
    """PolicyEngine on regopy; see identityd.policy.base for the contract.

    Used from one thread (the event loop's): every method runs regopy on the
    caller's thread."""

    def __init__(
        self, *, timeout: float = DEFAULT_DECISION_TIMEOUT_SECONDS, native_input: bool = True
    ) -> None:
        """``native_input=False`` always sends the input as JSON text (the slower
        reference path; for comparisons and benchmarks)."""
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout: expected seconds as a number, got {type(timeout).__name__}")
        if not timeout > 0:
            raise ValueError(f"timeout: must be positive, got {timeout!r}")
        if not isinstance(native_input, bool):
            raise TypeError(f"native_input: expected a bool, got {type(native_input).__name__}")
        self._timeout = float(timeout)
        self._compiled: _Compiled | None = None
        self._closed = False
        # The native path, until the probe at the first load says otherwise.
        self._c: _RegoC | None = _load_rego_c() if native_input else None
        self._probed = False
        self._text_cache: dict[str, bytes] = {}

    @property
    def ready(self) -> bool:
        """A policy set is installed and the engine is open."""
        return self._compiled is not None and not self._closed

    @property
    def module_ids(self) -> tuple[str, ...]:
        """Ids of the modules in force (empty before the first load)."""
        compiled = self._compiled
        return compiled.module_ids if compiled is not None else ()

    @property
    def native_input(self) -> bool:
        """Whether inputs go through rego-cpp's C input API (else as JSON text);
        settled by the probe at the first load."""
        return self._c is not None

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
        self._install(dict(modules))

    async def evaluate(self, input_doc: Mapping[str, Any]) -> Decision:
        compiled = self._compiled
        if compiled is None or self._closed:
            raise PolicyUnavailable("POLICY_NOT_LOADED", "no policy set is loaded")
        started = time.monotonic()
        document = _query(compiled, self._c, self._prepare(input_doc))
        if time.monotonic() - started > self._timeout:
            # Too late to be trusted as the answer to this request: fail closed.
            raise PolicyUnavailable("POLICY_TIMEOUT", f"no decision within {self._timeout:g} s")
        return decision_from_document(document)

    async def aclose(self) -> None:
        self._closed = True
        self._compiled = None

    async def __aenter__(self) -> EmbeddedEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _prepare(self, input_doc: Mapping[str, Any]) -> _Prepared:
        if not isinstance(input_doc, Mapping):
            raise TypeError(f"input_doc: expected a mapping, got {type(input_doc).__name__}")
        c = self._c
        if c is not None:
            native = _native_input(c, input_doc, self._text_cache)
            if native is not None:
                return _Prepared(native, None)
        return _Prepared(None, _input_json(input_doc))

    def _install(self, modules: dict[str, str]) -> None:
        if not self._probed:
            self._probed = True
            if self._c is not None and not _native_agrees(self._c):
                self._c = None
        compiled = _compile(modules)
        smoke = _Prepared(None, _input_json(_SMOKE_INPUT))
        if self._c is not None:
            smoke = _Prepared(_native_input(self._c, _SMOKE_INPUT, {}), None)
        # A set that cannot answer the smallest input is refused, not installed.
        try:
            decision_from_document(_query(compiled, self._c, smoke))
        except PolicyUnavailable as exc:
            raise PolicyCompileError(f"the policy set gives no usable decision: {exc}") from exc
        self._compiled = compiled  # the old set is freed here


def _compile(modules: dict[str, str]) -> _Compiled:
    interpreter = regopy.Interpreter()
    # regopy prints compile errors to stdout; they come back in RegoError anyway.
    interpreter.log_level = regopy.LogLevel.NONE
    # A builtin's error (to_number("x"), ...) fails the decision instead of leaving
    # its expression undefined, which in a `deny if ...` rule would allow. The OPA
    # engine asks the same of OPA (strict-builtin-errors).
    interpreter.strict_built_in_errors = True
    try:
        for module_id, source in modules.items():
            interpreter.add_module(module_id, source)
        bundle = interpreter.build(None, [_ENTRYPOINT])
    except regopy.RegoError as exc:
        module, message = _describe_rego_error(str(exc))
        raise PolicyCompileError(message, module=module) from None
    if not bundle.ok():
        raise PolicyCompileError("the policy set does not build")
    return _Compiled(interpreter, bundle, tuple(modules))


def _query(compiled: _Compiled, c: _RegoC | None, prepared: _Prepared) -> object:
    """The decision document for one input, or None when undefined."""
    try:
        if c is not None:
            ok, raw = _query_native(compiled, c, prepared)
        else:
            ok, raw = _query_regopy(compiled, prepared)
    except PolicyUnavailable:
        raise
    # The edge: regopy raises RegoError for native failures, ValueError when its
    # output is not JSON; whatever else escapes is the engine's failure too, never
    # a crash of the request. Only the type is kept: messages can quote the input.
    except Exception as exc:  # noqa: BLE001
        raise PolicyUnavailable(
            "POLICY_ENGINE_ERROR", f"evaluation failed: {type(exc).__name__}"
        ) from None
    return _decision_from_output(ok, raw)


def _query_native(
    compiled: _Compiled, c: _RegoC, prepared: _Prepared, entrypoint: str = _ENTRYPOINT
) -> tuple[bool, str]:
    interpreter = compiled.interpreter._impl
    if prepared.native is not None:
        if prepared.native.install(interpreter) != 0:
            raise PolicyUnavailable("POLICY_ENGINE_ERROR", "the engine refused the input")
    else:
        compiled.interpreter.set_input_term(prepared.text)
    output = c.query_entrypoint(interpreter, compiled.bundle._impl, entrypoint.encode())
    if not output:
        raise PolicyUnavailable("POLICY_ENGINE_ERROR", "the engine gave no output")
    try:
        ok = bool(c.output_ok(output))
        size = int(c.output_size(output))
        buffer = ctypes.create_string_buffer(size)
        if c.output_json(output, buffer, size) != 0:
            raise PolicyUnavailable("POLICY_ENGINE_ERROR", "the engine's output is unreadable")
        return ok, buffer.value.decode("utf-8")
    finally:
        c.free_output(output)


def _query_regopy(
    compiled: _Compiled, prepared: _Prepared, entrypoint: str = _ENTRYPOINT
) -> tuple[bool, str]:
    compiled.interpreter.set_input_term(prepared.text)
    output = compiled.interpreter.query_bundle_entrypoint(compiled.bundle, entrypoint)
    return bool(output.ok()), str(output)


def _decision_from_output(ok: bool, raw: str) -> object:
    text = raw.strip()
    # Conflicting rule values come back as the bare text `<error>`.
    if not ok or text == "<error>":
        raise PolicyUnavailable("POLICY_ENGINE_ERROR", "the engine reported an error")
    if text == "undefined":
        return None
    try:
        result = json.loads(text)
    except ValueError:
        raise PolicyUnavailable("POLICY_ENGINE_ERROR", "the engine's output is not JSON") from None
    if isinstance(result, list):
        if len(result) != 1:
            raise PolicyUnavailable(
                "POLICY_ENGINE_ERROR", f"the query gave {len(result)} results, expected one"
            )
        result = result[0]
    expressions = result.get("expressions") if isinstance(result, dict) else None
    if not isinstance(expressions, list) or not expressions:
        return None
    if len(expressions) != 1:
        raise PolicyUnavailable("POLICY_ENGINE_ERROR", "the entry point gave several values")
    return expressions[0]


# --- the native input path --------------------------------------------------


def _native_input(
    c: _RegoC, doc: Mapping[str, Any], text_cache: dict[str, bytes]
) -> _NativeInput | None:
    """``doc`` built with the C input API, or None if it needs the JSON path.

    Strings go in as their JSON escape (without the quotes): rego-cpp keeps a
    string from JSON text in that form, and compares and prints it so.
    Raises BadRequest for a NUL, as the JSON path does.
    """
    if len(text_cache) > _TEXT_CACHE_LIMIT:
        text_cache.clear()
    cached = text_cache.get
    put_string, put_int, put_bool = c.input_string, c.input_int, c.input_bool
    put_null, put_item, put_object, put_array = (
        c.input_null,
        c.input_item,
        c.input_object,
        c.input_array,
    )

    def escaped(text: Any) -> bytes:
        known: bytes | None = cached(text)
        if known is None:
            if type(text) is not str:
                raise _Unsupported  # a key JSON would convert (int, float, ...)
            body: str = encode_basestring_ascii(text)
            if "\\u0000" in body:
                raise BadRequest("POLICY_INPUT_NOT_JSON", "the policy input contains NUL")
            known = text_cache[text] = body[1:-1].encode("ascii")
        return known

    def put(value: Any) -> int:
        kind = type(value)
        if kind is str:
            return put_string(handle, escaped(value))  # type: ignore[no-any-return]
        if kind is dict:
            status = 0
            for key, item in value.items():
                status |= put_string(handle, escaped(key)) | put(item) | put_item(handle)
            return status | put_object(handle, len(value))  # type: ignore[no-any-return]
        if kind is list:
            status = 0
            for item in value:
                status |= put(item)
            return status | put_array(handle, len(value))  # type: ignore[no-any-return]
        if kind is bool:
            return put_bool(handle, value)  # type: ignore[no-any-return]
        if kind is int:
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise _Unsupported
            return put_int(handle, value)  # type: ignore[no-any-return]
        if value is None:
            return put_null(handle)  # type: ignore[no-any-return]
        raise _Unsupported  # floats, tuples, subclasses, non-JSON: the JSON path decides

    handle = c.new_input()
    if not handle:
        return None
    native = _NativeInput(c, handle)
    try:
        status = put(doc if type(doc) is dict else dict(doc))
    except (_Unsupported, RecursionError):
        native.release()
        return None
    except BaseException:
        native.release()
        raise
    if status != 0:
        native.release()
        raise PolicyUnavailable("POLICY_ENGINE_ERROR", "the engine refused the input")
    return native


def _native_agrees(c: _RegoC) -> bool:
    """Whether the native path gives the JSON path's answers with this regopy."""
    try:
        interpreter = regopy.Interpreter()
        interpreter.log_level = regopy.LogLevel.NONE
        interpreter.add_module("probe.rego", _PROBE_MODULE)
        bundle = interpreter.build(None, [_PROBE_ENTRYPOINT])
        compiled = _Compiled(interpreter, bundle, ("probe.rego",))
        native = _native_input(c, _PROBE_INPUT, {})
        if native is None:
            return False
        by_c = _query_native(compiled, c, _Prepared(native, None), _PROBE_ENTRYPOINT)
        by_text = _query_regopy(
            compiled, _Prepared(None, _input_json(_PROBE_INPUT)), _PROBE_ENTRYPOINT
        )
        echo = _decision_from_output(*by_text)
    except Exception:  # noqa: BLE001  (a probe: any failure means "do not use it")
        return False
    return by_c == by_text and isinstance(echo, dict) and echo.get("q") is True


# --- pure helpers -----------------------------------------------------------


def _input_json(input_doc: Mapping[str, Any]) -> str:
    text = input_json(input_doc)
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
