"""The loop watchdog: a worker whose event loop stalls is ended (in-process here
with a recording callback; tests/cli/test_serve_workers.py shows the supervisor
replacing a worker wedged by a runaway policy)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from identityd.cli.watchdog import MIN_STALL_SECONDS, LoopWatchdog, stall_limit


def hold_the_loop(seconds: float) -> None:
    """What a native evaluation does to the loop's thread: no turn until it returns."""
    time.sleep(seconds)


class Recorder:
    def __init__(self) -> None:
        self.fired = threading.Event()

    def __call__(self) -> None:
        self.fired.set()


async def test_a_loop_blocked_past_the_limit_is_ended() -> None:
    recorder = Recorder()
    async with LoopWatchdog(0.2, on_stall=recorder):
        await asyncio.sleep(0.05)
        hold_the_loop(0.6)
        assert recorder.fired.is_set()


async def test_a_turning_loop_is_left_alone_even_when_busy() -> None:
    recorder = Recorder()
    async with LoopWatchdog(0.3, on_stall=recorder):
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            hold_the_loop(0.05)  # busy in short slices, as a loaded worker is
            await asyncio.sleep(0)
    assert not recorder.fired.is_set()


async def test_a_short_block_under_the_limit_is_not_a_stall() -> None:
    recorder = Recorder()
    async with LoopWatchdog(0.5, on_stall=recorder):
        hold_the_loop(0.2)
        await asyncio.sleep(0.3)
    assert not recorder.fired.is_set()


async def test_leaving_stops_the_thread() -> None:
    before = threading.active_count()
    async with LoopWatchdog(0.2, on_stall=Recorder()):
        assert threading.active_count() == before + 1
    assert threading.active_count() == before


def test_stall_limit_scales_with_the_decision_timeout_above_a_floor() -> None:
    assert stall_limit(0.01) == MIN_STALL_SECONDS
    assert stall_limit(2.0) == 10.0
    with pytest.raises(ValueError):
        LoopWatchdog(0)
