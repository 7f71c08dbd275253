"""The OPA sidecar engine: policies pushed to, and decisions asked of, an OPA server.

Talks OPA's REST API through opa-python-client's async client (one client, one
aiohttp connection pool, no retries: a decision has one bounded attempt):

- ``load``: the modules of each package go to OPA as one policy,
  ``PUT /v1/policies/{prefix}package/{package}`` (identityd.policy.merge: OPA compiles
  each PUT against what it holds, so modules that use each other's rules cannot go
  one by one); our policies (those under ``prefix``) no longer in the set are
  deleted. When OPA rejects a change (HTTP 400), the previous set is pushed back and
  PolicyCompileError carries OPA's message, located in the module it came from.
  While a set is being pushed, decisions wait (bounded by their timeout) so that
  none is taken on a half-pushed set.
- ``evaluate``: ``POST /v1/data/identityd/decision?strict-builtin-errors=true`` with
  ``{"input": ...}``, on the client's session.
- A background check (every ``check_interval``) lists ``GET /v1/policies``: when OPA
  no longer holds our modules with identical text (restart, OOM kill, someone
  else's write) the engine is not ready, decisions fail closed with
  POLICY_NOT_LOADED, and the last good set is pushed again. An undefined decision
  triggers the same check at once.

Gaps in opa-python-client, and what is done instead: it lists policies without
their ``raw`` text (the list is read through the client's own session); its
retries and backoff are switched off (``retries=0``); its timeout is per session,
so each call here is bounded by ``asyncio.timeout``.

Decisions are posted on the client's session too rather than through its
``query_rule``, which encodes the input a second time after the JSON check here,
parses the URL on every call and raises on a non-200 status before OPA's error
code can be read: the body encoded once, to a URL parsed once, costs ~0.04 ms of
CPU less per decision (docs/policy-engines.md), and the hop is what the sidecar
costs on every decision.

``on_metrics`` is for benchmarks: decisions are then asked with ``?metrics=true`` and
OPA's ``metrics`` member of each answer (its timers, e.g. ``timer_server_handler_ns``)
is handed to it, in the task that evaluates. Production never sets it: OPA would time
every decision and the answers would grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yarl
from opa_client import AsyncOpaClient
from opa_client.errors import DeletePolicyError, RegoParseError

from identityd.errors import PolicyCompileError, PolicyUnavailable
from identityd.policy.base import DECISION_PATH, Decision, decision_from_document, input_json
from identityd.policy.merge import MergedPackage, merge_by_package
from identityd.settings import DEFAULT_DECISION_TIMEOUT_SECONDS

__all__ = [
    "DEFAULT_ADMIN_TIMEOUT_SECONDS",
    "DEFAULT_CHECK_INTERVAL_SECONDS",
    "DEFAULT_ID_PREFIX",
    "OPAEngine",
]

log = logging.getLogger(__name__)

# How often to check that OPA still holds our policies. After an OPA restart,
# decisions fail closed for at most about this long before the set is re-pushed
# (sooner when a decision comes back undefined).
DEFAULT_CHECK_INTERVAL_SECONDS = 2.0
# One policy-management request (list, put, delete). OPA compiles a module in
# milliseconds; an OPA that needs seconds is in trouble and is reported so.
DEFAULT_ADMIN_TIMEOUT_SECONDS = 5.0
# Policy ids are ours to manage only under this prefix; other modules in the
# same OPA (another tool's) are left alone.
DEFAULT_ID_PREFIX = "identityd/"

# Characters that survive a URL path unchanged; a module id with others is refused
# rather than risk OPA storing it under a different id than we compare against.
_MODULE_ID = re.compile(r"^[A-Za-z0-9._~@+=,-]+(?:/[A-Za-z0-9._~@+=,-]+)*$")


# OPA's codes for a change it refuses (HTTP 400): a module that does not compile
# (PUT), or a deletion that would leave the others uncompilable (DELETE).
_REFUSALS = frozenset({"invalid_parameter", "invalid_operation"})
_ERROR_CODE = re.compile(r"^[a-z_]{1,40}$")
_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class _Rejection:
    """OPA refused a change to one of our modules (HTTP 400)."""

    module_id: str
    message: str


@dataclass(frozen=True, slots=True)
class _PolicySet:
    """A policy set and the policies it goes to OPA as (one per package)."""

    modules: dict[str, str]
    packages: dict[str, MergedPackage]

    @property
    def pushed(self) -> dict[str, str]:
        return {policy_id: package.source for policy_id, package in self.packages.items()}

    @classmethod
    def of(cls, modules: dict[str, str]) -> _PolicySet:
        return cls(modules, merge_by_package(modules))


_EMPTY = _PolicySet({}, {})


class OPAEngine:
    """PolicyEngine on an OPA server; see identityd.policy.base for the contract."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_DECISION_TIMEOUT_SECONDS,
        check_interval: float = DEFAULT_CHECK_INTERVAL_SECONDS,
        admin_timeout: float = DEFAULT_ADMIN_TIMEOUT_SECONDS,
        id_prefix: str = DEFAULT_ID_PREFIX,
        on_metrics: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self._host, self._port, self._https = _parse_url(url)
        self._root = f"{'https' if self._https else 'http'}://{self._host}:{self._port}"
        self._timeout = _positive("timeout", timeout)
        self._check_interval = _positive("check_interval", check_interval)
        self._admin_timeout = _positive("admin_timeout", admin_timeout)
        if not isinstance(id_prefix, str) or not _MODULE_ID.match(id_prefix.rstrip("/")):
            # Never empty: everything under the prefix is ours to delete.
            raise ValueError(f"id_prefix: not usable in a policy id: {id_prefix!r}")
        self._prefix = id_prefix
        self._on_metrics = on_metrics
        # A builtin's error fails the decision (500) as in the embedded engine, rather
        # than OPA's default of leaving the expression undefined: fail closed alike.
        query = "strict-builtin-errors=true" + ("&metrics=true" if on_metrics else "")
        self._decision_url = yarl.URL(f"{self._root}/v1/data/{DECISION_PATH}?{query}")

        self._started = False
        self._stack: AsyncExitStack | None = None
        self._client: Any = None  # opa_client.AsyncOpaClient (untyped library)
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one push or repair at a time
        self._gate = asyncio.Event()  # clear while a set is being pushed
        self._gate.set()
        self._idle = asyncio.Event()  # set when no decision is in flight
        self._idle.set()
        self._in_flight = 0
        self._wake = asyncio.Event()  # run the check now

        self._good: _PolicySet | None = None  # the last set OPA accepted whole
        self._in_sync = False  # OPA was last seen holding exactly the good set
        self._answering = False  # OPA's last answer came back
        self._closed = False
        self.repushes = 0  # times the good set had to be pushed again

    # --- PolicyEngine --------------------------------------------------------

    @property
    def ready(self) -> bool:
        """A good set is pushed, OPA was last seen holding it, and OPA answers."""
        return not self._closed and self._good is not None and self._in_sync and self._answering

    @property
    def module_ids(self) -> tuple[str, ...]:
        """Ids of the modules in force (empty before the first load)."""
        return tuple(self._good.modules) if self._good is not None else ()

    async def load(self, modules: Mapping[str, str]) -> None:
        """Push ``modules`` as the whole set. PolicyCompileError (OPA's message) if OPA
        rejects one: the previous set is pushed back. PolicyUnavailable if OPA cannot
        be reached: the previous set stays the good one, restored by the check."""
        target = _PolicySet.of(_validate_modules(modules))
        if self._closed:
            raise PolicyCompileError("the engine is closed")
        await self.start()
        async with self._lock, self._exclusive():
            try:
                rejections = await self._converge(target)
                if rejections:
                    await self._roll_back()
                    raise PolicyCompileError(rejections[0].message, module=rejections[0].module_id)
            except PolicyUnavailable:
                # What OPA holds is unknown: no decisions until the check has seen it.
                self._in_sync = False
                self._wake.set()
                raise
            self._good = target
            self._in_sync = self._answering = True
        log.info(
            "policy set of %d modules pushed to OPA at %s as %d policies",
            len(target.modules),
            self._root,
            len(target.packages),
        )

    async def evaluate(self, input_doc: Mapping[str, Any]) -> Decision:
        body = _input_body(input_doc)
        try:
            async with asyncio.timeout(self._timeout):
                # Re-check after waking: a push may have closed the gate again since.
                while not self._gate.is_set():
                    await self._gate.wait()
                if self._closed or self._good is None or not self._in_sync:
                    raise PolicyUnavailable(
                        "POLICY_NOT_LOADED", "OPA does not hold the policy set (yet)"
                    )
                self._in_flight += 1
                self._idle.clear()
                try:
                    response = await self._query(body)
                    if "result" not in response:
                        await self._undefined()
                finally:
                    self._in_flight -= 1
                    if self._in_flight == 0:
                        self._idle.set()
        except TimeoutError:
            raise PolicyUnavailable(
                "POLICY_TIMEOUT", f"no decision from OPA within {self._timeout:g} s"
            ) from None
        result = response["result"]
        if result is None:
            raise PolicyUnavailable("POLICY_BAD_DECISION", "the decision is null")
        return decision_from_document(result)

    async def aclose(self) -> None:
        """Stop checking and close the connection pool; OPA keeps the policies (a
        restarted identityd finds them in place)."""
        if self._closed:
            return
        self._closed = True
        self._gate.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = self._client = None

    async def __aenter__(self) -> OPAEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- lifecycle and the check -------------------------------------------

    async def start(self) -> None:
        """Open the connection pool and start the background check (idempotent)."""
        if self._started or self._closed:
            return
        self._started = True
        stack = AsyncExitStack()
        self._client = await stack.enter_async_context(
            AsyncOpaClient(
                host=self._host,
                port=self._port,
                ssl=self._https,
                retries=0,
                timeout=max(self._timeout, self._admin_timeout),
            )
        )
        self._stack = stack
        self._task = asyncio.create_task(self._check_loop(), name="identityd-opa-check")

    async def check(self) -> bool:
        """One step of the background check: list OPA's policies and, if ours are
        missing or changed, push the good set again. True when OPA holds it."""
        if self._good is None or self._closed:
            return False
        await self.start()
        async with self._lock:
            good = self._good
            if good is None:
                return False
            try:
                held = await self._list_ours()
            except PolicyUnavailable as exc:
                self._answering = False
                log.warning("OPA at %s does not answer: %s", self._root, exc)
                return False
            self._answering = True
            if held == good.pushed:
                self._in_sync = True
                return True
            self._in_sync = False
            missing = sum(1 for m in good.packages if m not in held)
            log.warning(
                "OPA lost or changed identityd's policies (%d of %d missing); pushing them again",
                missing,
                len(good.packages),
            )
            self.repushes += 1
            try:
                async with self._exclusive():
                    rejections = await self._converge(good)
            except PolicyUnavailable as exc:
                log.warning("re-pushing the policies to OPA failed: %s", exc)
                return False
            if rejections:
                log.error(
                    "OPA no longer accepts the policy set: %s: %s",
                    rejections[0].module_id,
                    rejections[0].message,
                )
                return False
            self._in_sync = True
            log.info("policy set restored in OPA")
            return True

    async def _check_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._check_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.check()
            except PolicyUnavailable as exc:  # logged; the next round tries again
                log.warning("policy check failed: %s", exc)

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """Hold new decisions and wait out those in flight (each bounded by its timeout)."""
        self._gate.clear()
        try:
            await self._idle.wait()
            yield
        finally:
            self._gate.set()

    async def _undefined(self) -> None:
        """An undefined decision: OPA lost our policies, or the policy leaves it undefined."""
        try:
            held = await self._list_ours()
        except PolicyUnavailable:
            held = None
        if self._good is None or held != self._good.pushed:
            self._in_sync = False
            self._wake.set()
            raise PolicyUnavailable(
                "POLICY_NOT_LOADED", "OPA does not hold the policy set; pushing it again"
            )
        raise PolicyUnavailable("POLICY_UNDEFINED", "the decision is undefined")

    async def _roll_back(self) -> None:
        """Push the previous good set (or none) back after OPA refused part of a new one."""
        rejections = await self._converge(self._good or _EMPTY)
        if rejections:
            self._in_sync = False
            self._wake.set()
            log.error(
                "OPA refused the previous policy set back: %s: %s",
                rejections[0].module_id,
                rejections[0].message,
            )

    # --- OPA calls -----------------------------------------------------------

    async def _converge(self, target: _PolicySet) -> list[_Rejection]:
        """Make OPA hold exactly ``target`` under our prefix; OPA's rejections that
        remain. OPA compiles everything it holds on each change, so a change that only
        compiles after another (a package using a new package's rule, a package that
        moved) is retried in passes. Deletions go first: a policy left from an older
        layout may define the very rules a new one redefines."""
        held = await self._list_ours()
        wanted = target.pushed
        puts = {p: source for p, source in wanted.items() if held.get(p) != source}
        deletes = [p for p in held if p not in wanted]
        rejections: dict[str, _Rejection] = {}
        progress = True
        while (puts or deletes) and progress:
            progress = False
            for policy_id in list(deletes):
                rejection = await self._delete(policy_id)
                if rejection is None:
                    deletes.remove(policy_id)
                    rejections.pop(policy_id, None)
                    progress = True
                else:
                    rejections[policy_id] = rejection
            for policy_id, source in list(puts.items()):
                rejection = await self._put(policy_id, source, target.packages[policy_id])
                if rejection is None:
                    del puts[policy_id]
                    rejections.pop(policy_id, None)
                    progress = True
                else:
                    rejections[policy_id] = rejection
        return [rejections[p] for p in (*deletes, *puts)]

    async def _list_ours(self) -> dict[str, str]:
        """``{module_id: raw}`` of the modules OPA holds under our prefix."""
        session = self._session()
        async with (
            _translated("GET /v1/policies", self._admin_timeout),
            session.get(f"{self._root}/v1/policies", allow_redirects=False) as response,
        ):
            response.raise_for_status()
            body = await response.json()
        result = body.get("result") if isinstance(body, dict) else None
        if not isinstance(result, list):
            raise PolicyUnavailable("POLICY_ENGINE_ERROR", "GET /v1/policies: no result list")
        held: dict[str, str] = {}
        for policy in result:
            if not isinstance(policy, dict):
                continue
            policy_id, raw = policy.get("id"), policy.get("raw")
            if isinstance(policy_id, str) and policy_id.startswith(self._prefix):
                held[policy_id[len(self._prefix) :]] = raw if isinstance(raw, str) else ""
        return held

    async def _put(
        self, policy_id: str, source: str, package: MergedPackage
    ) -> _Rejection | None:
        try:
            async with _translated(f"PUT policy {policy_id}", self._admin_timeout):
                await self._client.update_policy_from_string(
                    source, self._prefix + policy_id, rego_compat=False
                )
        except RegoParseError as exc:  # any non-200 answer with an OPA error body
            if exc.expression not in _REFUSALS:
                raise PolicyUnavailable(
                    "POLICY_ENGINE_ERROR", f"PUT policy {policy_id}: {exc.expression}"
                ) from None
            module_id, message = _describe(exc.message, exc.errors, self._prefix, package)
            return _Rejection(module_id, message)
        return None

    async def _delete(self, policy_id: str) -> _Rejection | None:
        try:
            async with _translated(f"DELETE policy {policy_id}", self._admin_timeout):
                await self._client.delete_policy(self._prefix + policy_id)
        except DeletePolicyError as exc:
            if exc.expression == "resource_not_found":
                return None  # already gone: the goal
            if exc.expression not in _REFUSALS:
                raise PolicyUnavailable(
                    "POLICY_ENGINE_ERROR", f"DELETE policy {policy_id}: {exc.expression}"
                ) from None
            # OPA refuses to delete a policy others depend on (invalid_operation).
            return _Rejection(policy_id, f"cannot be removed: {exc.message}")
        return None

    async def _query(self, body: bytes) -> dict[str, Any]:
        # The decision goes through the client's session (its one connection pool)
        # rather than its query_rule, which would encode the input a second time
        # and parse the URL per call: ~0.04 ms of a ~0.4 ms hop (bench/opa_hop.py).
        # No second timeout here: evaluate bounds the whole decision.
        try:
            session = self._session()
            async with session.post(
                self._decision_url, data=body, headers=_JSON, allow_redirects=False
            ) as response:
                raw = await response.read()
                if response.status != 200:
                    raise PolicyUnavailable(
                        "POLICY_ENGINE_ERROR",
                        f"POST /v1/data: HTTP {response.status}{_error_code(raw)}",
                    )
            answer = json.loads(raw)
        except PolicyUnavailable:
            raise
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            unavailable = _unavailable("POST /v1/data", exc)
            if unavailable.code == "POLICY_UNAVAILABLE":
                self._answering = False
                self._wake.set()
            raise unavailable from None
        self._answering = True
        if not isinstance(answer, dict):
            raise PolicyUnavailable("POLICY_ENGINE_ERROR", "OPA's answer is not an object")
        if self._on_metrics is not None:
            metrics = answer.get("metrics")
            self._on_metrics(metrics if isinstance(metrics, dict) else {})
        return answer

    def _session(self) -> aiohttp.ClientSession:
        session = getattr(self._client, "_session", None)
        if not isinstance(session, aiohttp.ClientSession):
            raise PolicyUnavailable("POLICY_NOT_LOADED", "the OPA client is not open")
        return session


