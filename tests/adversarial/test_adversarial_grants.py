"""Requests that smuggle grant attributes are allowed (they are otherwise legitimate) but
get back exactly what the same request without them gets: the policy's grant and the
instance echo, nothing the request asked for."""

from __future__ import annotations

import pytest

from identityd.callback.answer import ECHOED_ATTRIBUTES
from tests.adversarial.adversarial_grants import GrantCase, grant_smuggling
from tests.adversarial.adversarial_world import Wire, World, send
from tests.conftest import Service

pytestmark = pytest.mark.asyncio(loop_scope="module")

CASES = grant_smuggling()
POLICY_GRANT = {"certExpiryTime", "certRefresh", "certUsage"}  # what the default policy grants


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_smuggled_grant_is_not_in_the_answer(
    corpus_service: Service, world: World, case: GrantCase
) -> None:
    control = await send(
        corpus_service.http,
        corpus_service.url,
        Wire(path=case.path, body=world.confirmation(csr=case.csr)),
    )
    body = world.confirmation(csr=case.csr, attributes=dict(case.attributes))
    answer = await send(corpus_service.http, corpus_service.url, Wire(path=case.path, body=body))
    assert (control.status, answer.status) == (200, 200), answer.json_body
    assert control.json_body is not None and answer.json_body is not None
    got = answer.json_body["attributes"]
    assert got == control.json_body["attributes"]
    assert set(got) == ECHOED_ATTRIBUTES | POLICY_GRANT
    smuggled = {name for name in case.attributes if name not in POLICY_GRANT}
    assert smuggled & set(got) == set()
    granted = {name: got[name] for name in POLICY_GRANT}
    assert granted == {
        "certExpiryTime": str(corpus_service.settings.identity.cert_expiry_minutes),
        "certRefresh": "true",
        "certUsage": "client",
    }
