"""The decision pipeline: parse → verify token → check CSR → look up pod → build input → decide.

I/O happens only through the three edges handed to the constructor. Every
failure is an IdentitydError whose category decides the HTTP status; nothing
here ever turns doubt into an allow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from identityd.callback.decision_log import DecisionRecord
from identityd.callback.policy_input import build_input
from identityd.callback.request import CallbackRequest, parse_request
from identityd.errors import Denied, InvalidCSR
from identityd.inventory.base import PodInventory, PodRecord
from identityd.keys.csr import parse_csr, parse_public_key
from identityd.keys.csr_info import CSRInfo
from identityd.keys.key_info import KeyInfo
from identityd.policy.base import Decision, PolicyEngine
from identityd.settings import IdentitySettings
from identityd.tokens.base import TokenClaims, TokenVerifier


@dataclass(frozen=True, slots=True)
class Outcome:
    request: CallbackRequest
    claims: TokenClaims
    decision: Decision


class Pipeline:
    def __init__(
        self,
        *,
        identity: IdentitySettings,
        verifier: TokenVerifier,
        inventory: PodInventory,
        engine: PolicyEngine,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._identity = identity
        self._verifier = verifier
        self._inventory = inventory
        self._engine = engine
        self._clock = clock

    async def run(self, kind: str, body: bytes, record: DecisionRecord) -> Outcome:
        """Decide on one callback body. Returns an allow; raises for everything else."""
        stages = record.stages_ms
        mark = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal mark
            now_perf = time.perf_counter()
            stages[stage] = (now_perf - mark) * 1000.0
            mark = now_perf

        req = parse_request(kind, body)
        record.claim(req)
        lap("parse")

        now = self._clock()
        claims = await self._verifier.verify(req.token, now=now)
        record.token_pod = f"{claims.namespace}/{claims.pod_name}"
        lap("token")

        csr = parse_csr(req.csr_pem) if req.csr_pem else None
        public_key = _csr_public_key(req, csr)
        # The key the certificate will carry, whichever way it came; policy judges it.
        certified = csr if csr is not None else public_key
        if certified is not None:
            record.csr_key_sha256 = certified.public_key_sha256
            lap("csr")

        pod, found_by = await self._find_pod(claims)
        lap("inventory")

        input_doc = build_input(
            req,
            claims,
            pod,
            csr,
            self._identity,
            now=now,
            found_by=found_by,
            public_key=public_key,
        )
        decision = await self._engine.evaluate(input_doc)
        lap("policy")
        if not decision.allow:
            raise Denied(reasons=list(decision.reasons))
        return Outcome(request=req, claims=claims, decision=decision)

    async def _find_pod(self, claims: TokenClaims) -> tuple[PodRecord | None, str]:
        """The pod the token names: by uid; else by name, so a recycled name is visible.

        The uid goes with the name: a pod recreated under its name ahead of the watch
        is read through for the new token, while an old token still meets the new
        uid (POD_UID_MISMATCH) or no pod (POD_NOT_FOUND)."""
        # The inventory raises InventoryUnavailable with its own precise code
        # (not synced, stale, lookup failed) when it cannot answer.
        pod = await self._inventory.get_by_uid(claims.pod_uid)
        if pod is not None:
            return pod, "uid"
        return await self._inventory.get(
            claims.namespace, claims.pod_name, uid=claims.pod_uid
        ), "name"


def _csr_public_key(req: CallbackRequest, csr: CSRInfo | None) -> KeyInfo | None:
    """ZTS's attribute csrPublicKey, parsed (400 BAD_CSR_PUBLIC_KEY if it is not a key).

    ZTS states the key it will certify; with a CSR, it must be the CSR's key."""
    pem = req.attributes.get("csrPublicKey")
    if not pem:
        return None
    key = parse_public_key(pem)
    if csr is not None and key.public_key_sha256 != csr.public_key_sha256:
        raise InvalidCSR("CSR_PUBLIC_KEY_MISMATCH", "csrPublicKey is not the CSR's key")
    return key