# --- the edge: foreign errors in, PolicyUnavailable out ---------------------------------


@contextlib.asynccontextmanager
async def _translated(what: str, seconds: float | None) -> AsyncIterator[None]:
    """Bound a call to OPA (``seconds``; None: the caller bounds it) and translate
    aiohttp's errors; opa_client's own errors (RegoParseError, DeletePolicyError)
    pass through to the caller that knows them."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except (aiohttp.ClientError, OSError, ValueError) as exc:  # TimeoutError is an OSError
        raise _unavailable(what, exc) from None


def _unavailable(what: str, exc: Exception) -> PolicyUnavailable:
    """An aiohttp, I/O or decoding failure of a call to OPA, as PolicyUnavailable."""
    if isinstance(exc, TimeoutError):
        return PolicyUnavailable("POLICY_TIMEOUT", f"{what}: OPA did not answer in time")
    if isinstance(exc, aiohttp.ContentTypeError):
        return PolicyUnavailable("POLICY_ENGINE_ERROR", f"{what}: the answer is not JSON")
    if isinstance(exc, aiohttp.ClientResponseError):  # a status other than 2xx
        return PolicyUnavailable("POLICY_ENGINE_ERROR", f"{what}: HTTP {exc.status}")
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return PolicyUnavailable(
            "POLICY_UNAVAILABLE", f"{what}: cannot reach OPA ({type(exc).__name__})"
        )
    # Another aiohttp error, or ValueError: a body that is not JSON.
    return PolicyUnavailable("POLICY_ENGINE_ERROR", f"{what}: {type(exc).__name__}")


# --- pure helpers ---------------------------------------------------------------------


def _parse_url(url: str) -> tuple[str, int, bool]:
    """(host for a URL, port, https) of ``http[s]://host[:port]``; ValueError otherwise."""
    if not isinstance(url, str):
        raise TypeError(f"url: expected a string, got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url: expected http(s)://HOST[:PORT], got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"url: only scheme, host and port are allowed, got {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"url: bad port in {url!r}") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return host, port, parts.scheme == "https"


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}: expected seconds as a number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name}: must be positive, got {value!r}")
    return float(value)


