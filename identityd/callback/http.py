"""aiohttp handlers for the callback API (DESIGN §2) and the one error middleware.

Status mapping lives in exactly one place, :func:`error_middleware`: every
IdentitydError renders as ``{"code": status, "message": ...}``. A 403 carries
reason codes only; their details (which may name other pods) go to the
decision log, never to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from identityd.callback.answer import allow_document
from identityd.callback.decision_log import DecisionLog, DecisionRecord
from identityd.callback.limits import Limiter
from identityd.callback.peer import (
    certificate_cns,
    certificate_names,
    certificate_valid_now,
    single_cn,
)
from identityd.callback.pipeline import Outcome, Pipeline
from identityd.errors import (
    BadRequest,
    Denied,
    IdentitydError,
    PayloadTooLarge,
    PolicyUnavailable,
    Unavailable,
)
from identityd.inventory.base import PodInventory
from identityd.metrics import CONTENT_TYPE_LATEST, Metrics, render
from identityd.policy.base import PolicyEngine
from identityd.settings import BODY_READ_TIMEOUT_SECONDS
from identityd.tokens.base import TokenVerifier

log = logging.getLogger("identityd.http")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PIPELINE_KEY = web.AppKey("pipeline", Pipeline)
METRICS_KEY = web.AppKey("metrics", Metrics)
LOG_KEY = web.AppKey("decision_log", DecisionLog)
INVENTORY_KEY = web.AppKey("inventory", PodInventory)
ENGINE_KEY = web.AppKey("engine", PolicyEngine)
VERIFIER_KEY = web.AppKey("verifier", TokenVerifier)
MAX_BODY_KEY = web.AppKey("max_body_bytes", int)
ALLOWED_CLIENTS_KEY = web.AppKey("allowed_clients", frozenset)
REQUEST_ID_KEY = web.RequestKey("request_id", str)
LIMITER_KEY = web.AppKey("limiter", Limiter)
CLIENT_CLOSED_STATUS = 499


class ClientClosed(IdentitydError):
    """The client's connection went away while it was sending its body.

    Nobody is left to answer and nothing failed on our side: not a 500, no
    traceback, one decision record. The status is nginx's 499 "client closed
    request", which no client ever receives (it is for the decision log and
    the metrics only)."""

    status = CLIENT_CLOSED_STATUS
    default_code = "CLIENT_CLOSED"


def error_body(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


def public_message(exc: IdentitydError) -> str:
    if isinstance(exc, Denied):
        return ", ".join(exc.codes)
    if isinstance(exc, Unavailable):
        return exc.code
    return "; ".join(exc.reasons)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except IdentitydError as exc:
        response = error_body(exc.status, public_message(exc))
    except web.HTTPRequestEntityTooLarge:
        response = error_body(413, "BODY_TOO_LARGE")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_body(exc.status, exc.reason)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        response = error_body(503, "INTERNAL_ERROR")
    request_id = request.get(REQUEST_ID_KEY)
    if request_id:
        response.headers["X-Request-Id"] = request_id
    return response


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
    request[REQUEST_ID_KEY] = rid
    return rid


def _peer(request: web.Request) -> tuple[str, str | None]:
    """Peer address and the client certificate's CN, if any."""
    peername = request.transport.get_extra_info("peername") if request.transport else None
    address = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else "unknown"
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    return address, single_cn(cert) if cert else None


def check_client(request: web.Request) -> None:
    """With --allowed-client, the CA's certificate must carry one of the names."""
    allowed: frozenset[str] = request.app[ALLOWED_CLIENTS_KEY]
    if not allowed:
        return
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    if not cert:
        raise Denied("CLIENT_NOT_ALLOWED", "no client certificate")
    if not certificate_valid_now(cert):
        raise Denied("CLIENT_NOT_ALLOWED", "client certificate expired or not yet valid")
    if len(certificate_cns(cert)) > 1:
        raise Denied("CLIENT_NOT_ALLOWED", "client certificate subject has several CNs")
    if not certificate_names(cert) & allowed:
        cn = single_cn(cert)
        raise Denied("CLIENT_NOT_ALLOWED", f"client certificate CN={cn!r} not allowed")


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge("BODY_TOO_LARGE", f"{request.content_length} bytes > {limit}")
    if request.content_type != "application/json":
        raise BadRequest("BAD_CONTENT_TYPE", "Content-Type must be application/json")
    body = bytearray()
    deadline = asyncio.timeout(BODY_READ_TIMEOUT_SECONDS)
    try:
        async with deadline:
            async for chunk in request.content.iter_chunked(16384):
                body.extend(chunk)
                if len(body) > limit:
                    raise PayloadTooLarge("BODY_TOO_LARGE", f"more than {limit} bytes")
    except web.RequestPayloadError:
        # e.g. Content-Encoding: gzip over bytes that are not gzip
        raise BadRequest("BAD_BODY", "the body could not be read") from None
    except OSError as exc:
        # Our deadline raises TimeoutError, an OSError too; any other OSError is
        # what aiohttp's connection_lost hands the body stream: ConnectionResetError
        # ("Connection lost" on a FIN, ECONNRESET on a reset), or the transport's
        # own error (a TLS error, ETIMEDOUT, which is a TimeoutError as well).
        if deadline.expired():
            raise BadRequest(
                "BODY_TIMEOUT", f"body not received within {BODY_READ_TIMEOUT_SECONDS}s"
            ) from None
        raise ClientClosed(
            "CLIENT_CLOSED", f"connection lost after {len(body)} body bytes ({type(exc).__name__})"
        ) from None
    return bytes(body)


