"""Every attack of the corpus is denied with its exact status and reason codes, over
real HTTP; none is ever allowed; and the same service still allows the legitimate
pods once the corpus has gone through it."""

from __future__ import annotations

import asyncio

import pytest

from tests.adversarial.adversarial_corpus import CATEGORIES, Case, corpus, counts_by_category
from tests.adversarial.adversarial_world import Answer, Wire, World, send
from tests.conftest import Service

pytestmark = pytest.mark.asyncio(loop_scope="module")

CASES = corpus()
MIN_CASES = 150
DENY_STATUSES = frozenset({400, 403, 413, 503})


@pytest.fixture(scope="module")
def outcomes() -> dict[str, Answer]:
    """Answers per case name, shared so the meta-test does not send a case twice."""
    return {}


async def _run(service: Service, world: World, case: Case, outcomes: dict[str, Answer]) -> Answer:
    answer = await send(service.http, service.url, case.build(world))
    outcomes[case.name] = answer
    return answer


def _param(case: Case) -> object:
    marks = [pytest.mark.xfail(strict=True, reason=case.gap)] if case.gap else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
async def test_attack_is_denied_with_its_codes(
    corpus_service: Service, world: World, outcomes: dict[str, Answer], case: Case
) -> None:
    answer = await _run(corpus_service, world, case, outcomes)
    assert answer.status != 200, f"ALLOWED: {case.category}: {case.name}"
    assert (answer.status, answer.codes) == (case.status, case.codes), answer.json_body
    if answer.json_body is not None:
        assert answer.json_body["code"] == case.status


async def test_no_attack_is_allowed_and_the_corpus_is_big_enough(
    corpus_service: Service, world: World, outcomes: dict[str, Answer]
) -> None:
    """The meta-test: every case of the corpus answered, none with a 200.

    Cases the parametrized test did not run (a -k selection) are sent here,
    16 at a time."""
    assert len(CASES) >= MIN_CASES
    counts = counts_by_category(CASES)
    assert all(counts[cat] > 0 for cat in CATEGORIES), counts
    assert all(c.status in DENY_STATUSES for c in CASES)
    gate = asyncio.Semaphore(16)

    async def ensure(case: Case) -> None:
        if case.name not in outcomes:
            async with gate:
                await _run(corpus_service, world, case, outcomes)

    await asyncio.gather(*(ensure(c) for c in CASES))
    statuses = {case.name: outcomes[case.name].status for case in CASES}
    assert [name for name, status in statuses.items() if status == 200] == []
    assert {name: s for name, s in statuses.items() if s not in DENY_STATUSES} == {}


@pytest.mark.parametrize("path", ["/instance", "/refresh"])
@pytest.mark.parametrize("pod", ["api", "other", "billing", "dash", "dot"])
async def test_positive_control_legitimate_pods_are_allowed(
    corpus_service: Service, world: World, pod: str, path: str
) -> None:
    """Without this, a service that denies everything would pass the corpus."""
    body = world.confirmation(getattr(world.pods, pod))
    answer = await send(corpus_service.http, corpus_service.url, Wire(path=path, body=body))
    assert answer.status == 200, answer.json_body
