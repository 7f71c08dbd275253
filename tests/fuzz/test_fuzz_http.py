"""End to end over real HTTP: legitimate bodies, slightly damaged. Every answer is a
well-formed allow that grants nothing beyond the legitimate request, or a JSON deny
(400/403/413/503) with a code and a message; never a 500 or the catch-all
INTERNAL_ERROR; and the next legitimate request is still allowed."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.adversarial.adversarial_world import World
from tests.conftest import Service
from tests.fuzz.fuzz_mutations import claimed, mutated_body, within

pytestmark = pytest.mark.asyncio(loop_scope="module")

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CODE = re.compile(r"^[A-Z][A-Z0-9_]*$")
DENY_STATUSES = (400, 403, 413, 503)


async def post(service: Service, path: str, body: bytes) -> tuple[int, Any]:
    async with service.http.post(
        f"{service.url}{path}", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        return resp.status, json.loads(await resp.text())


def check_well_formed(status: int, answer: Any) -> None:
    assert status == 200 or status in DENY_STATUSES, (status, answer)
    assert isinstance(answer, dict)
    if status == 200:
        attributes = answer["attributes"]
        assert isinstance(attributes, dict)
        assert all(isinstance(v, str) for v in attributes.values())
        assert attributes["certExpiryTime"].isdigit()
        return
    assert answer.get("code") == status
    message = answer.get("message")
    assert isinstance(message, str) and message
    codes = message.split(", ") if status == 403 else [message.split(":", 1)[0]]
    assert all(CODE.match(code) for code in codes), message
    assert "INTERNAL_ERROR" not in codes, "an unexpected exception reached the catch-all"


@pytest.fixture(scope="module")
def legit_docs(fuzz_world: World) -> dict[bool, dict[str, Any]]:
    """A legitimate body with and without a CSR, made once: hypothesis replays an
    example by its draws, which must not depend on a fresh token's length."""
    return {csr: fuzz_world.confirmation(csr=csr) for csr in (False, True)}


@FUZZ
@given(data=st.data(), path=st.sampled_from(["/instance", "/refresh"]), with_csr=st.booleans())
async def test_damaged_legitimate_bodies(
    fuzz_service: Service,
    legit_docs: dict[bool, dict[str, Any]],
    data: st.DataObject,
    path: str,
    with_csr: bool,
) -> None:
    legit_doc = legit_docs[with_csr]
    legit = claimed(path[1:], json.dumps(legit_doc).encode())
    assert legit is not None
    body = mutated_body(data, legit_doc)

    status, answer = await post(fuzz_service, path, body)
    event(f"status {status}")
    check_well_formed(status, answer)
    if status == 200:
        asked = claimed(path[1:], body)
        assert asked is not None and within(asked, legit), "allowed more than the legit request"

    status, answer = await post(fuzz_service, path, json.dumps(legit_doc).encode())
    assert status == 200, answer


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=512))
async def test_arbitrary_bytes(fuzz_service: Service, body: bytes) -> None:
    status, answer = await post(fuzz_service, "/instance", body)
    assert status in (400, 413), answer
    check_well_formed(status, answer)
