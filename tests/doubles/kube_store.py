"""The state behind the API-server double: objects, one resourceVersion counter, an event log.

Objects of every resource live in one store keyed by (resource, namespace, name),
as etcd keeps them under ``/registry/<resource>/<namespace>/<name>``. Every
write takes the next value of one global resourceVersion and appends an event
to a bounded log (the watch-cache window). A watch or a paged list from a
resourceVersion older than the window is answered ``410 Gone``/``Expired``, as
the real API server does after compaction. A paged list is a consistent
snapshot at its first page's resourceVersion: later pages undo the events
written since (that is why the log keeps each event's previous object).

Each object is kept as its dict and its serialised bytes, so a 100k-object
list costs a join, not a ``json.dumps`` per object per request.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import heapq
import json
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt

from identityd.keys.issuer import TokenIssuer

JSON = dict[str, Any]
Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects
Predicate = Callable[[JSON], bool]


class Expired(Exception):
    """A resourceVersion (watch start, or a continue token's) is older than the log."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {requested} ({oldest})")
        self.requested, self.oldest = requested, oldest


@dataclass(frozen=True)
class Resource:
    """One REST resource: where it is served and what it is called."""

    plural: str
    kind: str
    group_version: str = "v1"
    namespaced: bool = True

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


# Leader election's Lease (namespaced): served with GET, create (POST) and replace (PUT,
# ``metadata.resourceVersion`` a precondition) by the API-server double.
LEASES = Resource("leases", "Lease", "coordination.k8s.io/v1")


@dataclass(frozen=True, slots=True)
class Stored:
    obj: JSON
    raw: bytes

    @staticmethod
    def of(obj: JSON) -> Stored:
        return Stored(obj, json.dumps(obj, separators=(",", ":")).encode())


@dataclass(frozen=True, slots=True)
class Event:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    resource: str
    key: Key
    new: Stored  # for DELETED: the object as it was deleted (with the delete's RV)
    prev: Stored | None  # the object before this event; None for ADDED


@dataclass(eq=False)
class Watcher:
    """One open watch: what it selects, and where its lines go."""

    resource: str
    namespace: str | None
    predicate: Predicate
    # Event lines (bytes), and whatever control items the HTTP layer puts in.
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)

    def offer(self, event: Event) -> None:
        line = event_line(event, self)
        if line is not None:
            self.queue.put_nowait(line)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_line(event: Event, watcher: Watcher) -> bytes | None:
    """The watch line this watcher sees for the event, or None.

    With a selector, an object that starts matching arrives as ADDED and one that
    stops matching as DELETED, as the API server's watch cache does it."""
    if event.resource != watcher.resource:
        return None
    if watcher.namespace is not None and event.key[0] != watcher.namespace:
        return None
    now_in = watcher.predicate(event.new.obj)
    if event.type == "MODIFIED":
        was_in = event.prev is not None and watcher.predicate(event.prev.obj)
        kind = {(True, True): "MODIFIED", (False, True): "ADDED", (True, False): "DELETED"}.get(
            (was_in, now_in)
        )
        if kind is None:
            return None
        return watch_line(kind, event.new.raw)
    return watch_line(event.type, event.new.raw) if now_in else None


def watch_line(kind: str, raw: bytes) -> bytes:
    return b'{"type":"' + kind.encode() + b'","object":' + raw + b"}\n"


