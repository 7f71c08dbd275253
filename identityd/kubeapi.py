"""The Kubernetes API edge: the client, and the few calls identityd makes.

:class:`PodsAPI` lists a page of pods, opens a watch, and GETs one pod through the
real ``kubernetes_asyncio`` client (its auth, TLS and kubeconfig handling), but
asks for the raw response (``_preload_content=False``) and parses the JSON
itself: the client's model deserialisation is ~20x slower and its objects far
larger than the dicts :func:`~identityd.inventory.store.record_from_pod` reads.
:class:`ConfigMapsAPI` does the same list/watch/GET for the policy ConfigMaps and
PATCHes their status annotation; :class:`LeasesAPI` GETs, creates and replaces the
Lease of leader election (``coordination.k8s.io/v1``).

Every failure leaves this module as :class:`KubeAPIError` (an ``Unavailable``)
with the HTTP status when there was one: no aiohttp or kubernetes_asyncio type
escapes, including the ones outside ``aiohttp.ClientError``: a watch line over the
client's line limit (``aiohttp.http_exceptions.LineTooLong``) and a failing
credential refresh (``ConfigException`` from the client's refresh hook, e.g. an
empty projected token file). A watch ``ERROR`` event becomes a KubeAPIError with
the Status's code, so ``410 Gone``/``Expired`` looks the same whether it came as a
response or as an event (:attr:`KubeAPIError.expired`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from identityd.errors import ConfigError, Unavailable

JSONObject = dict[str, Any]
T = TypeVar("T")

log = logging.getLogger(__name__)

# At most this many characters of a Status message go into an error detail.
_MAX_DETAIL = 200
# A paged list whose continue token expired starts over from its first page at most
# this many times before the caller sees KUBE_CONTINUE_EXPIRED (and backs off).
MAX_LIST_RESTARTS = 2
# What a request, a read or a refresh of the client's credentials can raise; each is
# translated into a KubeAPIError by _transport_error.
_FOREIGN_ERRORS = (
    aiohttp.ClientError,
    HttpProcessingError,
    TimeoutError,
    OSError,
    ApiException,
    ConfigException,
)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector for a short, synchronous burst of allocation.

    Use only around code without an await: nothing else runs meanwhile, so pauses
    cannot interleave, and a GC the application disabled stays disabled."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class KubeAPIError(Unavailable):
    """The API server did not answer as asked. ``status`` is 0 when no HTTP answer came."""

    default_code = "KUBE_API_ERROR"

    def __init__(
        self, code: str | None = None, detail: str = "", *, status: int = 0, reason: str = ""
    ) -> None:
        super().__init__(code, detail)
        self.status = status
        self.reason = reason

    @property
    def expired(self) -> bool:
        """410: the resourceVersion or continue token is older than the server keeps."""
        return self.status == 410


@dataclass(frozen=True)
class KubeConnection:
    """How to reach the API server.

    Default: in cluster, the pod's service account (token re-read as it rotates).
    ``kubeconfig`` (and optionally ``context``): a kubeconfig file. ``host`` with
    ``token``: an explicit URL and bearer token (tests, development)."""

    kubeconfig: str | None = None
    context: str | None = None
    host: str | None = None
    token: str | None = None
    ca_cert: str | None = None
    verify_ssl: bool = True


async def new_api_client(connection: KubeConnection) -> k8s.ApiClient:
    """A client with its own Configuration (never the process-wide default)."""
    configuration = k8s.Configuration()
    try:
        if connection.host is not None:
            configuration.host = connection.host.rstrip("/")
            if connection.token:
                configuration.api_key = {"BearerToken": connection.token}
                configuration.api_key_prefix = {"BearerToken": "Bearer"}
            configuration.ssl_ca_cert = connection.ca_cert
            configuration.verify_ssl = connection.verify_ssl
        elif connection.kubeconfig is not None:
            await k8s_config.load_kube_config(
                config_file=connection.kubeconfig,
                context=connection.context,
                client_configuration=configuration,
                persist_config=False,
            )
        else:
            load_incluster: Any = k8s_config.load_incluster_config  # untyped upstream
            load_incluster(client_configuration=configuration)
    except (ConfigException, OSError, ValueError) as exc:
        raise ConfigError(
            "KUBE_CONFIG_INVALID",
            f"cannot configure the Kubernetes client: "
            f"{type(exc).__name__}: {str(exc)[:_MAX_DETAIL]}",
        ) from exc
    return k8s.ApiClient(configuration)


class _Client:
    """One ApiClient (one connection pool), closed by :meth:`aclose`."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self._client = api_client

    @classmethod
    async def connect(cls, connection: KubeConnection) -> Self:
        return cls(await new_api_client(connection))

    async def aclose(self) -> None:
        await self._client.close()

    @staticmethod
    async def _read(response: Any, what: str, ok: tuple[int, ...] = (200,)) -> bytes:
        """The body of a success; any other status raises KubeAPIError with its Status."""
        try:
            raw: bytes = await response.read()
        except _FOREIGN_ERRORS as exc:
            raise _transport_error(what, exc) from exc
        finally:
            response.release()
        if response.status not in ok:
            try:
                status = json.loads(raw)
            except ValueError:
                status = None
            raise _status_error(what, response.status, status)
        return raw

    @classmethod
    async def _json(cls, response: Any, what: str, ok: tuple[int, ...] = (200,)) -> JSONObject:
        return _parse(await cls._read(response, what, ok), what)