def _validate_modules(modules: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(modules, Mapping):
        raise TypeError(f"modules: expected a mapping, got {type(modules).__name__}")
    if not modules:
        raise PolicyCompileError("the policy set has no modules")
    target: dict[str, str] = {}
    for module_id, source in modules.items():
        if not isinstance(module_id, str) or not isinstance(source, str):
            raise TypeError("modules: expected {module_id: rego_source} strings")
        if not _MODULE_ID.match(module_id) or any(
            part in (".", "..") for part in module_id.split("/")
        ):
            raise PolicyCompileError(
                "the module id is not usable as an OPA policy id", module=module_id
            )
        if not source.strip():
            raise PolicyCompileError("the module is empty", module=module_id)
        target[module_id] = source
    return target


def _input_body(input_doc: Mapping[str, Any]) -> bytes:
    """The request body ``{"input": ...}``; BadRequest if the input is not JSON."""
    if not isinstance(input_doc, Mapping):
        raise TypeError(f"input_doc: expected a mapping, got {type(input_doc).__name__}")
    return b'{"input":' + input_json(input_doc).encode() + b"}"


def _error_code(raw: bytes) -> str:
    """`` (code)`` of OPA's error body, else nothing. Only the code: the message of an
    evaluation error can quote values of the input."""
    try:
        body = json.loads(raw)
    except ValueError:
        return ""
    code = body.get("code") if isinstance(body, dict) else None
    return f" ({code})" if isinstance(code, str) and _ERROR_CODE.match(code) else ""


def _describe(
    message: object, errors: object, prefix: str, package: MergedPackage
) -> tuple[str, str]:
    """(module, ``code: message (row, col)``) of OPA's first compile error, its row
    mapped from the merged policy back to the module that wrote it."""
    module_id = package.parts[0].module_id
    details: list[str] = []
    for error in errors if isinstance(errors, list) else []:
        if not isinstance(error, dict):
            continue
        text = f"{error.get('code', 'error')}: {error.get('message', '')}"
        location = error.get("location")
        if isinstance(location, dict):
            file = str(location.get("file", ""))
            file = file[len(prefix) :] if file.startswith(prefix) else file
            row, col = location.get("row"), location.get("col")
            found = package.locate(row) if file == package.policy_id and type(row) is int else None
            if found is not None:
                if not details:
                    module_id = found[0]
                where = f"row {found[1]}, col {col}"
                text += f" ({where})" if found[0] == module_id else f" ({found[0]}: {where})"
            else:
                text += f" ({file or package.policy_id}: row {row}, col {col})"
        details.append(text)
    if not details:
        return module_id, str(message or "OPA rejected the module")
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return module_id, details[0] + more
