"""One JSON line per decision. Never a token, key or CSR: only what identifies the
request, what was claimed, and the outcome with its reasons."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from identityd.callback.request import CallbackRequest


@dataclass
class DecisionRecord:
    request_id: str
    kind: str
    client: str  # peer address (and client certificate CN when mTLS)
    started: float
    provider: str = ""
    domain: str = ""
    service: str = ""
    instance_id: str = ""
    client_ip: str = ""
    token_pod: str = ""  # namespace/name from the verified token
    csr_key_sha256: str = ""
    decision: str = "error"  # allow | deny | bad_request | unavailable | client_closed
    status: int = 500
    reasons: list[str] = field(default_factory=list)
    stages_ms: dict[str, float] = field(default_factory=dict)
    latency_ms: float = 0.0

    def claim(self, req: CallbackRequest) -> None:
        self.provider, self.domain, self.service = req.provider, req.domain, req.service
        self.instance_id = req.instance_id[:128]
        self.client_ip = req.attributes.get("clientIP", "")[:64]

    def as_json(self) -> str:
        doc: dict[str, Any] = {
            "msg": "decision",
            "request_id": self.request_id,
            "kind": self.kind,
            "decision": self.decision,
            "status": self.status,
            "reasons": self.reasons,
            "provider": self.provider,
            "domain": self.domain,
            "service": self.service,
            "instance_id": self.instance_id,
            "client": self.client,
            "client_ip": self.client_ip,
            "token_pod": self.token_pod,
            "csr_key_sha256": self.csr_key_sha256,
            "latency_ms": round(self.latency_ms, 3),
            "stages_ms": {k: round(v, 3) for k, v in self.stages_ms.items()},
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=True)


class DecisionLog:
    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("identityd.decision")

    def write(self, record: DecisionRecord) -> None:
        self._logger.info(record.as_json())
