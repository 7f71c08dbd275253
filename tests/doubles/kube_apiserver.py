"""A Kubernetes API-server double: a real aiohttp server on loopback that speaks the
documented REST/watch wire format to the real ``kubernetes_asyncio`` client.

    async with KubeAPIServer() as api:
        api.add_pod("sports-web", "api-1", service_account="api", ip="10.1.2.3")
        connection = KubeConnection(host=api.url, token=api.token)
        ...

Served (for every resource in ``RESOURCES``; pods, configmaps and leases today):

- ``GET {prefix}/{plural}`` and ``{prefix}/namespaces/{ns}/{plural}``: a list with
  ``metadata.resourceVersion``; ``limit``/``continue`` paging (each page a consistent
  snapshot at the first page's resourceVersion; a continue token older than the
  event window is ``410 Expired``); ``labelSelector`` (``=``, ``==``, ``!=``, ``in``,
  ``notin``, exists, ``!``) and ``fieldSelector`` (``metadata.name``/``namespace``).
- the same with ``watch=1``: one JSON event per line (ADDED/MODIFIED/DELETED, and
  BOOKMARK when ``allowWatchBookmarks``); no ``resourceVersion`` or ``"0"`` starts with
  an ADDED per existing object; a resourceVersion older than the window gets one
  ``ERROR`` event with a ``410 Expired`` Status and the stream ends; ``timeoutSeconds``
  ends the stream cleanly. As the real watch cache does, a BOOKMARK goes out only at a
  resourceVersion above the one the watch started from: a watch on a quiet cluster
  gets no bytes at all until ``timeoutSeconds``.
- ``GET {prefix}/namespaces/{ns}/{plural}/{name}``: the object, or a 404 Status.
- ``PATCH`` on configmaps: merge-patch, strategic-merge-patch (the same for a
  ConfigMap) and JSON patch; ``metadata.resourceVersion`` in a merge patch is a
  precondition (409 Conflict when stale).
- ``POST`` and ``PUT`` on leases (``coordination.k8s.io/v1``): create (201; 409
  AlreadyExists) and replace (404 when missing; a stale ``metadata.resourceVersion`` is
  409 Conflict).
- ``POST /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token`` (TokenRequest: audiences,
  expirationSeconds, boundObjectRef to a Pod) signs a bound token in the claim format of
  the real API server; ``POST /apis/authentication.k8s.io/v1/tokenreviews`` authenticates
  one as the real TokenReview does (audiences intersected, bound pod checked);
  ``GET /.well-known/openid-configuration`` and ``GET /openid/v1/jwks`` publish the keys;
  as on a real API server, the document's ``jwks_uri`` is on the server's external
  address (``external_address``, or ``service_account_jwks_uri`` as with
  ``--service-account-jwks-uri``), not on the URL the client talks to.
  :attr:`KubeAPIServer.tokens` (a :class:`~tests.doubles.kube_store.TokenAuthority`) holds
  the signing keys and the test controls: ``tokens.rotate()``, ``tokens.clock``,
  ``tokens.ignore_audiences``, ``tokens.tamper``. A slow or failing TokenReview is
  ``set_delay(s, path="tokenreviews")`` / ``fail_next(path="tokenreviews")``.

Every request needs ``Authorization: Bearer <token>`` (401 Status otherwise) and is
recorded in :attr:`KubeAPIServer.requests`, so tests can check what the client sent.

Test controls: :meth:`add_pod`/:meth:`update_pod`/:meth:`terminate_pod`/
:meth:`delete_pod` (and the generic :meth:`put`/:meth:`delete`), :meth:`drop_watches`,
:meth:`compact`, :meth:`set_delay`, :meth:`fail_next`, :meth:`pause`/:meth:`resume`
(the port refuses connections in between), :meth:`send_bookmark`, :meth:`send_line`.

To add a resource (Leases, ...), add a :class:`Resource` to ``RESOURCES``; to add a
non-resource endpoint (TokenRequest, TokenReview, OIDC discovery), add a route in
:meth:`KubeAPIServer._routes` that reads or writes :attr:`store`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import gzip
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

from tests.doubles.kube_store import (
    DEFAULT_ISSUER,
    JSON,
    LEASES,
    Expired,
    ObjectStore,
    Predicate,
    Resource,
    TokenAuthority,
    TokenRefused,
    Watcher,
    event_line,
    field_predicate,
    label_predicate,
    now_rfc3339,
    watch_line,
)

PODS = Resource("pods", "Pod")
CONFIGMAPS = Resource("configmaps", "ConfigMap")
RESOURCES: dict[str, Resource] = {r.plural: r for r in (PODS, CONFIGMAPS, LEASES)}
PATCHABLE = frozenset({"configmaps"})
WRITABLE = frozenset({"leases"})  # create (POST) and replace (PUT): see "create and replace"

_MERGE_PATCH = ("application/merge-patch+json", "application/strategic-merge-patch+json")
_JSON_PATCH = "application/json-patch+json"
_TRUE = frozenset({"1", "t", "T", "true", "True", "TRUE"})  # Go's strconv.ParseBool
_WRITE_BATCH = 256  # watch lines written per write() when they queue up
# The API server gzips a response above this size when the client accepts gzip,
# at the fastest level (k8s.io/apiserver responsewriters).
_GZIP_MIN_BYTES = 128 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at: float  # time.monotonic() on arrival

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch") in _TRUE


@dataclass
class _Delay:
    seconds: float
    path: str | None
    after: bool  # hold the answer (computed on arrival) rather than the request


@dataclass
class _Failure:
    remaining: int
    status: int
    method: str | None
    path: str | None


@dataclass(frozen=True)
class _Control:
    """A queue item for a watch handler that is not an event line."""

    kind: str  # "drop" | "abort" | "bookmark" | "raw"
    rv: int = 0
    data: bytes = b""


@dataclass(eq=False)
class _Watch:
    watcher: Watcher
    resource: Resource
    bookmarks: bool
    start_rv: int  # bookmarks only above this (the watch cache's rule)
    opened_at: float = field(default_factory=time.monotonic)


def status_body(code: int, reason: str, message: str, **details: str) -> JSON:
    """A ``v1/Status`` failure, as the API server writes it."""
    body: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": message, "reason": reason, "code": code}
    if details:
        body["details"] = details
    return body


def status_response(code: int, reason: str, message: str, **details: str) -> web.Response:
    return web.json_response(status_body(code, reason, message, **details), status=code)


_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType",
            429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
            504: "Timeout"}


def pod_manifest(
    namespace: str,
    name: str,
    *,
    uid: str | None = None,
    service_account: str = "default",
    phase: str = "Running",
    ip: str | None = "10.0.0.1",
    node: str | None = "node-1",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    deletion_timestamp: str | None = None,
) -> JSON:
    """A Pod in the shape the API server serves it (the usual fields, not every one)."""
    meta: JSON = {"name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4()),
                  "labels": dict(labels or {"app": service_account}),
                  "annotations": dict(annotations or {}), "generateName": f"{name}-"}
    if deletion_timestamp is not None:
        meta["deletionTimestamp"] = deletion_timestamp
        meta["deletionGracePeriodSeconds"] = 30
    spec: JSON = {
        "serviceAccountName": service_account, "serviceAccount": service_account,
        "containers": [{"name": "main", "image": "registry.example/app:1.0",
                        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                        "terminationMessagePath": "/dev/termination-log",
                        "imagePullPolicy": "IfNotPresent"}],
        "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
        "schedulerName": "default-scheduler", "terminationGracePeriodSeconds": 30,
        "enableServiceLinks": True,
    }
    if node is not None:
        spec["nodeName"] = node
    status: JSON = {"phase": phase, "qosClass": "Burstable",
                    "conditions": [{"type": "Ready", "status": str(phase == "Running"),
                                    "lastTransitionTime": now_rfc3339()}]}
    if ip is not None:
        status |= {"podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.0.10",
                   "startTime": now_rfc3339()}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


class KubeAPIServer:
    """The double. ``history`` = events kept (the watch window); ``bookmark_interval``
    sends a BOOKMARK on an idle watch that asked for them, when the resourceVersion is
    above the watch's start (None: only on demand). ``external_address`` is the
    address the discovery document's ``jwks_uri`` names (a real API server's
    advertise address or ``--external-hostname``; TEST-NET here, reachable from
    nowhere); ``service_account_jwks_uri`` replaces that URI as a whole."""

    def __init__(
        self,
        *,
        token: str = "double-token",
        history: int = 10_000,
        bookmark_interval: float | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        issuer: str = DEFAULT_ISSUER,
        external_address: str = "192.0.2.10:6443",
        service_account_jwks_uri: str | None = None,
    ) -> None:
        self.store = ObjectStore(history=history)
        self.tokens = TokenAuthority(self.store, issuer)
        # The peer (host, port) of each TokenReview: shows whether connections are reused.
        self.review_peers: list[Any] = []
        self.token = token
        self.requests: list[Recorded] = []
        self.bookmark_interval = bookmark_interval
        self.external_address = external_address
        self.service_account_jwks_uri = service_account_jwks_uri
        self._host, self._port = host, port
        self._delays: list[_Delay] = []
        self._failures: list[_Failure] = []
        self._watches: set[_Watch] = set()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        self._routes(app)
        # Cancel a handler when its client goes away, as the API server ends a watch then.
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     handler_cancellation=True)
        await self._runner.setup()
        await self._listen()

    async def close(self) -> None:
        self.drop_watches()
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
        self._site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await self._site.start()
        server = self._site._server  # the port, when 0 was asked for
        if self._port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            self._port = sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def jwks_uri(self) -> str:
        """The ``jwks_uri`` of the discovery document: never on :attr:`url`'s origin."""
        return self.service_account_jwks_uri or f"https://{self.external_address}/openid/v1/jwks"

    # -- routes -------------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        for resource in RESOURCES.values():
            collection = f"{resource.prefix}/namespaces/{{namespace}}/{resource.plural}"
            app.router.add_get(f"{resource.prefix}/{resource.plural}",
                               self._bind(self._collection, resource))
            app.router.add_get(collection, self._bind(self._collection, resource))
            app.router.add_get(f"{collection}/{{name}}", self._bind(self._get, resource))
            if resource.plural in PATCHABLE:
                app.router.add_patch(f"{collection}/{{name}}", self._bind(self._patch, resource))
            if resource.plural in WRITABLE:
                app.router.add_post(collection, self._bind(self._create, resource))
                app.router.add_put(f"{collection}/{{name}}", self._bind(self._replace, resource))
        app.router.add_post("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                            self._token_request)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        app.router.add_get("/.well-known/openid-configuration", self._openid_configuration)
        app.router.add_get("/openid/v1/jwks", self._openid_jwks)

    @staticmethod
    def _bind(
        handler: Callable[[web.Request, Resource], Awaitable[web.StreamResponse]],
        resource: Resource,
    ) -> Handler:
        async def bound(request: web.Request) -> web.StreamResponse:
            return await handler(request, resource)

        return bound

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append(Recorded(request.method, request.path, dict(request.query),
                                      dict(request.headers), time.monotonic()))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return status_response(401, "Unauthorized", "Unauthorized")
        delays = [d for d in self._delays if d.path is None or d.path in request.path_qs]
        for delay in delays:
            if not delay.after:
                await asyncio.sleep(delay.seconds)
        failure = self._take_failure(request)
        if failure is not None:
            return status_response(failure, _REASONS.get(failure, "InternalError"),
                                   f"injected failure {failure}")
        try:
            response = await handler(request)
        except web.HTTPNotFound:
            response = status_response(404, "NotFound", "the server could not find the "
                                       "requested resource")
        except web.HTTPMethodNotAllowed:
            response = status_response(405, "MethodNotAllowed", "method not allowed")
        for delay in delays:
            if delay.after:
                await asyncio.sleep(delay.seconds)
        return response

    def _take_failure(self, request: web.Request) -> int | None:
        for failure in self._failures:
            if failure.method is not None and failure.method != request.method:
                continue
            if failure.path is not None and failure.path not in request.path_qs:
                continue
            failure.remaining -= 1
            if failure.remaining <= 0:
                self._failures.remove(failure)
            return failure.status
        return None

    # -- handlers -----------------------------------------------------------------------------

    async def _collection(self, request: web.Request, resource: Resource) -> web.StreamResponse:
        query = request.query
        namespace = request.match_info.get("namespace")
        try:
            labels = label_predicate(query.get("labelSelector", ""))
            fields = field_predicate(query.get("fieldSelector", ""))
            limit = int(query.get("limit", "0") or "0")
        except ValueError as exc:
            return status_response(400, "BadRequest", str(exc))

        def predicate(obj: JSON) -> bool:
            return labels(obj) and fields(obj)

        if query.get("watch") in _TRUE:
            return await self._watch(request, resource, namespace, predicate)
        at_rv, after = self.store.rv, None
        if token := query.get("continue"):
            try:
                at_rv, after = _decode_continue(token)
                self.store.events_after(at_rv)  # raises Expired when compacted
            except ValueError:
                return status_response(400, "BadRequest", "invalid continue token")
            except Expired:
                return status_response(
                    410, "Expired", "The provided continue parameter is too old to display a "
                    "consistent list result. You can start a new list without the continue "
                    "parameter.")
        items, last = self.store.page(resource.plural, namespace, predicate,
                                      at_rv=at_rv, after=after, limit=max(limit, 0))
        meta: JSON = {"resourceVersion": str(at_rv)}
        if last is not None:
            meta["continue"] = _encode_continue(at_rv, last)
        head = json.dumps({"kind": resource.list_kind, "apiVersion": resource.group_version,
                           "metadata": meta}, separators=(",", ":")).encode()
        body = head[:-1] + b',"items":[' + b",".join(items) + b"]}"
        response = web.Response(body=body, content_type="application/json")
        if len(body) > _GZIP_MIN_BYTES and "gzip" in request.headers.get("Accept-Encoding", ""):
            response.body = gzip.compress(body, compresslevel=1)
            response.headers["Content-Encoding"] = "gzip"
        return response

    async def _watch(
        self, request: web.Request, resource: Resource, namespace: str | None,
        predicate: Predicate,
    ) -> web.StreamResponse:
        query = request.query
        try:
            timeout = float(query["timeoutSeconds"]) if "timeoutSeconds" in query else None
        except ValueError:
            return status_response(400, "BadRequest", "invalid timeoutSeconds")
        watcher = Watcher(resource.plural, namespace, predicate)
        rv_text = query.get("resourceVersion", "")
        backlog: list[bytes]
        expired = False
        if rv_text in ("", "0"):  # "Get State and Start at Most Recent" / "Start at Any"
            rv = self.store.rv
            items, _ = self.store.page(resource.plural, namespace, predicate,
                                       at_rv=rv, after=None, limit=0)
            backlog = [watch_line("ADDED", raw) for raw in items]
        else:
            try:
                rv = int(rv_text)
            except ValueError:
                return status_response(400, "BadRequest", f"invalid resourceVersion {rv_text!r}")
            try:
                lines = (event_line(event, watcher) for event in self.store.events_after(rv))
                backlog = [line for line in lines if line is not None]
            except Expired as exc:
                backlog = [watch_line("ERROR", json.dumps(
                    status_body(410, "Expired", str(exc)), separators=(",", ":")).encode())]
                expired = True
        # Subscribe before the first await: no event can fall between backlog and stream.
        watch = _Watch(watcher, resource, query.get("allowWatchBookmarks") in _TRUE, rv)
        if not expired:
            self.store.watchers.add(watcher)
            self._watches.add(watch)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            if backlog:
                await response.write(b"".join(backlog))
            if not expired and await self._stream(request, response, watch, timeout):
                return response  # aborted: no clean end
            await response.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away
        finally:
            self.store.watchers.discard(watcher)
            self._watches.discard(watch)
        return response

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, watch: _Watch,
        seconds: float | None,
    ) -> bool:
        """Copy queued lines to the response until dropped or ``seconds`` are up.
        True = aborted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds if seconds is not None else None
        queue = watch.watcher.queue
        while True:
            waits = [w for w in (self.bookmark_interval if watch.bookmarks else None,
                                 deadline - loop.time() if deadline is not None else None)
                     if w is not None]
            try:
                async with asyncio.timeout(min(waits) if waits else None):
                    first = await queue.get()
            except TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    return False
                # Idle with nothing queued: every event up to store.rv has been written.
                # The watch cache drops a bookmark not above the watch's start.
                if self.store.rv > watch.start_rv:
                    await response.write(self._bookmark(watch.resource, self.store.rv))
                continue
            batch: list[bytes] = []
            item = first
            while True:
                if isinstance(item, bytes):
                    batch.append(item)
                elif isinstance(item, _Control) and item.kind == "bookmark":
                    if watch.bookmarks and item.rv > watch.start_rv:
                        batch.append(self._bookmark(watch.resource, item.rv))
                elif isinstance(item, _Control) and item.kind == "raw":
                    batch.append(item.data)
                elif isinstance(item, _Control):
                    if batch:
                        await response.write(b"".join(batch))
                    if item.kind == "abort":
                        if request.transport is not None:
                            request.transport.close()
                        return True
                    return False
                if len(batch) >= _WRITE_BATCH or queue.empty():
                    break
                item = queue.get_nowait()
            await response.write(b"".join(batch))
            if deadline is not None and loop.time() >= deadline:
                return False  # timeoutSeconds holds on a busy stream too

    @staticmethod
    def _bookmark(resource: Resource, rv: int) -> bytes:
        obj = {"kind": resource.kind, "apiVersion": resource.group_version,
               "metadata": {"resourceVersion": str(rv), "creationTimestamp": None}}
        return watch_line("BOOKMARK", json.dumps(obj, separators=(",", ":")).encode())

    async def _get(self, request: web.Request, resource: Resource) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        obj = self.store.get(resource.plural, namespace, name)
        if obj is None:
            return _not_found(resource, name)
        return web.json_response(obj)

    async def _patch(self, request: web.Request, resource: Resource) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        current = self.store.get(resource.plural, namespace, name)
        if current is None:
            return _not_found(resource, name)
        try:
            patch = await request.json()
        except ValueError:
            return status_response(400, "BadRequest", "invalid JSON in the patch body")
        if request.content_type in _MERGE_PATCH and isinstance(patch, dict):
            wanted_rv = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted_rv is not None and wanted_rv != current["metadata"]["resourceVersion"]:
                return status_response(
                    409, "Conflict", f'Operation cannot be fulfilled on {resource.plural} '
                    f'"{name}": the object has been modified; please apply your changes to '
                    "the latest version and try again", name=name, kind=resource.plural)
            updated = merge_patch(current, patch)
        elif request.content_type == _JSON_PATCH and isinstance(patch, list):
            try:
                updated = json_patch(current, patch)
            except (KeyError, IndexError, ValueError, TypeError) as exc:
                return status_response(422, "Invalid", f"JSON patch failed: {exc}")
        else:
            return status_response(415, "UnsupportedMediaType",
                                   f"the body of the request was in an unknown format - "
                                   f"accepted media types include: {', '.join(_MERGE_PATCH)}, "
                                   f"{_JSON_PATCH}")
        if not isinstance(updated, dict):
            return status_response(422, "Invalid", "the patch does not leave an object")
        meta = updated.setdefault("metadata", {})
        meta.update(name=name, namespace=namespace, uid=current["metadata"]["uid"])
        meta.pop("resourceVersion", None)
        return web.json_response(self.store.put(resource.plural, updated))

    # -- create and replace (Leases, for leader election) -------------------------------------

    async def _create(self, request: web.Request, resource: Resource) -> web.StreamResponse:
        """POST: 201 with the object as stored; 409 AlreadyExists when the name is taken."""
        namespace = request.match_info["namespace"]
        obj = await _object_body(request, resource)
        if isinstance(obj, web.Response):
            return obj
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            return status_response(422, "Invalid", "metadata.name: Required value")
        if meta.setdefault("namespace", namespace) != namespace:
            return status_response(400, "BadRequest", "the namespace of the provided object "
                                   "does not match the namespace sent on the request")
        if self.store.get(resource.plural, namespace, name) is not None:
            return status_response(409, "AlreadyExists", f'{resource.plural} "{name}" already '
                                   "exists", name=name, kind=resource.plural)
        meta.pop("resourceVersion", None)
        return web.json_response(self.store.put(resource.plural, obj), status=201)

    async def _replace(self, request: web.Request, resource: Resource) -> web.StreamResponse:
        """PUT: the whole object. A ``metadata.resourceVersion`` other than the current one
        is 409 Conflict (optimistic concurrency); none is an unconditional update."""
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        obj = await _object_body(request, resource)
        if isinstance(obj, web.Response):
            return obj
        current = self.store.get(resource.plural, namespace, name)
        if current is None:
            return _not_found(resource, name)
        meta = obj.setdefault("metadata", {})
        if meta.setdefault("name", name) != name or meta.setdefault("namespace",
                                                                    namespace) != namespace:
            return status_response(400, "BadRequest", "the name or namespace of the provided "
                                   "object does not match the request")
        wanted_rv = meta.pop("resourceVersion", None)
        if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
            return status_response(
                409, "Conflict", f'Operation cannot be fulfilled on {resource.plural} '
                f'"{name}": the object has been modified; please apply your changes to the '
                "latest version and try again", name=name, kind=resource.plural)
        meta["uid"] = current["metadata"]["uid"]
        return web.json_response(self.store.put(resource.plural, obj))

    # -- service-account tokens ---------------------------------------------------------------

    async def _token_request(self, request: web.Request) -> web.StreamResponse:
        namespace, account = request.match_info["namespace"], request.match_info["name"]
        body = await _json_body(request)
        if not isinstance(body, dict):
            return status_response(400, "BadRequest", "the body is not a TokenRequest")
        spec = body.get("spec") or {}
        try:
            answer = self.tokens.request_token(namespace, account, spec)
        except TokenRefused as exc:
            return status_response(exc.code, exc.reason, exc.message, name=account,
                                   kind="serviceaccounts")
        return web.json_response(
            {"kind": "TokenRequest", "apiVersion": _AUTHN_V1,
             "metadata": {"name": account, "namespace": namespace, "creationTimestamp": None},
             **answer}, status=201)

    async def _token_review(self, request: web.Request) -> web.StreamResponse:
        self.review_peers.append(request.transport.get_extra_info("peername")
                                 if request.transport is not None else None)
        body = await _json_body(request)
        spec = body.get("spec") if isinstance(body, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("token"), str) \
                or not spec["token"]:
            return status_response(400, "BadRequest",
                                   "token is required for TokenReview in authentication")
        token, audiences = spec["token"], spec.get("audiences") or []
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            return status_response(400, "BadRequest", "spec.audiences: not a list of strings")
        status = self.tokens.review(token, audiences)
        # The real API server echoes the spec, token included.
        return web.json_response(
            {"kind": "TokenReview", "apiVersion": _AUTHN_V1,
             "metadata": {"creationTimestamp": None}, "spec": spec, "status": status},
            status=201)

    async def _openid_configuration(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.tokens.discovery(self.jwks_uri),
                                 headers={"Cache-Control": "public, max-age=3600"})

    async def _openid_jwks(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.tokens.jwks(), content_type="application/jwk-set+json",
                                 headers={"Cache-Control": "public, max-age=3600"})

    # -- test controls: objects ---------------------------------------------------------------

    def put(self, resource: str, obj: Mapping[str, Any]) -> JSON:
        """Create or replace any object (ADDED or MODIFIED); returns it as stored."""
        if resource not in RESOURCES:
            raise ValueError(f"resource: {resource!r} is not served by the double")
        return self.store.put(resource, obj)

    def delete(self, resource: str, namespace: str, name: str) -> JSON:
        gone = self.store.remove(resource, namespace, name)
        if gone is None:
            raise KeyError(f"{resource} {namespace}/{name} does not exist")
        return gone

    def add_pod(self, namespace: str, name: str, **fields: Any) -> JSON:
        """Create a pod (see :func:`pod_manifest` for the fields); returns it as stored."""
        if self.store.get("pods", namespace, name) is not None:
            raise ValueError(f"pod {namespace}/{name} already exists")
        return self.store.put("pods", pod_manifest(namespace, name, **fields))

    def pod(self, namespace: str, name: str) -> JSON:
        obj = self.store.get("pods", namespace, name)
        if obj is None:
            raise KeyError(f"pod {namespace}/{name} does not exist")
        return obj

    def update_pod(self, namespace: str, name: str, change: Callable[[JSON], None]) -> JSON:
        """Apply ``change`` to a copy of the pod and store it (a MODIFIED event)."""
        obj = self.pod(namespace, name)
        change(obj)
        return self.store.put("pods", obj)

    def terminate_pod(self, namespace: str, name: str) -> JSON:
        """Graceful deletion begins: deletionTimestamp is set (MODIFIED), the pod stays."""
        def mark(obj: JSON) -> None:
            obj["metadata"]["deletionTimestamp"] = now_rfc3339()
            obj["metadata"]["deletionGracePeriodSeconds"] = 30

        return self.update_pod(namespace, name, mark)

    def delete_pod(self, namespace: str, name: str) -> JSON:
        return self.delete("pods", namespace, name)

    # -- test controls: faults ----------------------------------------------------------------

    @property
    def watch_count(self) -> int:
        return len(self._watches)

    async def wait_for_watches(self, count: int = 1, *, within: float = 5.0) -> None:
        """Wait until at least ``count`` watch streams are open."""
        async with asyncio.timeout(within):
            while len(self._watches) < count:  # noqa: ASYNC110 - polls the handlers' set
                await asyncio.sleep(0.005)

    def drop_watches(self, *, abort: bool = False) -> int:
        """End every open watch: cleanly (``abort=False``, the stream just ends, as at
        ``timeoutSeconds``) or by closing the connection mid-stream. Returns how many."""
        for watch in self._watches:
            watch.watcher.queue.put_nowait(_Control("abort" if abort else "drop"))
        return len(self._watches)

    def send_bookmark(self) -> None:
        """A BOOKMARK at the current resourceVersion on every watch that allows them and
        started below it (the others get nothing, as from the real watch cache)."""
        for watch in self._watches:
            watch.watcher.queue.put_nowait(_Control("bookmark", self.store.rv))

    def send_line(self, data: bytes) -> None:
        """Write ``data`` as it is on every open watch, in order with its events: a
        line a real server would never send (oversized, garbled)."""
        for watch in self._watches:
            watch.watcher.queue.put_nowait(_Control("raw", data=data))

    def compact(self, keep: int = 0) -> None:
        """Forget all but the last ``keep`` events: older resourceVersions are now 410."""
        self.store.compact(keep)

    def set_delay(self, seconds: float, *, path: str | None = None, after: bool = False) -> None:
        """Hold requests (those containing ``path`` in their path and query, when given)
        this long before handling them; ``after=True`` handles them at once and holds
        the answer instead (a slow network). ``set_delay(0)`` removes every delay."""
        if seconds <= 0:
            self._delays.clear()
        else:
            self._delays.append(_Delay(seconds, path, after))

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Writes inside are not sent to open watches (lost events); a new watch or a
        list still sees them."""
        self.store.muted = True
        try:
            yield
        finally:
            self.store.muted = False

    def fail_next(
        self, count: int = 1, status: int = 500, *, method: str | None = None,
        path: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests (matching ``method`` and containing ``path``
        in their path and query, when given) with a Status of ``status``."""
        self._failures.append(_Failure(count, status, method, path))

    async def pause(self) -> None:
        """An outage: open connections are cut and new ones refused until :meth:`resume`."""
        self.drop_watches(abort=True)
        if self._site is not None:
            await self._site.stop()
            self._site = None
        await asyncio.sleep(0)  # let the watch handlers see the abort
        if self._runner is not None and self._runner.server is not None:
            for connection in self._runner.server.connections:
                connection.force_close()

    async def resume(self) -> None:
        """Listen again on the same port."""
        if self._site is None:
            await self._listen()


_AUTHN_V1 = "authentication.k8s.io/v1"


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


async def _object_body(request: web.Request, resource: Resource) -> JSON | web.Response:
    """The JSON object of a create or replace, with apiVersion and kind filled in; or the
    400 Status to answer."""
    try:
        obj = await request.json()
    except ValueError:
        return status_response(400, "BadRequest", "invalid JSON in the request body")
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata", {}), dict):
        return status_response(400, "BadRequest", f"the body is not a {resource.kind}")
    obj.setdefault("apiVersion", resource.group_version)
    obj.setdefault("kind", resource.kind)
    return obj


def _not_found(resource: Resource, name: str) -> web.Response:
    return status_response(404, "NotFound", f'{resource.plural} "{name}" not found',
                           name=name, kind=resource.plural)


def _encode_continue(rv: int, key: tuple[str, str]) -> str:
    raw = json.dumps({"rv": rv, "start": list(key)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_continue(token: str) -> tuple[int, tuple[str, str]]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        rv, (namespace, name) = int(data["rv"]), data["start"]
    except (binascii.Error, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError("invalid continue token") from exc
    return rv, (str(namespace), str(name))


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes a member)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: JSON, operations: list[Any]) -> JSON:
    """RFC 6902 JSON patch: add, replace, remove and test."""
    doc = copy.deepcopy(target)
    for op in operations:
        *parents, last = [p.replace("~1", "/").replace("~0", "~")
                          for p in op["path"].split("/")[1:]]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if kind == "test":
            current = node[int(last)] if isinstance(node, list) else node[last]
            if current != op["value"]:
                raise ValueError(f"test failed at {op['path']}")
        elif kind == "remove":
            del node[int(last) if isinstance(node, list) else last]
        elif kind in ("add", "replace"):
            if isinstance(node, list):
                index = len(node) if last == "-" else int(last)
                if kind == "add":
                    node.insert(index, op["value"])
                else:
                    node[index] = op["value"]
            else:
                if kind == "replace" and last not in node:
                    raise KeyError(last)
                node[last] = op["value"]
        else:
            raise ValueError(f"unsupported op {kind!r}")
    return doc


__all__ = [
    "CONFIGMAPS",
    "PODS",
    "RESOURCES",
    "KubeAPIServer",
    "Recorded",
    "json_patch",
    "merge_patch",
    "pod_manifest",
    "status_body",
]
