"""The world the adversarial corpus attacks, its cases, and how an attack goes on the wire.

A :class:`World` is a dev cluster (real keys, real bound tokens, real CSRs) with
the pods every attack needs, plus attacker keys. A :class:`Case` is one attack
with the exact answer expected. A :class:`Wire` is one HTTP
request as the attacker sends it: a JSON body, raw body bytes with chosen
headers, or a raw HTTP message written in pieces (framing lies, slow clients).
:func:`send` delivers it over real HTTP and returns what came back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from identityd.app import build_edges, create_app
from identityd.callback.decision_log import DecisionLog
from identityd.devca.workload import DEV_ISSUER, DevCluster, DevPod
from identityd.keys.csr import PrivateKey, generate_key
from identityd.keys.issuer import TokenIssuer, thumbprint
from identityd.metrics import Metrics
from identityd.settings import Settings
from tests.conftest import Service, make_settings, start_service

T = TypeVar("T")
R = TypeVar("R")

# The corpus service runs with --max-token-age so that "too old" is testable.
MAX_TOKEN_AGE_SECONDS = 600
# Slow-body cases wait this long for the cut-off instead of the production 5 s.
CORPUS_BODY_TIMEOUT_SECONDS = 0.4
# A 400 written by aiohttp's HTTP parser before any identityd code runs: not
# JSON, so it carries no identityd reason code. The corpus names it this way.
FRAMING = "HTTP_FRAMING_REJECTED"
# A raw exchange that takes longer than this is a hung server, not an answer.
RAW_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class WorldPods:
    api: DevPod  # the legitimate pod most attacks start from
    other: DevPod  # same namespace and service account, another pod
    billing: DevPod  # another namespace and service account, on node-2
    terminating: DevPod
    pending: DevPod
    succeeded: DevPod
    failed: DevPod
    wrong_sa: DevPod  # runs as "admin"; tokens for it are minted naming "api"
    dash: DevPod  # namespace team--x -> domain team-x
    dot: DevPod  # namespace team-x  -> domain team.x
    gone: DevPod  # never in the inventory (deleted)


@dataclass(frozen=True)
class Attackers:
    same_kid: TokenIssuer  # RSA, publishes the victim cluster's kid
    rsa: TokenIssuer  # RSA, its own kid
    ec: TokenIssuer  # EC P-256, its own kid


@dataclass(frozen=True)
class World:
    cluster: DevCluster
    pods: WorldPods
    attackers: Attackers

    def token(self, pod: DevPod, **kwargs: Any) -> str:
        return self.cluster.token(pod, **kwargs)

    def confirmation(self, pod: DevPod | None = None, **kwargs: Any) -> dict[str, Any]:
        return self.cluster.confirmation(pod or self.pods.api, **kwargs)

    def claims(self, pod: DevPod | None = None, **kwargs: Any) -> dict[str, Any]:
        """The claims of a fresh genuine token for ``pod`` (to tamper with)."""
        return decode_segment(self.token(pod or self.pods.api, **kwargs).split(".")[1])

    @property
    def kid(self) -> str:
        return self.cluster.issuer.kid

    @property
    def signing_key(self) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
        return self.cluster.issuer.private_key


def build_world(cluster: DevCluster) -> World:
    """Add the corpus pods to ``cluster`` (before it is written out)."""
    add = cluster.add_pod
    wrong_sa = add("sports-web", "api-6", "admin", "10.1.2.8")
    pods = WorldPods(
        api=add("sports-web", "api-1", "api", "10.1.2.3"),
        other=add("sports-web", "api-2", "api", "10.1.2.4"),
        billing=add("payments", "billing-0", "billing", "10.2.0.7", node="node-2"),
        terminating=add("sports-web", "api-3", "api", "10.1.2.5", terminating=True),
        pending=add("sports-web", "api-4", "api", "10.1.2.6", phase="Pending"),
        succeeded=add("sports-web", "job-1", "api", "10.1.2.10", phase="Succeeded"),
        failed=add("sports-web", "job-2", "api", "10.1.2.11", phase="Failed"),
        # The token names "api"; the inventory says the pod runs as "admin".
        wrong_sa=replace(wrong_sa, service_account="api"),
        dash=add("team--x", "svc-0", "svc", "10.3.0.1"),
        dot=add("team-x", "svc-0", "svc", "10.3.0.2"),
        gone=DevPod("sports-web", "api-gone", "api", "10.1.2.9"),
    )
    attackers = Attackers(
        same_kid=TokenIssuer(DEV_ISSUER, kid=cluster.issuer.kid),
        rsa=TokenIssuer(DEV_ISSUER),
        ec=TokenIssuer(DEV_ISSUER, key_type="EC"),
    )
    return World(cluster=cluster, pods=pods, attackers=attackers)


@asynccontextmanager
async def serve_world(world: World, directory: Path) -> AsyncIterator[Service]:
    """identityd wired as the ``service`` fixture wires it (real HTTP on loopback,
    embedded engine, default policies) over ``world``, with --max-token-age set.

    The client opens a fresh connection per request: a request the server answers
    by closing its connection must not turn the next one into a disconnect."""
    server, svc = await start_service(_world_settings(world, directory))
    await svc.http.close()
    svc.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    try:
        yield svc
    finally:
        await svc.http.close()
        await server.close()
        await svc.edges.aclose()


@asynccontextmanager
async def serve_world_as_in_production(world: World, directory: Path) -> AsyncIterator[Service]:
    """As :func:`serve_world`, but served by a ``web.AppRunner`` as ``identityd serve``
    serves it. The difference that matters: aiohttp's TestServer cancels a handler
    whose client goes away (``handler_cancellation=True``); ``identityd serve`` does
    not, and the handler's body read fails instead."""
    settings = _world_settings(world, directory)
    metrics = Metrics()
    edges = await build_edges(settings, metrics)
    app = create_app(settings, edges, metrics=metrics, decision_log=DecisionLog())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        try:
            yield Service(
                url=f"http://127.0.0.1:{port}",
                http=http,
                settings=settings,
                edges=edges,
                metrics=metrics,
            )
        finally:
            await http.close()
    finally:
        await runner.cleanup()
        await edges.aclose()


