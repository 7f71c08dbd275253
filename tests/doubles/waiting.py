"""Waiting for something a background task will do, without fixed sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(check: Callable[[], object], *, within: float = 5.0,
                     interval: float = 0.005) -> None:
    """Return once ``check()`` is truthy; TimeoutError naming it after ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            while not check():  # noqa: ASYNC110 - polls state another task changes
                await asyncio.sleep(interval)
    except TimeoutError:
        raise TimeoutError(f"not true within {within}s: {check}") from None