class ObjectStore:
    """Objects of all resources, the shared resourceVersion, the event log, the watchers."""

    def __init__(self, *, history: int = 10_000, first_rv: int = 1000) -> None:
        if history < 0:
            raise ValueError(f"history: expected >= 0, got {history}")
        self._history = history
        self._rv = first_rv
        self._compacted = first_rv  # watches from below this are 410; == rv: nothing kept
        self._objects: dict[str, dict[Key, Stored]] = {}
        self._keys: dict[str, list[Key]] = {}  # sorted, for paging in etcd key order
        self._log: deque[Event] = deque()
        self.watchers: set[Watcher] = set()
        # Writes while muted are logged but not sent to open watches: events "lost" in
        # flight, the drift a periodic relist must repair. A new watch still sees them.
        self.muted = False

    @property
    def rv(self) -> int:
        return self._rv

    @property
    def oldest_rv(self) -> int:
        """The oldest resourceVersion a watch or continue token may still start from."""
        return self._compacted

    # -- writes -------------------------------------------------------------------------------

    def put(self, resource: str, obj: Mapping[str, Any], *, owned: bool = False) -> JSON:
        """Create or replace; fills uid, creationTimestamp, resourceVersion. Returns a copy.

        ``owned=True`` (bulk loads, benchmarks): the store keeps ``obj`` itself, fills
        it in place and returns it; the caller must not change it afterwards."""
        new = dict(obj) if owned else copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        key = (meta.get("namespace", ""), meta["name"])
        objects = self._objects.setdefault(resource, {})
        prev = objects.get(key)
        if prev is None:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now_rfc3339())
            keys = self._keys.setdefault(resource, [])
            bisect.insort(keys, key)
        else:
            meta["uid"] = prev.obj["metadata"]["uid"]  # a uid never changes
            meta.setdefault("creationTimestamp", prev.obj["metadata"].get("creationTimestamp"))
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        stored = Stored.of(new)
        objects[key] = stored
        self._append(Event(self._rv, "ADDED" if prev is None else "MODIFIED", resource, key,
                           stored, prev))
        return new if owned else copy.deepcopy(new)

    def remove(self, resource: str, namespace: str, name: str) -> JSON | None:
        key = (namespace, name)
        prev = self._objects.get(resource, {}).pop(key, None)
        if prev is None:
            return None
        keys = self._keys[resource]
        del keys[bisect.bisect_left(keys, key)]
        self._rv += 1
        gone = copy.deepcopy(prev.obj)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        self._append(Event(self._rv, "DELETED", resource, key, Stored.of(gone), prev))
        return gone

    def compact(self, keep: int = 0) -> None:
        """Forget all but the last ``keep`` events: older resourceVersions answer 410."""
        while len(self._log) > keep:
            self._compacted = self._log.popleft().rv
        if not self._log:
            self._compacted = self._rv

    def _append(self, event: Event) -> None:
        self._log.append(event)
        self.compact(self._history)
        if not self.muted:
            for watcher in list(self.watchers):
                watcher.offer(event)

    # -- reads --------------------------------------------------------------------------------

    def get(self, resource: str, namespace: str, name: str) -> JSON | None:
        stored = self._objects.get(resource, {}).get((namespace, name))
        return copy.deepcopy(stored.obj) if stored is not None else None

    def count(self, resource: str) -> int:
        return len(self._objects.get(resource, {}))

    def events_after(self, rv: int) -> list[Event]:
        """Events with a resourceVersion above ``rv``; Expired when some were compacted."""
        if rv < self._compacted:
            raise Expired(rv, self._compacted)
        # The log is in RV order; count back from the end (watches start near it).
        start = len(self._log)
        while start > 0 and self._log[start - 1].rv > rv:
            start -= 1
        return [self._log[index] for index in range(start, len(self._log))]

    def page(
        self,
        resource: str,
        namespace: str | None,
        predicate: Predicate,
        *,
        at_rv: int,
        after: Key | None,
        limit: int,
    ) -> tuple[list[bytes], Key | None]:
        """Up to ``limit`` (0 = all) matching objects after key ``after`` as of ``at_rv``.

        Returns their bytes and the last key examined when more may follow."""
        current = self._objects.get(resource, {})
        # State at at_rv = current state with the later events undone (earliest wins).
        undo: dict[Key, Stored | None] = {}
        for event in reversed(self.events_after(at_rv)):
            if event.resource == resource:
                undo[event.key] = event.prev
        keys = self._keys.get(resource, [])
        if after is not None:
            index = bisect.bisect_right(keys, after)
        elif namespace is not None:
            index = bisect.bisect_left(keys, (namespace, ""))
        else:
            index = 0
        extra = sorted(k for k in undo if k not in current and (after is None or k > after))
        merged = heapq.merge((keys[i] for i in range(index, len(keys))), extra)
        items: list[bytes] = []
        last: Key | None = None
        for key in merged:
            if namespace is not None and key[0] != namespace:
                if key[0] > namespace:
                    break
                continue
            stored = undo[key] if key in undo else current.get(key)
            if stored is None or not predicate(stored.obj):
                continue
            if limit and len(items) == limit:
                return items, last  # one more matches: the list continues
            items.append(stored.raw)
            last = key
        return items, None


# -- selectors ---------------------------------------------------------------------------------

_TERM_SPLIT = re.compile(r",(?![^()]*\))")
_SET_TERM = re.compile(r"^\s*([^\s!=()]+)\s+(in|notin)\s+\(([^()]*)\)\s*$")
_OP_TERM = re.compile(r"^\s*([^\s!=()]+)\s*(==|!=|=)\s*([^\s!=()]*)\s*$")
_EXISTS_TERM = re.compile(r"^\s*(!?)([^\s!=()]+)\s*$")