def allow_response(outcome: Outcome) -> web.Response:
    """The InstanceConfirmation with only echo-safe and granted attributes (see answer.py)."""
    return web.json_response(allow_document(outcome.request, outcome.decision), status=200)


def _result(exc: IdentitydError) -> str:
    if isinstance(exc, ClientClosed):
        return "client_closed"
    if isinstance(exc, Denied):
        return "deny"
    if isinstance(exc, Unavailable):
        return "unavailable"
    if isinstance(exc, BadRequest):
        return "bad_request"
    return "error"


def callback_handler(kind: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        app = request.app
        metrics, decision_log = app[METRICS_KEY], app[LOG_KEY]
        address, cn = _peer(request)
        record = DecisionRecord(
            request_id=_request_id(request),
            kind=kind,
            client=f"{address} cn={cn}" if cn else address,
            started=time.perf_counter(),
        )
        try:
            check_client(request)
            body = await read_body(request, app[MAX_BODY_KEY])
            # Only the decision holds a slot: a slow body must not starve the others.
            async with app[LIMITER_KEY].decision_slot():
                outcome = await app[PIPELINE_KEY].run(kind, body, record)
            response = allow_response(outcome)
            record.decision, record.status = "allow", 200
        except IdentitydError as exc:
            record.decision, record.status, record.reasons = _result(exc), exc.status, exc.reasons
            for code in exc.codes:
                metrics.reasons.labels(code=code).inc()
            if isinstance(exc, PolicyUnavailable) and exc.code == "POLICY_UNDEFINED":
                metrics.policy_undefined.inc()
            raise
        except web.HTTPRequestEntityTooLarge:
            record.decision, record.status, record.reasons = "bad_request", 413, ["BODY_TOO_LARGE"]
            raise
        except asyncio.CancelledError:
            # A server run with handler_cancellation (aiohttp's TestServer is) cancels
            # the handler when the client goes away, at any stage: the same outcome.
            if request.transport is None or request.transport.is_closing():
                record.decision, record.status = "client_closed", CLIENT_CLOSED_STATUS
                record.reasons = ["CLIENT_CLOSED: connection lost, handler cancelled"]
                metrics.reasons.labels(code="CLIENT_CLOSED").inc()
            raise
        finally:
            record.latency_ms = (time.perf_counter() - record.started) * 1000.0
            metrics.decisions.labels(kind=kind, result=record.decision).inc()
            if record.decision != "client_closed":  # nobody was answered
                metrics.latency.labels(kind=kind).observe(record.latency_ms / 1000.0)
            for stage, ms in record.stages_ms.items():
                if stage in ("token", "csr", "inventory", "policy"):
                    metrics.stage.labels(stage=stage).observe(ms / 1000.0)
            decision_log.write(record)
        return response

    return handle


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    inventory, engine = request.app[INVENTORY_KEY], request.app[ENGINE_KEY]
    checks = {
        "inventory": inventory.ready,
        "policy": engine.ready,
        "tokens": request.app[VERIFIER_KEY].ready,  # keys held: a token can be verified
    }
    ready = all(checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics_handler(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    metrics.inventory_pods.set(request.app[INVENTORY_KEY].size())
    return web.Response(body=render(metrics), headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application, *, callback: bool = True) -> None:
    if callback:
        app.router.add_post("/instance", callback_handler("instance"))
        app.router.add_post("/refresh", callback_handler("refresh"))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
