"""One identityd per fuzz module (the ``service`` wiring over real HTTP, started once:
hypothesis runs hundreds of examples inside one test)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from identityd.devca.workload import DevCluster
from tests.adversarial.adversarial_world import World, build_world, serve_world
from tests.conftest import Service


@pytest.fixture(scope="module")
def fuzz_world() -> World:
    return build_world(DevCluster())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzz_service(
    fuzz_world: World, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Service]:
    async with serve_world(fuzz_world, tmp_path_factory.mktemp("fuzz")) as service:
        yield service