def label_predicate(selector: str) -> Predicate:
    """A labelSelector (equality, ``!=``, ``in``/``notin``, exists, ``!``) as a predicate."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for term in _TERM_SPLIT.split(selector) if selector.strip() else []:
        checks.append(_label_check(term))

    def matches(obj: JSON) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(check(labels) for check in checks)

    return matches


def _label_check(term: str) -> Callable[[Mapping[str, str]], bool]:
    if m := _SET_TERM.match(term):
        key, op, values = m[1], m[2], {v.strip() for v in m[3].split(",") if v.strip()}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if m := _OP_TERM.match(term):
        key, op, value = m[1], m[2], m[3]
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if m := _EXISTS_TERM.match(term):
        negate, key = m[1] == "!", m[2]
        return lambda labels: (key in labels) != negate
    raise ValueError(f"unable to parse requirement: {term!r}")


_FIELDS = {"metadata.name", "metadata.namespace"}


def field_predicate(selector: str) -> Predicate:
    """A fieldSelector over metadata.name / metadata.namespace (``=``, ``==``, ``!=``)."""
    checks: list[tuple[list[str], bool, str]] = []
    for term in selector.split(",") if selector.strip() else []:
        m = _OP_TERM.match(term)
        if m is None or m[1] not in _FIELDS:
            raise ValueError(f"field label not supported: {term!r}")
        checks.append((m[1].split("."), m[2] != "!=", m[3]))

    def matches(obj: JSON) -> bool:
        for path, equal, value in checks:
            node: Any = obj
            for part in path:
                node = node.get(part, {}) if isinstance(node, dict) else {}
            if (node == value) != equal:
                return False
        return True

    return matches


# -- service-account tokens: what TokenRequest, TokenReview and the OIDC endpoints serve ---------

DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# go-jose's jwt.DefaultLeeway: the API server checks token times, and "deleted before now",
# with this much slack.
TOKEN_LEEWAY_SECONDS = 60
MIN_TOKEN_SECONDS = 600  # TokenRequest refuses less than 10 minutes
MAX_TOKEN_SECONDS = 2**32
DEFAULT_TOKEN_SECONDS = 3600
EXTRA = "authentication.kubernetes.io/"
_INVALIDATED = "service account token has been invalidated"


class TokenRefused(Exception):
    """A TokenRequest the API server refuses: the Status it answers with."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class TokenAuthority:
    """The API server's service-account token signer and authenticator, over the store's pods.

    Signs bound tokens with a :class:`TokenIssuer` (made on first use: RSA keys take a
    while), in the claim format of ``pkg/serviceaccount/claims.go``, and authenticates
    them as the TokenReview API does: issuer, signature (any key still published), the
    audiences intersected with the requested ones, times with the API server's 60 s
    leeway, and the bound pod (gone, deleted more than 60 s ago, or another uid:
    invalidated). Service accounts are implicit: every name exists, with a uid that is
    stable per namespace/name. ``clock`` is the API server's wall clock (tests move it).

    Test controls: :meth:`rotate`, :attr:`ignore_audiences` (answer as an API server that
    authenticates against its own audiences, not the requested ones), :attr:`tamper`
    (edit each TokenReview status before it is sent, to play a lying API server).
    """

    def __init__(
        self,
        store: ObjectStore,
        issuer: str = DEFAULT_ISSUER,
        *,
        api_audiences: Sequence[str] | None = None,
        key_type: str = "RSA",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.issuer = issuer
        self.api_audiences = list(api_audiences or [issuer])
        self.clock = clock
        self.ignore_audiences = False
        self.tamper: Callable[[JSON], None] | None = None
        self._key_type = key_type
        self._signer: TokenIssuer | None = None

    @property
    def signer(self) -> TokenIssuer:
        if self._signer is None:
            self._signer = TokenIssuer(self.issuer, key_type=self._key_type)
        return self._signer

    def rotate(self, *, keep_old: bool = True) -> str:
        """Sign with a new key from now on; the old one stays published unless
        ``keep_old=False`` (its tokens then fail). Returns the new kid."""
        kid = self.signer.rotate()
        if not keep_old:
            self.signer.drop_old()
        return kid

    def jwks(self) -> JSON:
        return dict(self.signer.jwks())

    def discovery(self, jwks_uri: str) -> JSON:
        """``/.well-known/openid-configuration`` as the API server writes it; ``jwks_uri``
        is on its external address (or ``--service-account-jwks-uri``)."""
        return {"issuer": self.issuer, "jwks_uri": jwks_uri,
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": [self.signer.alg]}

    def account_uid(self, namespace: str, name: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.issuer}/sa/{namespace}/{name}"))

    def node_uid(self, name: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.issuer}/node/{name}"))

    # -- TokenRequest ---------------------------------------------------------------------------

    def request_token(self, namespace: str, account: str, spec: Mapping[str, Any]) -> JSON:
        """The ``spec`` and ``status`` of an answered TokenRequest; TokenRefused otherwise."""
        audiences = spec.get("audiences") or self.api_audiences
        if not isinstance(audiences, list) or not all(isinstance(a, str) and a
                                                      for a in audiences):
            raise TokenRefused(422, "Invalid", "spec.audiences: Invalid value: must be a "
                               "list of non-empty strings")
        seconds = spec.get("expirationSeconds", DEFAULT_TOKEN_SECONDS)
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            raise TokenRefused(400, "BadRequest", "spec.expirationSeconds: not an integer")
        if seconds < MIN_TOKEN_SECONDS:
            raise TokenRefused(422, "Invalid", f"spec.expirationSeconds: Invalid value: "
                               f"{seconds}: may not specify a duration less than 10 minutes")
        if seconds > MAX_TOKEN_SECONDS:
            raise TokenRefused(422, "Invalid", f"spec.expirationSeconds: Invalid value: "
                               f"{seconds}: may not specify a duration larger than 2^32 seconds")
        ref = spec.get("boundObjectRef")
        now = int(self.clock())
        args: dict[str, Any] = {"audiences": audiences, "now": now, "lifetime": seconds,
                                "sa_uid": self.account_uid(namespace, account)}
        if ref:
            pod = self._bound_pod(namespace, account, ref)
            meta = pod["metadata"]
            node = pod.get("spec", {}).get("nodeName")
            if node:
                args |= {"node_name": node, "node_uid": self.node_uid(node)}
            token = self.signer.mint(namespace, account, meta["name"], meta["uid"], **args)
        else:  # not bound to an object: only namespace and service account
            unbound = {"namespace": namespace, "serviceaccount": {
                "name": account, "uid": args["sa_uid"]}}
            token = self.signer.mint(namespace, account, "-", "-", **args,
                                     claims_override={"kubernetes.io": unbound})
        expires = datetime.fromtimestamp(now + seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        answered: JSON = {"audiences": audiences, "expirationSeconds": seconds}
        if ref:
            answered["boundObjectRef"] = dict(ref)
        return {"spec": answered, "status": {"token": token, "expirationTimestamp": expires}}

    def _bound_pod(self, namespace: str, account: str, ref: object) -> JSON:
        if not isinstance(ref, Mapping):
            raise TokenRefused(400, "BadRequest", "spec.boundObjectRef: not an object")
        kind, name = ref.get("kind"), ref.get("name")
        if kind != "Pod":  # Secret and Node bindings exist too; the double has neither
            raise TokenRefused(400, "BadRequest", f"cannot bind token for serviceaccount "
                               f"{account!r} to object of type {kind!r}")
        pod = self.store.get("pods", namespace, name) if isinstance(name, str) else None
        if pod is None:
            raise TokenRefused(404, "NotFound", f'pods "{name}" not found')
        if pod.get("spec", {}).get("serviceAccountName") != account:
            raise TokenRefused(400, "BadRequest", f'cannot bind token for serviceaccount '
                               f'"{account}" to pod running with different serviceaccount name.')
        uid = ref.get("uid")
        if uid and uid != pod["metadata"]["uid"]:
            raise TokenRefused(409, "Conflict", f'Operation cannot be fulfilled on Pod "{name}": '
                               f"the UID in the bound object reference ({uid}) does not match "
                               "the UID in record. The object might have been deleted and then "
                               "recreated")
        return pod

    # -- TokenReview ----------------------------------------------------------------------------

    def review(self, token: str, audiences: Sequence[str]) -> JSON:
        """The ``status`` of a TokenReview of ``token`` for ``audiences`` (empty: the API
        server's own), as ``pkg/registry/authentication/tokenreview`` fills it."""
        requested = list(self.api_audiences if self.ignore_audiences or not audiences
                         else audiences)
        try:
            user, granted = self._authenticate(token, requested)
        except _NotAuthenticated as exc:
            status: JSON = {"user": {}, "error": str(exc)}
        else:
            status = {"authenticated": True, "user": user, "audiences": granted}
        if self.tamper is not None:
            self.tamper(status)
        return status

    def _authenticate(self, token: str, requested: list[str]) -> tuple[JSON, list[str]]:
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            unverified = None
        if not isinstance(unverified, dict) or unverified.get("iss") != self.issuer:
            raise _NotAuthenticated("invalid bearer token")  # not ours: no authenticator
        claims = self._signed_claims(token)
        audience = claims.get("aud")
        token_auds = [audience] if isinstance(audience, str) else list(audience or [])
        granted = [a for a in token_auds if a in requested]
        if not granted:
            raise _NotAuthenticated(f"[invalid bearer token, token audiences {_go_q(token_auds)} "
                                    f"is invalid for the target audiences {_go_q(requested)}]")
        now = self.clock()
        if now > claims.get("exp", 0) + TOKEN_LEEWAY_SECONDS:
            raise _NotAuthenticated("[invalid bearer token, service account token has expired]")
        if now < claims.get("nbf", 0) - TOKEN_LEEWAY_SECONDS:
            raise _NotAuthenticated("[invalid bearer token, service account token is not "
                                    "valid yet]")
        k8s = claims.get("kubernetes.io") or {}
        namespace = k8s.get("namespace", "")
        account = k8s.get("serviceaccount") or {}
        if account.get("uid") != self.account_uid(namespace, account.get("name", "")):
            raise _NotAuthenticated(f"[invalid bearer token, service account UID does not "
                                    f"match claim ({account.get('uid')})]")
        extra: dict[str, list[str]] = {}
        pod_ref = k8s.get("pod")
        if pod_ref:
            pod = self.store.get("pods", namespace, pod_ref.get("name", ""))
            if pod is None or _deleted_before(pod, now - TOKEN_LEEWAY_SECONDS):
                raise _NotAuthenticated(f"[invalid bearer token, {_INVALIDATED}]")
            if pod["metadata"]["uid"] != pod_ref.get("uid"):
                raise _NotAuthenticated(
                    f"[invalid bearer token, pod UID ({pod['metadata']['uid']}) does not match "
                    f"service account pod ref claim ({pod_ref.get('uid')})]")
            extra[EXTRA + "pod-name"] = [pod_ref["name"]]
            extra[EXTRA + "pod-uid"] = [pod_ref["uid"]]
        if claims.get("jti"):
            extra[EXTRA + "credential-id"] = [f"JTI={claims['jti']}"]
        node = k8s.get("node")
        if node:  # ServiceAccountTokenPodNodeInfo (beta 1.30, GA 1.32)
            extra[EXTRA + "node-name"] = [node["name"]]
            if node.get("uid"):
                extra[EXTRA + "node-uid"] = [node["uid"]]
        user: JSON = {
            "username": f"system:serviceaccount:{namespace}:{account.get('name', '')}",
            "uid": account["uid"],
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                       "system:authenticated"],
        }
        if extra:
            user["extra"] = extra
        return user, granted

    def _signed_claims(self, token: str) -> JSON:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise _NotAuthenticated("invalid bearer token") from exc
        keys = [key for key in self.jwks()["keys"] if not kid or key.get("kid") == kid]
        if not keys:
            raise _NotAuthenticated("[invalid bearer token, invalid signature, no keys found]")
        for key in keys:
            try:
                claims: JSON = jwt.decode(token, jwt.PyJWK(key).key, algorithms=[key["alg"]],
                                          options=_SIGNATURE_ONLY)
            except jwt.PyJWTError:
                continue
            return claims
        raise _NotAuthenticated("[invalid bearer token, square/go-jose: error in cryptographic "
                                "primitive]")


class _NotAuthenticated(Exception):
    """``status.error`` of a TokenReview that did not authenticate."""


_SIGNATURE_ONLY: Any = {"verify_signature": True, "verify_exp": False, "verify_nbf": False,
                        "verify_iat": False, "verify_aud": False, "verify_iss": False}


def _deleted_before(obj: JSON, cutoff: float) -> bool:
    stamp = obj.get("metadata", {}).get("deletionTimestamp")
    if not stamp:
        return False
    deleted = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    return deleted < cutoff


def _go_q(values: Sequence[str]) -> str:
    """A string slice as Go's ``%q`` prints it: ``["a" "b"]``."""
    return "[" + " ".join(json.dumps(v) for v in values) + "]"