class _Collection(_Client):
    """A paged list and a watch of one core/v1 resource; subclasses name it."""

    _plural = ""  # "pods", in error details
    _list_kind = ""  # "PodList"

    def __init__(self, api_client: k8s.ApiClient) -> None:
        super().__init__(api_client)
        self._core = k8s.CoreV1Api(api_client)

    async def _request(self, namespace: str | None, params: dict[str, Any]) -> Any:
        """The raw response of one list or watch request."""
        raise NotImplementedError

    async def list_all(
        self,
        namespace: str | None,
        convert: Callable[[JSONObject], T | None],
        *,
        limit: int,
        label_selector: str | None = None,
        field_selector: str | None = None,
        request_timeout: float,
    ) -> tuple[list[T], str]:
        """Every object of a list (in pages of ``limit``; 0 = one response) passed through
        ``convert`` (None drops it), and the list's resourceVersion.

        A continue token the server no longer honours (410: it compacted past the
        list's resourceVersion) starts the list over from its first page, still in
        pages of ``limit`` (an unpaged list of every pod could exhaust the memory of
        both ends), at most :data:`MAX_LIST_RESTARTS` times; then KubeAPIError with
        code ``KUBE_CONTINUE_EXPIRED`` (status 410).

        Each page is parsed and converted with the cyclic GC paused, and is gone
        before it resumes: a collector running while a page is alive scans its
        ~30k containers over and over (a quarter of the CPU of a 100k-pod list,
        bench/inventory_sync.py). The next page is asked for before this one is
        converted, so the server prepares it meanwhile. The price is one
        event-loop stall per page (~50 ms at 500 4-KB pods); ``limit`` bounds it."""
        params: dict[str, Any] = {"_request_timeout": aiohttp.ClientTimeout(total=request_timeout)}
        if limit:
            params["limit"] = limit
        if label_selector:
            params["label_selector"] = label_selector
        if field_selector:
            params["field_selector"] = field_selector
        restarts = 0
        while True:
            try:
                return await self._list_pages(namespace, convert, params)
            except KubeAPIError as exc:
                if exc.code != "KUBE_CONTINUE_EXPIRED" or restarts >= MAX_LIST_RESTARTS:
                    raise
                restarts += 1
                log.info(
                    "list %s: continue token expired; listing again from the first page",
                    self._plural,
                )

    async def _list_pages(
        self,
        namespace: str | None,
        convert: Callable[[JSONObject], T | None],
        params: dict[str, Any],
    ) -> tuple[list[T], str]:
        """One paged list from its first page (see :meth:`list_all`)."""
        what = f"list {self._plural}"
        converted: list[T] = []
        list_rv: str | None = None
        pending: asyncio.Future[Any] | None = asyncio.ensure_future(
            self._request(namespace, params)
        )
        continuing = False
        try:
            while pending is not None:
                try:
                    raw = await self._read(await pending, what)
                except KubeAPIError as exc:
                    if continuing and exc.expired:
                        raise KubeAPIError(
                            "KUBE_CONTINUE_EXPIRED", exc.detail, status=410, reason=exc.reason
                        ) from exc
                    raise
                with paused_gc():
                    body = _parse(raw, what)
                    del raw
                    meta, items = body.get("metadata"), body.get("items")
                    if not isinstance(meta, dict) or not isinstance(items, list):
                        raise KubeAPIError(
                            "KUBE_BAD_RESPONSE", f"{what}: not a {self._list_kind}", status=200
                        )
                    rv, token = meta.get("resourceVersion"), meta.get("continue")
                    if not isinstance(rv, str) or not rv:
                        raise KubeAPIError(
                            "KUBE_BAD_RESPONSE", f"{what}: no resourceVersion", status=200
                        )
                    list_rv = list_rv or rv  # every page is as of the first
                    if not (isinstance(token, str) and token):
                        pending = None
                    else:
                        continuing = True
                        pending = asyncio.ensure_future(
                            self._request(namespace, params | {"_continue": token})
                        )
                        await asyncio.sleep(0)  # let it go out before the slow part
                    converted += [
                        out
                        for item in items
                        if isinstance(item, dict) and (out := convert(item)) is not None
                    ]
                    del body, meta, items
            return converted, list_rv or ""
        finally:
            if pending is not None:  # failed or cancelled with a request ahead
                pending.add_done_callback(_release_unread)
                pending.cancel()

    async def watch(
        self,
        namespace: str | None,
        *,
        resource_version: str,
        timeout_seconds: int,
        label_selector: str | None = None,
        connect_timeout: float,
        inactivity_timeout: float,
    ) -> WatchStream:
        """Open a watch from ``resource_version`` with bookmarks. The caller must
        :meth:`WatchStream.close` it. A silent stream fails after ``inactivity_timeout``."""
        params: dict[str, Any] = {
            "watch": True,
            "resource_version": resource_version,
            "allow_watch_bookmarks": True,
            "timeout_seconds": timeout_seconds,
            "_request_timeout": aiohttp.ClientTimeout(
                total=None,
                connect=connect_timeout,
                sock_connect=connect_timeout,
                sock_read=inactivity_timeout,
            ),
        }
        if label_selector:
            params["label_selector"] = label_selector
        what = f"watch {self._plural}"
        response = await self._request(namespace, params)
        if response.status != 200:
            await self._json(response, what)  # raises with the Status
        return WatchStream(response, what)

    async def _get_one(
        self,
        read: Callable[..., Awaitable[Any]],
        namespace: str,
        name: str,
        what: str,
        request_timeout: float,
    ) -> JSONObject | None:
        """One namespaced GET as raw JSON; None on 404."""
        try:
            response: Any = await read(
                name,
                namespace,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=request_timeout),
            )
        except _FOREIGN_ERRORS as exc:
            raise _transport_error(what, exc) from exc
        if response.status == 404:
            response.release()
            return None
        return await self._json(response, what)


