"""An OPA REST double: a real aiohttp server on loopback that speaks OPA's documented
REST API (https://www.openpolicyagent.org/docs/rest-api/) and evaluates with regopy.

    async with OPADouble() as opa:
        engine = OPAEngine(opa.url)
        ...

Served, with OPA's status codes and bodies:

- ``GET /v1/policies`` → ``{"result": [{"id", "raw", "ast"}, ...]}``; ``GET /v1/policies/{id}``
  → ``{"result": {...}}`` or 404 ``resource_not_found``.
- ``PUT /v1/policies/{id}`` (body = raw Rego): the whole resulting set is compiled; 200 ``{}``,
  or 400 ``{"code": "invalid_parameter", "message": "error(s) occurred while compiling
  module(s)", "errors": [{"code": "rego_parse_error", "message", "location": {"file", "row",
  "col"}}]}`` with the old set kept. ``DELETE /v1/policies/{id}``: 200 ``{}``, 404, or 400
  ``invalid_operation`` when the rest would no longer compile. An empty module: 400
  ``invalid_parameter`` "empty module".
- ``POST /v1/data[/{path}]`` with ``{"input": ...}`` (and ``GET``, without input): 200
  ``{"result": ...}``, or ``{}`` when the document is undefined (no ``result`` key, as OPA);
  an evaluation error is 500 ``internal_error``; a body that is not a JSON object is 400.
- ``GET /health`` → 200 ``{}``.
- Query parameters: ``strict-builtin-errors=true`` makes a builtin's error fail the query
  (500) rather than leave its expression undefined; ``pretty=true`` indents;
  ``metrics=true`` adds OPA's performance metrics (``metrics`` beside ``result``, in an
  answer of 200 only, as OPA) with OPA's names and meanings, in integer nanoseconds:

  - ``timer_server_handler_ns``: the whole handling, from the request's first bytes
    being read off the socket (so aiohttp's parsing counts) to the answer being ready,
    all but serializing the answer that carries it; what remains outside is aiohttp
    writing the answer (~0.05 ms). OPA's runs from its handler's entry (Go has parsed
    the head; the body is read inside) to the end of evaluation, before encoding the
    result: the same span, less the HTTP server's own work, which is small in Go.
  - ``timer_rego_input_parse_ns``: decoding the body and handing the input to regopy
    (``set_input_term``, which parses it again into regopy's terms); OPA's is the body's
    decoding into its AST.
  - ``timer_rego_query_eval_ns``: the query inside regopy, up to the result as a value.
  - ``timer_rego_query_compile_ns``: building the query, only when not cached for the
    path; ``counter_server_query_cache_hit`` is 1 when cached, else 0, as OPA's.

  ``PUT /v1/policies`` with ``metrics=true`` adds ``timer_rego_module_compile_ns``. Other
  parameters are ignored.
- Not OPA: ``GET /_double/stats`` (per data request, the time inside regopy (input and
  query) and the handler time as above, and the process's CPU time, for a benchmark that
  runs the double in another process) and ``POST /_double/reset`` (clears the record,
  restarts the CPU count).

Test controls: :meth:`OPADouble.set_delay`, :meth:`~OPADouble.fail_next`,
:meth:`~OPADouble.restart_empty` (a restarted OPA: connections cut, every policy gone),
:meth:`~OPADouble.refuse` / :meth:`~OPADouble.accept` (the port refuses connections in
between); every request is recorded in :attr:`OPADouble.requests`.

Where the double is weaker than OPA: it compiles with regopy, which accepts some Rego that
OPA rejects (unsafe variables, conflicting rules, missing ``if``); only parse errors are
found, and, as OPA's type check does, a call to a function no module of the package defines
(so a module that calls a function of a module not yet pushed is refused, as by OPA). It
refuses ``with`` (regopy can crash on it; OPA accepts it). The
``ast`` of a policy holds only its package path. A real OPA is the authority
(``shared/REGO_PORTABILITY.md``): :func:`real_opa` starts one when an ``opa`` binary is on
PATH, or uses ``OPA_URL``, and the equivalence suite runs against it too.

Run alone (the benchmark does): ``python -m tests.doubles.opa_server --port 8181``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import regopy
from aiohttp import web

from identityd.errors import PolicyCompileError
from identityd.policy.sources import refuse_with

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JSON = dict[str, Any]

# OPA's error codes and messages (server/types/types.go).
CODE_INTERNAL = "internal_error"
CODE_INVALID_PARAMETER = "invalid_parameter"
CODE_INVALID_OPERATION = "invalid_operation"
CODE_NOT_FOUND = "resource_not_found"
MSG_COMPILE_MODULE = "error(s) occurred while compiling module(s)"
MSG_EVALUATION = "error(s) occurred while evaluating query"

_BINDING = "x"
# regopy's error dump: `(error <n>:<file>|<offset>|<length>` then `(errormsg <n>:<text>)`.
_REGO_ERROR = re.compile(
    r"\(error \d+:(?P<file>[^|\s]*)\|(?P<pos>\d+)\|\d+\s*\(errormsg \d+:(?P<msg>[^)\n]*)\)"
)
_PACKAGE = re.compile(r"^\s*package\s+([A-Za-z_][\w.]*)", re.MULTILINE)
# For the undefined-function check: comments and string literals blanked out first.
_COMMENT_OR_STRING = re.compile(r'#[^\n]*|"(?:[^"\\\n]|\\.)*"|`[^`]*`')
_CALL = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\(")
_HEAD = re.compile(r"^(?:default\s+)?([A-Za-z_]\w*)\(", re.MULTILINE)
_KEYWORDS = frozenset({"if", "not", "some", "every", "in", "contains", "else", "default", "with",
                       "as", "package", "import", "true", "false", "null"})
# Where the middleware leaves the time the request's first bytes were read.
_RECEIVED = web.RequestKey("double.received_ns", int)


@dataclass(frozen=True, slots=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    status: int
    body: bytes
    eval_ns: int = 0  # time inside regopy (input and query) for a data request, else 0
    handler_ns: int = 0  # from the request being received to the response being ready


@dataclass
class _Failure:
    remaining: int
    status: int
    method: str | None
    path: str | None
    code: str | None = None


@dataclass
class _Compiled:
    """One interpreter over the whole policy set; query bundles built per data path."""

    interpreter: Any
    bundles: dict[str, Any] = field(default_factory=dict)
    input_set: bool = False  # regopy cannot unset input once set


class RegoRejected(Exception):
    """The set does not compile; ``errors`` are OPA-shaped error objects."""

    def __init__(self, errors: list[JSON]) -> None:
        super().__init__(errors[0]["message"] if errors else "does not compile")
        self.errors = errors


def error_body(code: str, message: str, errors: list[JSON] | None = None) -> JSON:
    body: JSON = {"code": code, "message": message}
    if errors:
        body["errors"] = errors
    return body


class OPADouble:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: list[Recorded] = []
        self._host, self._port = host, port
        self._policies: dict[str, str] = {}
        self._compiled = compile_set({})
        self._delay = 0.0
        self._failures: list[_Failure] = []
        self._runner: web.AppRunner | None = None
        self._site: _Site | None = None
        # When each connection's pending request was first read off the socket.
        self._received: dict[web.RequestHandler, int] = {}
        self._cpu_mark = time.process_time()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=16 * 1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/policies", self._list_policies)
        app.router.add_get("/v1/policies/{id:.+}", self._get_policy)
        app.router.add_put("/v1/policies/{id:.+}", self._put_policy)
        app.router.add_delete("/v1/policies/{id:.+}", self._delete_policy)
        for route in ("/v1/data", "/v1/data/{path:.*}"):
            app.router.add_post(route, self._data)
            app.router.add_get(route, self._data)
        app.router.add_get("/_double/stats", self._stats)
        app.router.add_post("/_double/reset", self._reset)
        # A short shutdown: a delayed handler must not hold up refuse() or close().
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=0.1)
        await self._runner.setup()
        await self._listen()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _listen(self) -> None:
        if self._runner is None:
            raise RuntimeError("the double is not started")
        self._site = _Site(self._runner, self._host, self._port, self._received)
        await self._site.start()
        self._port = self._site.port  # the port, when 0 was asked for

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def policies(self) -> dict[str, str]:
        """A copy of ``{id: raw}`` as held now."""
        return dict(self._policies)

    # -- test controls ------------------------------------------------------------------------

    def set_delay(self, seconds: float) -> None:
        """Hold every request (but ``/_double/``) this long before answering; 0 to stop."""
        self._delay = seconds

    def fail_next(
        self, count: int = 1, status: int = 500, *, method: str | None = None,
        path: str | None = None, code: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests (matching ``method`` and starting with ``path``,
        when given) with ``status`` and an OPA error body (its ``code``: by default OPA's
        for the status, internal_error or invalid_parameter)."""
        self._failures.append(_Failure(count, status, method, path, code))

    async def refuse(self) -> None:
        """Down: open connections are cut and new ones refused until :meth:`accept`."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if self._runner is not None and self._runner.server is not None:
            for connection in self._runner.server.connections:
                connection.force_close()
        await asyncio.sleep(0)  # let the transports close

    async def accept(self) -> None:
        """Listen again on the same port."""
        if self._site is None:
            await self._listen()

    async def restart_empty(self) -> None:
        """As OPA restarted (or OOM-killed and restarted): connections cut, no policies."""
        await self.refuse()
        self._policies.clear()
        self._compiled = compile_set({})
        await self.accept()

    def put_policy(self, policy_id: str, raw: str) -> None:
        """Install a module directly (as another client would); raises RegoRejected."""
        candidate = {**self._policies, policy_id: raw}
        self._compiled = compile_set(candidate)
        self._policies = candidate

    def data_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith("/v1/data")]

    # -- middleware ---------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        entered = time.perf_counter_ns()
        try:
            body = await request.read()
        finally:
            # The handler timer starts when the request's first bytes were read. Taken
            # after the body, whose later segments must not stamp the next request.
            received = request[_RECEIVED] = self._received.pop(request.protocol, entered)
        if request.path.startswith("/_double/"):
            return await handler(request)
        if self._delay:
            await asyncio.sleep(self._delay)
        failure = self._take_failure(request)
        if failure is not None:
            code = failure.code or (
                CODE_INTERNAL if failure.status >= 500 else CODE_INVALID_PARAMETER)
            response: web.StreamResponse = _json(
                error_body(code, f"injected failure {failure.status} (test double)"),
                failure.status)
        else:
            try:
                response = await handler(request)
            except web.HTTPNotFound:
                response = _json(error_body(CODE_NOT_FOUND, "page not found"), 404)
            except web.HTTPMethodNotAllowed:
                response = web.Response(status=405)
        eval_ns = int(response.headers.pop("X-Double-Eval-Ns", "0"))
        self.requests.append(Recorded(
            request.method, request.path, dict(request.query), response.status, body,
            eval_ns=eval_ns, handler_ns=time.perf_counter_ns() - received,
        ))
        return response

    def _take_failure(self, request: web.Request) -> _Failure | None:
        for failure in self._failures:
            if failure.method is not None and failure.method != request.method:
                continue
            if failure.path is not None and not request.path.startswith(failure.path):
                continue
            failure.remaining -= 1
            if failure.remaining <= 0:
                self._failures.remove(failure)
            return failure
        return None

    # -- handlers -----------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return _json({}, 200, request)

    async def _list_policies(self, request: web.Request) -> web.StreamResponse:
        result = [_policy(pid, raw) for pid, raw in sorted(self._policies.items())]
        return _json({"result": result}, 200, request)

    async def _get_policy(self, request: web.Request) -> web.StreamResponse:
        policy_id = request.match_info["id"]
        raw = self._policies.get(policy_id)
        if raw is None:
            return _not_found(policy_id)
        return _json({"result": _policy(policy_id, raw)}, 200, request)

    async def _put_policy(self, request: web.Request) -> web.StreamResponse:
        policy_id = request.match_info["id"]
        try:
            raw = (await request.read()).decode("utf-8")
        except UnicodeDecodeError:
            return _json(error_body(CODE_INVALID_PARAMETER, "policy is not UTF-8"), 400)
        if not _COMMENT_OR_STRING.sub("", raw).strip():
            return _json(error_body(CODE_INVALID_PARAMETER, "empty module"), 400, request)
        started = time.perf_counter_ns()
        try:
            self.put_policy(policy_id, raw)
        except RegoRejected as exc:
            return _json(error_body(CODE_INVALID_PARAMETER, MSG_COMPILE_MODULE, exc.errors), 400,
                         request)
        body: JSON = {}
        if _flag(request, "metrics"):
            body["metrics"] = {"timer_rego_module_compile_ns": time.perf_counter_ns() - started}
        return _json(body, 200, request)

    async def _delete_policy(self, request: web.Request) -> web.StreamResponse:
        policy_id = request.match_info["id"]
        if policy_id not in self._policies:
            return _not_found(policy_id)
        remaining = {k: v for k, v in self._policies.items() if k != policy_id}
        try:
            self._compiled = compile_set(remaining)
        except RegoRejected as exc:  # what is left would not compile: OPA's code for it
            return _json(error_body(CODE_INVALID_OPERATION, MSG_COMPILE_MODULE, exc.errors), 400,
                         request)
        self._policies = remaining
        return _json({}, 200, request)

    async def _data(self, request: web.Request) -> web.StreamResponse:
        path = [s for s in request.match_info.get("path", "").split("/") if s]
        timers = _Timers()
        input_text: str | None = None
        if request.method == "POST":
            started = time.perf_counter_ns()
            raw = await request.read()
            if raw.strip():
                try:
                    document = json.loads(raw)
                except ValueError as exc:
                    return _json(error_body(
                        CODE_INVALID_PARAMETER, f"body contains malformed input document: {exc}"
                    ), 400, request)
                if not isinstance(document, dict):
                    return _json(error_body(CODE_INVALID_PARAMETER,
                                            "body must be a JSON object"), 400, request)
                if "input" in document:
                    input_text = json.dumps(document["input"], separators=(",", ":"))
            timers.input_parse_ns = time.perf_counter_ns() - started
        elif "input" in request.query:
            input_text = request.query["input"]
        try:
            strict = _flag(request, "strict-builtin-errors")
            found, value = self._evaluate(path, input_text, timers, strict=strict)
        except RegoRejected as exc:
            return _json(error_body(CODE_INTERNAL, MSG_EVALUATION, exc.errors), 500, request)
        body: JSON = {"result": value} if found else {}
        if _flag(request, "metrics"):
            body["metrics"] = timers.as_metrics(time.perf_counter_ns() - request[_RECEIVED])
        response = _json(body, 200, request)
        # Taken off by the middleware: the time inside regopy, for /_double/stats.
        response.headers["X-Double-Eval-Ns"] = str(timers.regopy_ns)
        return response

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        data = self.data_requests()
        return _json({"eval_ns": [r.eval_ns for r in data],
                      "handler_ns": [r.handler_ns for r in data],
                      "cpu_seconds": time.process_time() - self._cpu_mark}, 200, request)

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        self.requests.clear()
        self._cpu_mark = time.process_time()
        return _json({}, 200, request)

    # -- evaluation ---------------------------------------------------------------------------

    def _evaluate(
        self, path: list[str], input_text: str | None, timers: _Timers, *, strict: bool = False
    ) -> tuple[bool, object]:
        compiled = self._compiled
        # OPA's default leaves a builtin's failing expression undefined; with
        # strict-builtin-errors the query fails (500). regopy does either.
        compiled.interpreter.strict_built_in_errors = strict
        if input_text is None and compiled.input_set:
            # Evaluate with input undefined, as OPA does: a fresh interpreter has none.
            compiled = self._compiled = compile_set(self._policies)
        key = "/".join(path)
        bundle = compiled.bundles.get(key)
        timers.cache_hit = bundle is not None
        if bundle is None:
            started = time.perf_counter_ns()
            query = f"{_BINDING} = data" + "".join(f"[{json.dumps(s)}]" for s in path)
            try:
                bundle = compiled.bundles[key] = compiled.interpreter.build(query)
            except regopy.RegoError as exc:
                raise RegoRejected(_rego_errors(str(exc), {}, "rego_compile_error")) from None
            timers.query_compile_ns = time.perf_counter_ns() - started
        if input_text is not None:
            started = time.perf_counter_ns()
            compiled.interpreter.set_input_term(input_text)
            compiled.input_set = True
            timers.input_set_ns = time.perf_counter_ns() - started
            timers.input_parse_ns += timers.input_set_ns
        started = time.perf_counter_ns()
        try:
            output = compiled.interpreter.query_bundle(bundle)
            ok, raw = output.ok(), str(output).strip()
        except Exception as exc:  # regopy raises ValueError for error values in its JSON
            raise RegoRejected([{"code": "eval_internal_error",
                                 "message": type(exc).__name__}]) from None
        if not ok or raw == "<error>":
            # regopy does not say which: a conflict, or a builtin's error when strict.
            code = "eval_builtin_error" if strict else "eval_conflict_error"
            raise RegoRejected([{"code": code, "message": raw}])
        found, value = _binding(raw)
        timers.query_eval_ns = time.perf_counter_ns() - started
        return found, value


def _binding(raw: str) -> tuple[bool, object]:
    """(defined, value) of the query's binding in regopy's output text."""
    if raw == "undefined":
        return False, None
    result = json.loads(raw)
    if isinstance(result, list):
        result = result[0] if len(result) == 1 else None
    bindings = result.get("bindings") if isinstance(result, dict) else None
    if not isinstance(bindings, dict) or _BINDING not in bindings:
        return False, None
    return True, bindings[_BINDING]


@dataclass
class _Timers:
    """One data request's timings, reported as OPA's ``metrics`` (``?metrics=true``)."""

    input_parse_ns: int = 0  # body decoding + regopy's set_input_term
    input_set_ns: int = 0  # regopy's part of it
    query_compile_ns: int | None = None  # None: the query was cached
    query_eval_ns: int = 0
    cache_hit: bool = False

    @property
    def regopy_ns(self) -> int:
        return self.input_set_ns + self.query_eval_ns

    def as_metrics(self, handler_ns: int) -> JSON:
        metrics: JSON = {"counter_server_query_cache_hit": int(self.cache_hit)}
        if self.input_parse_ns:
            metrics["timer_rego_input_parse_ns"] = self.input_parse_ns
        if self.query_compile_ns is not None:
            metrics["timer_rego_query_compile_ns"] = self.query_compile_ns
        metrics["timer_rego_query_eval_ns"] = self.query_eval_ns
        metrics["timer_server_handler_ns"] = handler_ns
        return metrics


# -- listening ---------------------------------------------------------------------------------


class _Site(web.BaseSite):
    """A TCP site whose connections note when each request's first bytes arrive: OPA's
    handler timer starts at its handler's entry, after Go's HTTP server read the head;
    the double's own HTTP server (aiohttp parsing the request, building it) is slower,
    and is counted as the double's handling, not as the client's."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 received: dict[web.RequestHandler, int]) -> None:
        super().__init__(runner)
        self._host, self._port, self._received = host, port, received

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")
        received = self._received
        listening = await asyncio.get_running_loop().create_server(
            lambda: _Stamping(server(), received), self._host, self._port, reuse_address=True
        )
        self._server = listening
        self._port = listening.sockets[0].getsockname()[1]


