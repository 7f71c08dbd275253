"""`identityd decide`: run one callback through the real pipeline, offline, and print
the decision document. Exit 0 on allow, 3 on deny (or unavailable), 2 on bad input."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from identityd.app import build_edges
from identityd.callback.decision_log import DecisionRecord
from identityd.callback.pipeline import Pipeline
from identityd.errors import BadRequest, ConfigError, IdentitydError
from identityd.settings import Settings

EXIT_ALLOW, EXIT_BAD_INPUT, EXIT_DENY = 0, 2, 3


def _read(path: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError("CONFIG_ERROR", f"--request {path}: {exc.strerror}") from exc


async def _decide(
    settings: Settings, body: bytes, kind: str, at: float | None
) -> dict[str, object]:
    edges = await build_edges(settings)
    try:
        pipeline = Pipeline(
            identity=settings.identity,
            verifier=edges.verifier,
            inventory=edges.inventory,
            engine=edges.engine,
            clock=(lambda: at) if at is not None else time.time,
        )
        record = DecisionRecord(
            request_id="decide", kind=kind, client="cli", started=time.perf_counter()
        )
        try:
            outcome = await pipeline.run(kind, body, record)
        except IdentitydError as exc:
            return {"allow": False, "reasons": exc.reasons, "attributes": {}, "status": exc.status}
        doc = outcome.decision.as_document()
        doc["status"] = 200
        return doc
    finally:
        await edges.aclose()


def decide(settings: Settings, request_path: str, kind: str, at: float | None) -> int:
    body = _read(request_path)
    result = asyncio.run(_decide(settings, body, kind, at))
    print(json.dumps(result, indent=2, sort_keys=True))
    status = result.get("status")
    if status == 200:
        return EXIT_ALLOW
    if status in (BadRequest.status, 413):
        return EXIT_BAD_INPUT
    return EXIT_DENY