def _world_settings(world: World, directory: Path) -> Settings:
    settings = make_settings(world.cluster, directory)
    return replace(
        settings, tokens=replace(settings.tokens, max_age_seconds=MAX_TOKEN_AGE_SECONDS)
    )


# --- corpus cases ---------------------------------------------------------------------

CATEGORIES = (
    "token forgery",
    "claim abuse",
    "identity confusion",
    "SAN abuse",
    "stale identity",
    "protocol abuse",
    "key abuse",
)


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    status: int
    codes: frozenset[str]
    build: Callable[[World], Wire]
    # A known product gap: the case is expected to fail (strict xfail) until the fix
    # named here lands; the answer is still never a 200.
    gap: str = ""


def case(
    category: str,
    name: str,
    status: int,
    codes: str | set[str],
    build: Callable[[World], Wire],
    gap: str = "",
) -> Case:
    return Case(
        name=name,
        category=category,
        status=status,
        codes=frozenset({codes} if isinstance(codes, str) else codes),
        build=build,
        gap=gap,
    )


def bound(value: T, build: Callable[[World, T], R]) -> Callable[[World], R]:
    """``build`` with ``value`` fixed: a case builder made in a loop."""
    return lambda w: build(w, value)


# --- JOSE by hand: tokens no library would sign ---------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: object) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def decode_segment(segment: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    )
    return decoded


def signer(key: Any, alg: str) -> Callable[[bytes], bytes]:
    """Sign with any pyjwt algorithm and key, RFC 7515 wire form (raw r||s for EC)."""
    algorithm = jwt.algorithms.get_default_algorithms()[alg]
    return lambda data: algorithm.sign(data, key)


def hmac_signer(secret: bytes, alg: str) -> Callable[[bytes], bytes]:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    return lambda data: hmac.new(secret, data, digest).digest()