class _Stamping(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind a note of when a request's first
    bytes were read (the first data after the previous request's note was taken)."""

    def __init__(self, inner: web.RequestHandler, received: dict[web.RequestHandler, int]):
        self._inner, self._received = inner, received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._received.setdefault(self._inner, time.perf_counter_ns())
        self._inner.data_received(data)

    def eof_received(self) -> None:  # aiohttp's returns None: the transport closes
        self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._received.pop(self._inner, None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


# -- compiling ---------------------------------------------------------------------------------


def compile_set(modules: Mapping[str, str]) -> _Compiled:
    """A fresh interpreter over ``modules``; RegoRejected with OPA-shaped errors if it fails."""
    for policy_id, raw in modules.items():
        try:
            refuse_with(policy_id, raw)
        except PolicyCompileError as exc:
            line = re.search(r"line (\d+)", exc.detail)
            raise RegoRejected([{
                "code": "rego_compile_error",
                "message": "'with' is refused by the test double (regopy can crash on it)",
                "location": {"file": policy_id, "row": int(line.group(1)) if line else 1,
                             "col": 1},
            }]) from None
    interpreter = regopy.Interpreter()
    interpreter.log_level = regopy.LogLevel.NONE
    for policy_id, raw in modules.items():
        try:
            interpreter.add_module(policy_id, raw)
        except regopy.RegoError as exc:
            raise RegoRejected(_rego_errors(str(exc), modules, "rego_parse_error")) from None
    try:
        interpreter.build(f"{_BINDING} = data")
    except regopy.RegoError as exc:
        raise RegoRejected(_rego_errors(str(exc), modules, "rego_compile_error")) from None
    undefined = _undefined_functions(modules, interpreter.is_builtin)
    if undefined:
        raise RegoRejected(undefined)
    return _Compiled(interpreter)


def _undefined_functions(
    modules: Mapping[str, str], is_builtin: Callable[[str], bool]
) -> list[JSON]:
    """OPA's type check refuses a call to a function that no module of the package
    defines (so a module that calls another module's function cannot go in first);
    regopy accepts it. Plain calls only (not ``data.x.f(..)`` or an import's
    ``alias.f(..)``), and a head is a name at the start of a line."""
    defined: dict[str, set[str]] = {}
    texts: dict[str, tuple[str, str]] = {}
    for policy_id, raw in modules.items():
        declared = _PACKAGE.search(raw)
        if declared is None:
            continue
        text = _COMMENT_OR_STRING.sub(lambda m: " " * len(m.group(0)), raw)
        texts[policy_id] = (declared.group(1), text)
        defined.setdefault(declared.group(1), set()).update(_HEAD.findall(text))
    errors: list[JSON] = []
    for policy_id, (package, text) in texts.items():
        for call in _CALL.finditer(text):
            name, start = call.group(1), call.start(1)
            line_start = text.rfind("\n", 0, start) + 1
            if start == line_start or name in _KEYWORDS or name in defined[package]:
                continue
            if is_builtin(name):
                continue
            errors.append({
                "code": "rego_type_error",
                "message": f"undefined function data.{package}.{name}",
                "location": {"file": policy_id, "row": text.count("\n", 0, start) + 1,
                             "col": start - line_start + 1},
            })
    return errors


def _rego_errors(text: str, modules: Mapping[str, str], code: str) -> list[JSON]:
    """regopy's error dump as OPA error objects, with row/col from the byte offset."""
    errors: list[JSON] = []
    for match in _REGO_ERROR.finditer(text):
        error: JSON = {"code": code, "message": match.group("msg").strip()}
        file, pos = match.group("file"), int(match.group("pos"))
        source = modules.get(file)
        if source is not None:
            prefix = source.encode("utf-8")[:pos].decode("utf-8", "replace")
            row = prefix.count("\n") + 1
            col = len(prefix) - (prefix.rfind("\n") + 1) + 1
            error["location"] = {"file": file, "row": row, "col": col}
        errors.append(error)
    # OPA lists each problem once; regopy may report one at both ends of a span.
    unique = {json.dumps(e, sort_keys=True): e for e in errors}
    return list(unique.values()) or [{"code": code, "message": text.strip()[:500]}]


def _policy(policy_id: str, raw: str) -> JSON:
    package = _PACKAGE.search(raw)
    path = [{"type": "var", "value": "data"}] + [
        {"type": "string", "value": part} for part in (package.group(1).split(".")
                                                        if package else [])
    ]
    return {"id": policy_id, "raw": raw, "ast": {"package": {"path": path}}}


def _not_found(policy_id: str) -> web.Response:
    return _json(error_body(CODE_NOT_FOUND,
                            f'storage_not_found_error: policy id "{policy_id}"'), 404)


def _flag(request: web.Request, name: str) -> bool:
    # OPA's getBoolParam: present and empty, or "true" in any case; "1" is false.
    value = request.query.get(name)
    return value is not None and value.lower() in ("", "true")


def _json(body: JSON, status: int, request: web.Request | None = None) -> web.Response:
    pretty = request is not None and _flag(request, "pretty")
    text = json.dumps(body, indent=2 if pretty else None) + "\n"
    return web.Response(text=text, status=status, content_type="application/json")


# -- a real OPA, when one is available ----------------------------------------------------------


def real_opa_unavailable_reason() -> str | None:
    """None when :func:`real_opa` can give a real OPA; otherwise why not."""
    if os.environ.get("OPA_URL") or shutil.which("opa"):
        return None
    return "no real OPA: no `opa` binary on PATH and OPA_URL is not set"


@contextlib.asynccontextmanager
async def real_opa(*, start_within: float = 15.0) -> AsyncIterator[str]:
    """The URL of a real OPA: ``OPA_URL`` as given, or ``opa run --server`` started here on
    a free loopback port (stopped on exit). Check :func:`real_opa_unavailable_reason` first."""
    url = os.environ.get("OPA_URL")
    if url:
        yield url.rstrip("/")
        return
    binary = shutil.which("opa")
    if binary is None:
        raise RuntimeError("no `opa` binary on PATH and OPA_URL is not set")
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        binary, "run", "--server", "--addr", f"127.0.0.1:{port}", "--log-level", "error",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_within
        while not await asyncio.to_thread(_healthy, url):
            if process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`opa run --server` did not answer on {url}")
            await asyncio.sleep(0.05)
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- standalone ---------------------------------------------------------------------------------


async def _serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with OPADouble(host=host, port=port) as opa:
        print(f"listening on {opa.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OPA REST double (tests and benchmarks only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8181)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main(sys.argv[1:])
