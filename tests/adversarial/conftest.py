"""One identityd per test module for the adversarial corpus: the same wiring as the
``service`` fixture (real HTTP on loopback, embedded engine, default policies),
started once so that ~300 attacks stay fast, with --max-token-age set and a short
body-read timeout so slow-client cases finish quickly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

import identityd.callback.http as http_module
from identityd.devca.workload import DevCluster
from tests.adversarial.adversarial_world import (
    CORPUS_BODY_TIMEOUT_SECONDS,
    World,
    build_world,
    serve_world,
)
from tests.conftest import Service


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(DevCluster())


@pytest.fixture(scope="module")
def short_body_timeout() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(http_module, "BODY_READ_TIMEOUT_SECONDS", CORPUS_BODY_TIMEOUT_SECONDS)
        yield


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def corpus_service(
    world: World, tmp_path_factory: pytest.TempPathFactory, short_body_timeout: None
) -> AsyncIterator[Service]:
    async with serve_world(world, tmp_path_factory.mktemp("corpus")) as service:
        yield service
