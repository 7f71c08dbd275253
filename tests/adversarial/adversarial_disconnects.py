"""Corpus cases of clients that go away in the middle of their request body.

Nobody is left to answer, so a case is not judged by an answer but by what identityd
records: exactly one decision record with decision ``client_closed`` and status 499
(reason ``CLIENT_CLOSED``), no traceback or error log, and nothing counted as an error
or a 500 in the metrics. Before, each of these was an ERROR with a 21-line traceback
and a decision record ``"decision":"error","status":500``: any client could flood the
logs and write fake server errors into the audit trail.

A :class:`Disconnect` is data: the bytes sent (a whole request head and part of the
body) and how the client leaves: a half-close (FIN, still reading), a full close, or
a reset (RST). Each request carries its own ``X-Request-Id`` so that its decision
record can be found.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from tests.adversarial.adversarial_world import World, raw_request

# A reset discards what the server has not read yet: give it this long to read the
# head and start the handler before the RST, or there is no request to record.
RESET_PAUSE_SECONDS = 0.1
# How long the server may take to notice the client is gone and close its side.
CLOSE_TIMEOUT_SECONDS = 5.0

HALF_CLOSE, CLOSE, RESET = "half-close", "close", "reset"
Build = Callable[["World", str], bytes]


@dataclass(frozen=True)
class Disconnect:
    name: str
    build: Build  # (world, request id) -> the bytes sent
    how: str  # HALF_CLOSE | CLOSE | RESET


def _legit(w: World) -> bytes:
    return json.dumps(w.confirmation(csr=False)).encode()


def _cut(body: Callable[[World], bytes], keep: Callable[[bytes], int], **head: str | None) -> Build:
    """A request announcing the whole body (Content-Length), of which only a part is sent."""

    def build(w: World, request_id: str) -> bytes:
        whole = body(w)
        message = raw_request(
            "/instance",
            whole,
            headers={"Connection": "keep-alive", "X-Request-Id": request_id, **head},
        )[0]
        return message[: len(message) - len(whole) + keep(whole)]

    return build


def _chunked_cut(w: World, request_id: str) -> bytes:
    body = _legit(w)
    head = raw_request(
        "/instance",
        b"",
        headers={
            "Content-Length": None,
            "Transfer-Encoding": "chunked",
            "Connection": "keep-alive",
            "X-Request-Id": request_id,
        },
    )[0]
    return head + f"{len(body):x}\r\n".encode() + body[: len(body) // 2]


def disconnects() -> list[Disconnect]:
    gz = {"Content-Encoding": "gzip"}
    cases = [
        # The red team's case: Content-Length 100, one byte, then FIN.
        Disconnect(
            "one body byte of 100, then FIN (half-close)",
            _cut(lambda w: b"{" + b" " * 99, lambda b: 1),
            HALF_CLOSE,
        ),
        Disconnect("headers only, then FIN", _cut(_legit, lambda b: 0), HALF_CLOSE),
        Disconnect(
            "a genuine body but its last byte, then FIN",
            _cut(_legit, lambda b: len(b) - 1),
            HALF_CLOSE,
        ),
        Disconnect("half a genuine body, then close", _cut(_legit, lambda b: len(b) // 2), CLOSE),
        Disconnect("half a genuine body, then RST", _cut(_legit, lambda b: len(b) // 2), RESET),
        Disconnect("headers only, then RST", _cut(_legit, lambda b: 0), RESET),
        Disconnect("chunked body cut inside a chunk, then FIN", _chunked_cut, HALF_CLOSE),
        Disconnect("chunked body cut inside a chunk, then RST", _chunked_cut, RESET),
        Disconnect(
            "gzip body cut in half, then FIN",
            _cut(lambda w: gzip.compress(_legit(w)), lambda b: len(b) // 2, **gz),
            HALF_CLOSE,
        ),
    ]
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError("duplicate disconnect case names")
    return cases


async def disconnect(port: int, data: bytes, how: str) -> bytes:
    """Send ``data`` to 127.0.0.1:``port`` and leave as ``how`` says; return whatever
    the server sent before closing its side (nothing, if all is well)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if how == RESET:
            await asyncio.sleep(RESET_PAUSE_SECONDS)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return b""
        if how == HALF_CLOSE:
            writer.write_eof()
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                return await reader.read()
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
