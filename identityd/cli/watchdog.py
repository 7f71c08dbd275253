"""A watchdog that ends a worker whose event loop has stopped turning.

The embedded engine evaluates in-line and a native call cannot be interrupted,
so a runaway evaluation (or any other blocking bug) would hold a worker forever
while its accepted connections wait. A heartbeat task stamps the time on every
turn of the loop it runs on; a daemon thread, which still runs while the loop's
thread is inside native code, ends the process when the stamp is older than the
stall limit. The supervisor then starts a fresh worker while the others serve
(with ``--workers 1`` the container's restart policy does). Like gunicorn's
worker timeout: nothing in flight on that worker is answered, and the CA's
connection fails, which ZTS treats as a refusal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("identityd.watchdog")

# Exit status of a worker ended by the watchdog (EX_SOFTWARE).
EXIT_STALLED = 70
# Floor of the stall limit: well above a policy compile (~25 ms for the default
# set, seconds for a very large one), which also runs on the loop.
MIN_STALL_SECONDS = 2.0
# A decision that overran its timeout by this factor is no longer "slow".
STALL_TIMEOUT_FACTOR = 5.0


def stall_limit(decision_timeout: float) -> float:
    """How long a worker's loop may stand still before the watchdog ends it."""
    return max(MIN_STALL_SECONDS, STALL_TIMEOUT_FACTOR * decision_timeout)


def _exit_now() -> None:
    os._exit(EXIT_STALLED)  # from a thread, with the loop's thread in native code


class LoopWatchdog:
    """Call ``on_stall`` (default: exit the process) once the loop stalls."""

    def __init__(
        self,
        stall_seconds: float,
        *,
        on_stall: Callable[[], None] = _exit_now,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not stall_seconds > 0:
            raise ValueError(f"stall_seconds: must be positive, got {stall_seconds!r}")
        self._stall = stall_seconds
        self._on_stall = on_stall
        self._clock = clock
        # Both sides only read or replace a float: no lock needed.
        self._beat = clock()
        self._period = min(0.25, stall_seconds / 4)
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None

    async def __aenter__(self) -> LoopWatchdog:
        self._beat = self._clock()
        self._task = asyncio.create_task(self._heartbeat(), name="watchdog-heartbeat")
        self._thread = threading.Thread(target=self._watch, name="identityd-watchdog", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._thread is not None:
            self._thread.join()  # at once: the stop event wakes it

    async def _heartbeat(self) -> None:
        while True:
            self._beat = self._clock()
            await asyncio.sleep(self._period)

    def _watch(self) -> None:
        while not self._stop.wait(self._period):
            stalled = self._clock() - self._beat
            if stalled > self._stall:
                log.critical(
                    "worker %d: event loop stalled for %.1f s (limit %.1f s): ending it",
                    os.getpid(),
                    stalled,
                    self._stall,
                )
                self._on_stall()
                return
