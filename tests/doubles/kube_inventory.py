"""A WatchInventory wired to the API-server double, with test-sized bounds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from identityd.inventory.watch import WatchInventory, WatchSettings
from identityd.kubeapi import KubeConnection
from tests.doubles.kube_apiserver import KubeAPIServer

# Milliseconds, not the production seconds: the tests wait on these.
FAST: dict[str, Any] = {
    "backoff_initial_seconds": 0.01,
    "backoff_max_seconds": 0.05,
    "connect_timeout_seconds": 1.0,
    "request_timeout_seconds": 2.0,
    "read_through_timeout_seconds": 1.0,
    "read_through_cache_seconds": 0.05,
}


def fast_settings(**overrides: Any) -> WatchSettings:
    return WatchSettings(**(FAST | overrides))


def write_kubeconfig(path: Path, api: KubeAPIServer) -> str:
    """A kubeconfig file pointing at the double with its bearer token; returns its path."""
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "double",
                "clusters": [{"name": "double", "cluster": {"server": api.url}}],
                "users": [{"name": "identityd", "user": {"token": api.token}}],
                "contexts": [
                    {"name": "double", "context": {"cluster": "double", "user": "identityd"}}
                ],
            }
        )
    )
    return str(path)


def connection_to(api: KubeAPIServer) -> KubeConnection:
    return KubeConnection(host=api.url, token=api.token)


@contextlib.asynccontextmanager
async def watching(
    api: KubeAPIServer,
    settings: WatchSettings | None = None,
    *,
    synced: bool = True,
    **kwargs: Any,
) -> AsyncIterator[WatchInventory]:
    """A started inventory (synced first, unless ``synced=False``), closed on exit."""
    async with WatchInventory(connection_to(api), settings or fast_settings(), **kwargs) as inv:
        if synced:
            async with asyncio.timeout(5):
                await inv.wait_synced()
        yield inv