def jws(
    header: object | str,
    claims: object | str,
    sign: Callable[[bytes], bytes] | None = None,
) -> str:
    """A compact JWS; a ``str`` header or payload is used as the literal JSON text."""
    head = b64(header.encode()) if isinstance(header, str) else b64json(header)
    body = b64(claims.encode()) if isinstance(claims, str) else b64json(claims)
    signing_input = f"{head}.{body}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, pkcs1: bool = False) -> bytes:
    if pkcs1 and isinstance(key, rsa.RSAPrivateKey):
        return key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        )
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_der(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_jwk(issuer: TokenIssuer) -> dict[str, str]:
    return issuer.jwks()["keys"][0]


def jwk_thumbprint(issuer: TokenIssuer) -> str:
    return thumbprint(public_jwk(issuer))


def self_signed_der(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    """A certificate for the attacker's key (for an ``x5c`` header)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2040, 1, 1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


# --- CSRs no honest agent would send ----------------------------------------------------


def custom_csr(
    *,
    cn: str | Sequence[str] | None,
    names: Sequence[x509.GeneralName] = (),
    key: PrivateKey | None = None,
) -> str:
    """A PEM CSR with exactly these subject CNs and SANs (email, dirName, ... allowed)."""
    key = key or generate_key("EC")
    cns = [] if cn is None else [cn] if isinstance(cn, str) else list(cn)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, c) for c in cns])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    digest = (
        None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        else (hashes.SHA256())
    )
    return builder.sign(key, digest).public_bytes(serialization.Encoding.PEM).decode("ascii")


def honest_names(world: World, pod: DevPod) -> list[x509.GeneralName]:
    """The SANs an honest agent in ``pod`` puts in its CSR."""
    ident = world.cluster.identity(pod)
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in ident.san_dns()]
    names.append(x509.IPAddress(ipaddress.ip_address(pod.ip)))
    names += [x509.UniformResourceIdentifier(u) for u in ident.san_uris()]
    return names


# --- the wire ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """One request as the attacker sends it. Exactly one of body/data/raw is used."""

    path: str = "/instance"
    body: Any = None  # JSON-encodable: sent with Content-Type application/json
    data: bytes | None = None  # body bytes, sent with ``headers`` as given
    headers: Mapping[str, str] = field(default_factory=dict)
    raw: tuple[bytes, ...] = ()  # a whole HTTP/1.1 message, written piece by piece
    pause: float = 0.0  # seconds between raw pieces


@dataclass(frozen=True)
class Answer:
    status: int
    codes: frozenset[str]
    json_body: dict[str, Any] | None


def codes_of(status: int, message: str) -> frozenset[str]:
    """A 403 lists codes joined by ", "; other errors are "CODE: detail"."""
    if status == 403:
        return frozenset(message.split(", "))
    return frozenset({message.split(":", 1)[0]})


def _answer(status: int, text: str) -> Answer:
    try:
        doc = json.loads(text)
    except ValueError:
        return Answer(status, frozenset({FRAMING}) if status == 400 else frozenset(), None)
    if not isinstance(doc, dict):
        return Answer(status, frozenset(), None)
    message = doc.get("message")
    codes = codes_of(status, message) if isinstance(message, str) else frozenset()
    return Answer(status, codes, doc)


async def send(http: Any, url: str, wire: Wire) -> Answer:
    """Deliver ``wire`` to the service at ``url`` (``http://127.0.0.1:PORT``)."""
    if wire.raw:
        return await _send_raw(url, wire)
    if wire.data is not None:
        async with http.post(f"{url}{wire.path}", data=wire.data, headers=dict(wire.headers)) as r:
            return _answer(r.status, await r.text())
    async with http.post(f"{url}{wire.path}", json=wire.body, headers=dict(wire.headers)) as r:
        return _answer(r.status, await r.text())


async def _send_raw(url: str, wire: Wire) -> Answer:
    port = int(url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(RAW_TIMEOUT_SECONDS):
            for index, piece in enumerate(wire.raw):
                if index and wire.pause:
                    await asyncio.sleep(wire.pause)
                if writer.is_closing():
                    break
                writer.write(piece)
                try:
                    await writer.drain()
                except ConnectionError:
                    break
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            text = (await reader.readexactly(length)).decode("utf-8", "replace") if length else ""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return _answer(status, text)


def raw_request(
    path: str,
    body: bytes,
    *,
    headers: Mapping[str, str | None] | None = None,
    pieces: int = 1,
) -> tuple[bytes, ...]:
    """A whole HTTP/1.1 POST; ``headers`` replace the defaults (None drops one)."""
    fields: dict[str, str | None] = {
        "Host": "identityd",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    fields.update(headers or {})
    head = f"POST {path} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in fields.items() if v is not None
    )
    message = head.encode("latin-1") + b"\r\n" + body
    if pieces <= 1:
        return (message,)
    split = len(head) + 2
    step = max(1, (len(message) - split) // (pieces - 1))
    rest = [message[i : i + step] for i in range(split, len(message), step)]
    return (message[:split], *rest)
