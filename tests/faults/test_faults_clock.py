"""Clock skew at the leeway boundary, through the callback: tokens whose exp, nbf, iat or
age sit exactly at ``now ± leeway`` are allowed, one second beyond is denied with the
reason that names it.

identityd's token clock is injected (the Pipeline's ``clock``), two hours ahead of the
wall clock, so the boundaries are exact to the second and a token minted "now" by the
wall clock is itself a skewed token (the control case).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
import pytest_asyncio

from identityd.devca.workload import DevCluster, DevPod
from identityd.settings import CLOCK_SKEW_SECONDS
from tests.conftest import Service, make_settings
from tests.faults.conftest import ALLOW, ask, serving

pytestmark = pytest.mark.asyncio(loop_scope="module")

NOW = int(time.time()) + 7200  # identityd's clock: two hours ahead of the wall clock
LEEWAY = CLOCK_SKEW_SECONDS  # the production default, not a test-sized one
MAX_AGE = 600
LIFETIME = 3600

EXPIRED = (403, "TOKEN_EXPIRED")
NOT_YET_VALID = (403, "TOKEN_NOT_YET_VALID")
TOO_OLD = (403, "TOKEN_TOO_OLD")


@pytest.fixture(scope="module")
def cluster() -> DevCluster:
    return DevCluster()


@pytest.fixture(scope="module")
def pod(cluster: DevCluster) -> DevPod:
    return cluster.add_pod("sports-web", "api-1", "api", "10.1.2.3")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def skewed(
    cluster: DevCluster, pod: DevPod, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Service]:
    settings = make_settings(cluster, tmp_path_factory.mktemp("clock"))
    assert settings.tokens.leeway_seconds == LEEWAY
    settings = replace(settings, tokens=replace(settings.tokens, max_age_seconds=MAX_AGE))
    async with serving(settings, clock=lambda: float(NOW)) as svc:
        yield svc


def token(
    issued: int, *, lifetime: int = LIFETIME, **claims: Any
) -> Callable[[DevCluster, DevPod], str]:
    """A bound token issued at ``issued`` (iat = nbf), ``claims`` overriding the rest."""

    def mint(cluster: DevCluster, pod: DevPod) -> str:
        return cluster.token(pod, now=issued, lifetime=lifetime, claims_override=claims)

    return mint


CASES = {
    # exp: valid until exp + leeway.
    "exp at now - leeway": (token(NOW - LEEWAY - 60, lifetime=60), ALLOW),
    "exp 1 s before that": (token(NOW - LEEWAY - 61, lifetime=60), EXPIRED),
    # nbf: valid from nbf - leeway (iat kept at now to test nbf alone).
    "nbf at now + leeway": (token(NOW, nbf=NOW + LEEWAY), ALLOW),
    "nbf 1 s after that": (token(NOW, nbf=NOW + LEEWAY + 1), NOT_YET_VALID),
    # iat: not more than leeway in the future (nbf kept at now to test iat alone).
    "iat at now + leeway": (token(NOW + LEEWAY, nbf=NOW), ALLOW),
    "iat 1 s after that": (token(NOW + LEEWAY + 1, nbf=NOW), NOT_YET_VALID),
    # age: at most max_age + leeway old (a long lifetime, so exp is not the reason).
    "age max_age + leeway": (token(NOW - MAX_AGE - LEEWAY, lifetime=2 * MAX_AGE), ALLOW),
    "age 1 s beyond": (token(NOW - MAX_AGE - LEEWAY - 1, lifetime=2 * MAX_AGE), TOO_OLD),
    # Control: minted by the wall clock, two hours behind identityd's: long expired.
    "wall-clock token": (lambda cluster, pod: cluster.token(pod), EXPIRED),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_leeway_boundary_through_the_callback(
    skewed: Service, cluster: DevCluster, pod: DevPod, case: str
) -> None:
    make, want = CASES[case]
    body = cluster.confirmation(pod, token=make(cluster, pod))
    for kind in ("instance", "refresh"):
        answer = await ask(skewed, body, kind)
        assert (answer.status, answer.code) == want, (case, kind, answer)
