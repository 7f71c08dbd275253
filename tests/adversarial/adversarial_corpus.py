"""The adversarial corpus: attack requests generated from a dev cluster, each with the
exact status and the exact set of reason codes identityd must deny it with.

A :class:`Case` is data: a name, a category, the expected answer, and a function
that builds the :class:`Wire` request from a :class:`World` (tokens and CSRs are
made at run time, so they are fresh and the pod uids are the world's).
:func:`corpus` returns every case; names are unique and stable (test ids).

Nothing here may be allowed: the expected status is never 200.
"""

from __future__ import annotations

from tests.adversarial.adversarial_keys import key_abuse
from tests.adversarial.adversarial_requests import (
    identity_confusion,
    protocol_abuse,
    san_abuse,
    stale_identity,
)
from tests.adversarial.adversarial_tokens import claim_abuse, token_forgery
from tests.adversarial.adversarial_world import CATEGORIES, Case

__all__ = ["CATEGORIES", "Case", "corpus", "counts_by_category"]


def corpus() -> list[Case]:
    cases = [
        *token_forgery(),
        *claim_abuse(),
        *identity_confusion(),
        *san_abuse(),
        *stale_identity(),
        *protocol_abuse(),
        *key_abuse(),
    ]
    names = [c.name for c in cases]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"duplicate case names: {sorted(duplicates)}")
    return cases


def counts_by_category(cases: list[Case]) -> dict[str, int]:
    return {cat: sum(1 for c in cases if c.category == cat) for cat in CATEGORIES}