class PodsAPI(_Collection):
    """Pods through one ApiClient (one connection pool). Close with :meth:`aclose`."""

    _plural = "pods"
    _list_kind = "PodList"

    async def get(self, namespace: str, name: str, *, request_timeout: float) -> JSONObject | None:
        """The pod, or None when the API server says 404."""
        return await self._get_one(
            self._core.read_namespaced_pod, namespace, name, "get pod", request_timeout
        )

    async def _request(self, namespace: str | None, params: dict[str, Any]) -> Any:
        try:
            if namespace is None:
                return await self._core.list_pod_for_all_namespaces(
                    _preload_content=False, **params
                )
            return await self._core.list_namespaced_pod(namespace, _preload_content=False, **params)
        except _FOREIGN_ERRORS as exc:
            raise _transport_error("pods", exc) from exc


class ConfigMapsAPI(_Collection):
    """ConfigMaps through one ApiClient: the paged list, the watch, GET, and PATCH."""

    _plural = "configmaps"
    _list_kind = "ConfigMapList"

    async def get(self, namespace: str, name: str, *, request_timeout: float) -> JSONObject | None:
        """The ConfigMap, or None when the API server says 404."""
        return await self._get_one(
            self._core.read_namespaced_config_map,
            namespace,
            name,
            "get configmap",
            request_timeout,
        )

    async def patch(
        self, namespace: str, name: str, patch: JSONObject, *, request_timeout: float
    ) -> JSONObject:
        """Apply ``patch`` and return the ConfigMap as stored. A dict goes out as a
        strategic merge patch (what kube-mgmt sends; for metadata it is a JSON merge
        patch). A ConfigMap deleted meanwhile is KubeAPIError with ``status`` 404."""
        if not isinstance(patch, dict):
            raise TypeError(f"patch: expected a dict, got {type(patch).__name__}")
        try:
            response: Any = await self._core.patch_namespaced_config_map(
                name,
                namespace,
                patch,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=request_timeout),
            )
        except _FOREIGN_ERRORS as exc:
            raise _transport_error("patch configmap", exc) from exc
        return await self._json(response, "patch configmap")

    async def _request(self, namespace: str | None, params: dict[str, Any]) -> Any:
        try:
            if namespace is None:
                return await self._core.list_config_map_for_all_namespaces(
                    _preload_content=False, **params
                )
            return await self._core.list_namespaced_config_map(
                namespace, _preload_content=False, **params
            )
        except _FOREIGN_ERRORS as exc:
            raise _transport_error("configmaps", exc) from exc


