"""The agent when the CA is down (backoff, old certificate kept), and readers racing real
refreshes (never a key that does not match the certificate)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from identityd.keys.csr import public_key_sha256
from identityd.sia.agent import Agent
from identityd.sia.files import current_generation
from identityd.sia.main import EXIT_OK, EXIT_UNAVAILABLE, agent_once
from tests.doubles.waiting import eventually
from tests.e2e.e2e_support import World, running_world


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with running_world(tmp_path) as w:
        yield w


def dead_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return f"https://127.0.0.1:{port}"


async def test_ca_down_backs_off_and_keeps_the_current_certificate(world: World) -> None:
    assert (await agent_once(*world.invocation(world.api)))[0] == EXIT_OK
    certs = world.certs("api-1")
    generation = current_generation(certs)
    before = {name: (certs / name).read_bytes() for name in ("key.pem", "cert.pem", "ca.pem")}

    config = world.config(
        world.api,
        ca_url=dead_url(),
        refresh_fraction=0.001,  # due at once
        jitter_fraction=0.0,
        retry_initial=0.01,
        retry_max=0.04,
    )
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.create_task(agent.run(stop))
    try:
        await eventually(lambda: agent.status.consecutive_failures >= 5, within=10)
    finally:
        stop.set()
        await loop
    delays = list(agent.status.retry_delays)[:5]
    for delay, step in zip(delays, [0.01, 0.02, 0.04, 0.04, 0.04], strict=True):
        assert step / 2 <= delay <= step
    assert agent.status.last_error is not None
    assert agent.status.last_error.startswith("CA_UNREACHABLE")
    assert current_generation(certs) == generation
    assert {name: (certs / name).read_bytes() for name in before} == before
    assert agent.current_facts() is not None  # still valid, still served


async def test_once_mode_gives_up_after_its_attempts_when_the_ca_is_down(world: World) -> None:
    argv, env = world.invocation(world.api)
    argv += ["--ca-url", dead_url(), "--once-attempts", "3", "--retry-initial", "0.01"]
    code, message = await agent_once(argv, env)
    assert code == EXIT_UNAVAILABLE
    assert message.startswith("CA unavailable: CA_UNREACHABLE")
    assert not (world.certs("api-1") / "cert.pem").exists()


def _matches(key_pem: bytes, cert_pem: bytes) -> bool:
    key = serialization.load_pem_private_key(key_pem, password=None)
    cert = x509.load_pem_x509_certificate(cert_pem)
    return public_key_sha256(key.public_key()) == public_key_sha256(cert.public_key())


async def test_readers_never_see_a_mismatched_pair_during_real_refreshes(world: World) -> None:
    agent = Agent(world.config(world.api))
    await agent.attempt()
    certs = world.certs("api-1")
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def reader() -> None:
        marker = b"-----END PRIVATE KEY-----\n"
        while not stop.is_set():
            bundle = (certs / "bundle.pem").read_bytes()
            end = bundle.index(marker) + len(marker)
            if not _matches(bundle[:end], bundle[end:]):
                problems.append("bundle.pem: key and certificate differ")
            generation = current_generation(certs)
            try:
                if generation is not None and not _matches(
                    (generation / "key.pem").read_bytes(), (generation / "cert.pem").read_bytes()
                ):
                    problems.append(f"{generation.name}: key and certificate differ")
            except FileNotFoundError:
                pass  # pruned after two more swaps: retry, never a mismatch
            reads[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(6):
            await agent.attempt()
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert reads[0] > 0
    assert [e.kind for e in world.ca.events].count("refresh") == 6
