"""Lease-based leader election, the way client-go's ``leaderelection`` does it.

Every replica loads the policies; only one at a time writes the ConfigMaps' status
back. Who that is lives in one ``coordination.k8s.io/v1`` Lease:

    candidate ──GET──▶ no Lease ──create──────────────────────────▶ leader
        │              held by another, not expired ──▶ retry after retryPeriod (jittered)
        │              ours, free, or expired ──PUT (resourceVersion)──▶ leader
        ▼                                   409 Conflict: someone else won ──▶ retry
    leader: renew (PUT) every retryPeriod; no success for renewDeadline ──▶ step down

Expiry is judged on our own clock, as client-go does: a Lease is expired when its
record has not changed for ``leaseDurationSeconds`` since *we* saw it change, so
the replicas' wall clocks never need to agree. ``renewDeadline < leaseDuration``
means a leader that cannot renew steps down before anyone else may take over;
:attr:`LeaderElector.is_leader` also turns False on its own once the last renewal
is older than the renew deadline (a stalled event loop cannot keep writing).

Testable in one step: :meth:`LeaderElector.try_acquire_or_renew` is one attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

from identityd.kubeapi import JSONObject, KubeAPIError, KubeConnection, LeasesAPI

__all__ = [
    "DEFAULT_LEASE_DURATION_SECONDS",
    "DEFAULT_RENEW_DEADLINE_SECONDS",
    "DEFAULT_RETRY_PERIOD_SECONDS",
    "LeaderElectionSettings",
    "LeaderElector",
    "new_identity",
]

log = logging.getLogger(__name__)

# client-go's defaults (and kube-controller-manager's): a crashed leader is replaced
# within ~15-17 s; a leader that cannot reach the API server stops writing after 10 s.
DEFAULT_LEASE_DURATION_SECONDS = 15.0
DEFAULT_RENEW_DEADLINE_SECONDS = 10.0
DEFAULT_RETRY_PERIOD_SECONDS = 2.0
# client-go's JitterFactor: a candidate waits retryPeriod * (1 + up to 1.2) between
# attempts, so replicas started together do not ask in step.
JITTER_FACTOR = 1.2
# One GET/create/replace of the Lease (while leading, also bounded by the deadline).
DEFAULT_REQUEST_TIMEOUT_SECONDS = 5.0

_LEASE_API_VERSION = "coordination.k8s.io/v1"


def new_identity(pod_name: str | None = None) -> str:
    """``<pod name>_<random uuid>``: unique even when a pod restarts under its name
    (the old process's Lease must not look like ours). The host name without a pod name."""
    return f"{pod_name or socket.gethostname()}_{uuid.uuid4()}"


@dataclass(frozen=True)
class LeaderElectionSettings:
    """Which Lease, who we are, and client-go's three timings."""

    name: str
    namespace: str
    identity: str
    lease_duration_seconds: float = DEFAULT_LEASE_DURATION_SECONDS
    renew_deadline_seconds: float = DEFAULT_RENEW_DEADLINE_SECONDS
    retry_period_seconds: float = DEFAULT_RETRY_PERIOD_SECONDS
    request_timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        for name in ("name", "namespace", "identity"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected str, got {type(value).__name__}")
            if not value:
                raise ValueError(f"{name}: must not be empty")
        for name in (
            "lease_duration_seconds",
            "renew_deadline_seconds",
            "retry_period_seconds",
            "request_timeout_seconds",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name}: expected seconds as a number, got {type(value).__name__}")
            if not value > 0:
                raise ValueError(f"{name}: must be positive, got {value!r}")
        # client-go's own checks: otherwise two leaders can overlap.
        if not self.lease_duration_seconds > self.renew_deadline_seconds:
            raise ValueError("lease_duration_seconds: must be greater than renew_deadline_seconds")
        if not self.renew_deadline_seconds > JITTER_FACTOR * self.retry_period_seconds:
            raise ValueError(
                f"renew_deadline_seconds: must be greater than {JITTER_FACTOR} x "
                "retry_period_seconds"
            )

    @property
    def lease_duration_whole_seconds(self) -> int:
        """``spec.leaseDurationSeconds`` is an integer; never round a lease down."""
        return max(1, math.ceil(self.lease_duration_seconds))


def _micro_time(moment: datetime) -> str:
    """A MicroTime, as Kubernetes writes ``acquireTime``/``renewTime``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaigns for the Lease in the background once started; see the module docstring.

    ``subscribe(callback)``: ``callback(True)`` on becoming leader, ``callback(False)``
    on stepping down (renewal failed, or closed). ``aclose(release=True)`` hands the
    Lease back so another replica takes over at once; ``release=False`` leaves it to
    expire (what a crash does)."""

    def __init__(
        self,
        connection: KubeConnection | None,
        settings: LeaderElectionSettings,
        *,
        api: LeasesAPI | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
    ) -> None:
        if connection is None and api is None:
            raise ValueError("connection: required unless an api is given")
        self._connection = connection
        self._settings = settings
        self._api = api
        self._owns_api = api is None
        self._clock = clock
        self._wall = wall_clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._callbacks: list[Callable[[bool], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._leading = False
        self._renewed_at = -math.inf  # clock() of our last successful create/replace
        self._observed_spec: JSONObject | None = None
        self._observed_at = -math.inf  # clock() when the Lease's spec last changed
        self.transitions = 0  # times this elector became leader

    # -- state --------------------------------------------------------------------------------

    @property
    def identity(self) -> str:
        return self._settings.identity

    @property
    def is_leader(self) -> bool:
        """Leading, and renewed recently enough that no one else can have taken over."""
        return self._leading and (
            self._clock() - self._renewed_at < self._settings.renew_deadline_seconds
        )

    @property
    def observed_holder(self) -> str | None:
        """The holder the Lease named when last read (None before the first read)."""
        if self._observed_spec is None:
            return None
        return str(self._observed_spec.get("holderIdentity") or "")

    def subscribe(self, callback: Callable[[bool], None]) -> None:
        self._callbacks.append(callback)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Campaign in the background (idempotent)."""
        if self._task is not None:
            return
        if self._api is None:
            if self._connection is None:
                raise ValueError("connection: required unless an api is given")
            self._api = await LeasesAPI.connect(self._connection)
        self._task = asyncio.create_task(self._run(), name="identityd-leader-election")
        self._task.add_done_callback(_log_crash)

    async def aclose(self, *, release: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._leading:
            if release:
                await self._release()
            self._set_leading(False)
        if self._owns_api and self._api is not None:
            await self._api.aclose()
            self._api = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the campaign -------------------------------------------------------------------------

    async def _run(self) -> None:
        s = self._settings
        while True:
            await self._acquire()
            log.info("leader election: %s now holds lease %s/%s", s.identity, s.namespace, s.name)
            self._set_leading(True)
            await self._renew_until_lost()
            log.warning(
                "leader election: %s lost lease %s/%s (no renewal within %.0fs)",
                s.identity,
                s.namespace,
                s.name,
                s.renew_deadline_seconds,
            )
            self._set_leading(False)

    async def _acquire(self) -> None:
        s = self._settings
        while True:
            if await self._attempt(s.request_timeout_seconds):
                return
            await asyncio.sleep(s.retry_period_seconds * (1 + JITTER_FACTOR * self._rng.random()))

    async def _renew_until_lost(self) -> None:
        s = self._settings
        while True:
            await asyncio.sleep(s.retry_period_seconds)
            deadline = self._renewed_at + s.renew_deadline_seconds
            while True:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return
                if await self._attempt(min(s.request_timeout_seconds, remaining)):
                    break
                await asyncio.sleep(min(s.retry_period_seconds, max(0.0, deadline - self._clock())))

    async def _attempt(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                return await self.try_acquire_or_renew()
        except (KubeAPIError, TimeoutError) as exc:
            log.info("leader election: attempt failed: %s", exc if str(exc) else "timed out")
            return False

    async def try_acquire_or_renew(self) -> bool:
        """One attempt: True when we hold the Lease afterwards. A lost race (409) is
        False; an API failure raises KubeAPIError."""
        s = self._settings
        api = self._require_api()
        now = self._wall()
        lease = await api.get(s.namespace, s.name, request_timeout=s.request_timeout_seconds)
        if lease is None:
            body = self._lease(
                None,
                {
                    "holderIdentity": s.identity,
                    "leaseDurationSeconds": s.lease_duration_whole_seconds,
                    "acquireTime": _micro_time(now),
                    "renewTime": _micro_time(now),
                    "leaseTransitions": 0,
                },
            )
            try:
                created = await api.create(
                    s.namespace, body, request_timeout=s.request_timeout_seconds
                )
            except KubeAPIError as exc:
                if exc.status == 409:  # AlreadyExists: another replica created it first
                    return False
                raise
            self._won(created)
            return True
        spec = lease.get("spec")
        spec = dict(spec) if isinstance(spec, dict) else {}
        self._observe(spec)
        holder = str(spec.get("holderIdentity") or "")
        if holder and holder != s.identity and self._still_held(spec):
            return False
        transitions = spec.get("leaseTransitions")
        transitions = transitions if isinstance(transitions, int) else 0
        update = {
            "holderIdentity": s.identity,
            "leaseDurationSeconds": s.lease_duration_whole_seconds,
            "renewTime": _micro_time(now),
        }
        if holder == s.identity and spec.get("acquireTime"):
            update["acquireTime"] = spec["acquireTime"]
            update["leaseTransitions"] = transitions
        else:
            update["acquireTime"] = _micro_time(now)
            update["leaseTransitions"] = transitions + 1 if holder else transitions
        try:
            replaced = await api.replace(
                s.namespace,
                s.name,
                self._lease(lease, spec | update),
                request_timeout=s.request_timeout_seconds,
            )
        except KubeAPIError as exc:
            if exc.status == 409:  # Conflict: the Lease changed since our GET
                return False
            raise
        self._won(replaced)
        return True

    def _lease(self, current: JSONObject | None, spec: JSONObject) -> JSONObject:
        s = self._settings
        meta: JSONObject = {"name": s.name, "namespace": s.namespace}
        if current is not None:
            old = current.get("metadata")
            if isinstance(old, dict):
                meta = dict(old) | meta  # keep labels, uid; resourceVersion = the precondition
        return {"apiVersion": _LEASE_API_VERSION, "kind": "Lease", "metadata": meta, "spec": spec}

    def _observe(self, spec: JSONObject) -> None:
        if spec != self._observed_spec:
            self._observed_spec = spec
            self._observed_at = self._clock()

    def _still_held(self, spec: JSONObject) -> bool:
        duration = spec.get("leaseDurationSeconds")
        seconds = (
            duration
            if isinstance(duration, int) and not isinstance(duration, bool) and duration > 0
            else self._settings.lease_duration_whole_seconds
        )
        return self._observed_at + seconds > self._clock()

    def _won(self, lease: JSONObject) -> None:
        spec = lease.get("spec")
        self._observe(dict(spec) if isinstance(spec, dict) else {})
        self._renewed_at = self._clock()

    async def _release(self) -> None:
        """Hand the Lease back (holder emptied), as client-go's ReleaseOnCancel does."""
        s = self._settings
        api = self._api
        if api is None:
            return
        try:
            async with asyncio.timeout(s.request_timeout_seconds):
                lease = await api.get(
                    s.namespace, s.name, request_timeout=s.request_timeout_seconds
                )
                spec = lease.get("spec") if lease is not None else None
                if lease is None or not isinstance(spec, dict):
                    return
                if spec.get("holderIdentity") != s.identity:
                    return
                now = _micro_time(self._wall())
                released = spec | {
                    "holderIdentity": "",
                    "leaseDurationSeconds": 1,
                    "acquireTime": now,
                    "renewTime": now,
                }
                await api.replace(
                    s.namespace,
                    s.name,
                    self._lease(lease, released),
                    request_timeout=s.request_timeout_seconds,
                )
        except (KubeAPIError, TimeoutError) as exc:
            log.warning(
                "leader election: could not release lease %s/%s: %s", s.namespace, s.name, exc
            )

    def _set_leading(self, leading: bool) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        if leading:
            self.transitions += 1
        for callback in list(self._callbacks):
            # A subscriber is an edge (it starts status writes): its failure must not
            # stop the campaign.
            try:
                callback(leading)
            except Exception:
                log.exception("leader election: a subscriber failed")

    def _require_api(self) -> LeasesAPI:
        if self._api is None:
            raise RuntimeError("LeaderElector is not started")
        return self._api


def _log_crash(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("leader election stopped", exc_info=task.exception())