class LeasesAPI(_Client):
    """``coordination.k8s.io/v1`` Leases, for leader election: GET, create, replace.

    A lost race is KubeAPIError with ``status`` 409: AlreadyExists on create, Conflict
    on a replace whose ``metadata.resourceVersion`` is no longer the current one."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        super().__init__(api_client)
        self._coordination = k8s.CoordinationV1Api(api_client)

    async def get(self, namespace: str, name: str, *, request_timeout: float) -> JSONObject | None:
        """The Lease, or None when the API server says 404."""
        try:
            response: Any = await self._coordination.read_namespaced_lease(
                name,
                namespace,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=request_timeout),
            )
        except _FOREIGN_ERRORS as exc:
            raise _transport_error("get lease", exc) from exc
        if response.status == 404:
            response.release()
            return None
        return await self._json(response, "get lease")

    async def create(
        self, namespace: str, lease: JSONObject, *, request_timeout: float
    ) -> JSONObject:
        """POST a new Lease; the Lease as stored."""
        body: Any = lease  # the client serialises a dict as it is
        try:
            response: Any = await self._coordination.create_namespaced_lease(
                namespace,
                body,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=request_timeout),
            )
        except _FOREIGN_ERRORS as exc:
            raise _transport_error("create lease", exc) from exc
        return await self._json(response, "create lease", (200, 201))

    async def replace(
        self, namespace: str, name: str, lease: JSONObject, *, request_timeout: float
    ) -> JSONObject:
        """PUT the whole Lease (its ``metadata.resourceVersion`` is the precondition)."""
        body: Any = lease
        try:
            response: Any = await self._coordination.replace_namespaced_lease(
                name,
                namespace,
                body,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=request_timeout),
            )
        except _FOREIGN_ERRORS as exc:
            raise _transport_error("replace lease", exc) from exc
        return await self._json(response, "replace lease", (200, 201))


# A watch is asked to end at most this share of the inactivity timeout after it
# opened, leaving the rest as margin for the network and for whole seconds.
_WATCH_TIMEOUT_SHARE = 5 / 6


def check_watch_timeout(base: float, inactivity: float) -> None:
    """Settings' check of the pair :func:`watch_timeout` takes: ValueError unless the
    watch timeout is below the inactivity timeout."""
    if base >= inactivity:
        raise ValueError(
            "watch_timeout_seconds: must be below inactivity_timeout_seconds, or every "
            "quiet watch counts as dead before the server ends it"
        )


def watch_timeout(base: float, inactivity: float, fraction: float) -> float:
    """The ``timeoutSeconds`` to ask of one watch: ``base`` raised by ``fraction`` (a
    random number in [0, 1)) up to twice ``base``, but not past 5/6 of ``inactivity``
    (60-100 s for 60 and 120). Randomised so that replicas do not reconnect in step
    (client-go does the same); below the inactivity timeout so that a healthy server
    always ends a quiet stream, which may carry no bookmark at all, before the client
    would call it dead."""
    ceiling = max(base, min(2 * base, inactivity * _WATCH_TIMEOUT_SHARE))
    return base + (ceiling - base) * fraction


def _release_unread(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()


def _parse(raw: bytes, what: str) -> JSONObject:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise KubeAPIError("KUBE_BAD_RESPONSE", f"{what}: not JSON", status=200) from exc
    if not isinstance(body, dict):
        raise KubeAPIError("KUBE_BAD_RESPONSE", f"{what}: not a JSON object", status=200)
    return body


class WatchStream:
    """The events of one open watch: ADDED, MODIFIED, DELETED and BOOKMARK dicts.

    :meth:`next` returns None when the server ends the stream (``timeoutSeconds``
    or a clean close) and raises KubeAPIError for an ERROR event (410 → ``expired``),
    a dead stream (``KUBE_WATCH_INACTIVE``), a cut connection or a garbled line."""

    def __init__(self, response: Any, what: str = "watch pods") -> None:
        self._response = response
        self._what = what

    async def next(self) -> JSONObject | None:
        while True:
            try:
                line = await self._response.content.readline()
            except aiohttp.ServerTimeoutError as exc:
                raise KubeAPIError("KUBE_WATCH_INACTIVE", "no data on the watch") from exc
            except (*_FOREIGN_ERRORS, ValueError) as exc:
                raise _transport_error(self._what, exc) from exc
            if not line:
                return None
            if line.strip():
                break
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise KubeAPIError(
                "KUBE_BAD_RESPONSE", f"{self._what}: a line is not JSON", status=200
            ) from exc
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise KubeAPIError(
                "KUBE_BAD_RESPONSE", f"{self._what}: an event without an object", status=200
            )
        if event.get("type") == "ERROR":
            obj = event["object"]
            code = obj.get("code")
            raise _status_error(self._what, code if isinstance(code, int) else 500, obj)
        return event

    def close(self) -> None:
        # A half-read stream cannot go back to the pool; close its connection.
        self._response.close()


def _transport_error(what: str, exc: BaseException) -> KubeAPIError:
    if isinstance(exc, ApiException):
        return KubeAPIError(
            "KUBE_API_ERROR", f"{what}: {exc.status} {exc.reason}", status=exc.status or 0
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return KubeAPIError("KUBE_TIMEOUT", f"{what}: timed out")
    if isinstance(exc, LineTooLong):
        # Its message quotes the start of the line: object data, kept out of details.
        return KubeAPIError(
            "KUBE_BAD_RESPONSE", f"{what}: a line longer than the client reads", status=200
        )
    if isinstance(exc, ConfigException):
        # The refresh hook re-reads the credentials (in cluster: the projected token
        # file). Its message may name a kubeconfig's contents: the type only.
        return KubeAPIError("KUBE_CREDENTIALS_UNAVAILABLE", f"{what}: {type(exc).__name__}")
    return KubeAPIError(
        "KUBE_UNREACHABLE", f"{what}: {type(exc).__name__}: {str(exc)[:_MAX_DETAIL]}"
    )


def _status_error(what: str, status: int, body: object) -> KubeAPIError:
    reason, message = "", ""
    if isinstance(body, dict):
        reason = str(body.get("reason") or "")
        message = str(body.get("message") or "")[:_MAX_DETAIL]
    code = "KUBE_EXPIRED" if status == 410 else "KUBE_API_ERROR"
    return KubeAPIError(
        code, f"{what}: {status} {reason}: {message}".rstrip(": "), status=status, reason=reason
    )
