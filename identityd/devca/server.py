"""`identityd dev-ca`: the development CA served over HTTPS (a development tool only).

Routes (ZTS's paths): ``POST /zts/v1/instance`` (register, 201 + ``Location``),
``POST /zts/v1/instance/{provider}/{domain}/{service}/{instanceId}`` (refresh,
mTLS with the current certificate, 200), ``GET /healthz``. Errors are ZTS
ResourceError bodies ``{"code": status, "message": "CODE: detail"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import aiohttp
from aiohttp import web
from cryptography import x509

from identityd.devca.ca import DevCA, DevCASettings
from identityd.devca.provider import (
    PROVIDER_TIMEOUT_SECONDS,
    HTTPSProvider,
    Provider,
    provider_ssl_context,
)
from identityd.devca.state import DevCAFiles, issue_to, prepare_state
from identityd.errors import ConfigError, IdentitydError
from identityd.keys.certs import CertificateAuthority
from identityd.keys.zts_wire import INSTANCE_PATH, ResourceError
from identityd.settings import DEFAULT_MAX_BODY_BYTES, IdentitySettings, host_port

log = logging.getLogger("identityd.devca")

DEFAULT_CLIENT_CN = "dev-ca.zts"
EXIT_OK, EXIT_USAGE = 0, 2
CA_KEY: web.AppKey[DevCA] = web.AppKey("devca", DevCA)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class DevCAServerSettings:
    state_dir: Path
    providers: Mapping[str, str]  # provider service name -> https endpoint
    # Trust for providers' server certificates; default: the dev CA's own certificate.
    provider_ca: Path | None = None
    client_cn: str = DEFAULT_CLIENT_CN
    server_names: tuple[str, ...] = ("localhost",)
    server_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    listen: str = "127.0.0.1:4443"
    provider_timeout: float = PROVIDER_TIMEOUT_SECONDS
    ca: DevCASettings = field(default_factory=DevCASettings)


def _error(status: int, message: str) -> web.Response:
    body: ResourceError = {"code": status, "message": message}
    return web.json_response(body, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except IdentitydError as exc:
        log.info("%s %s: %s", request.method, request.path, exc)
        return _error(exc.status, str(exc))
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "BODY_TOO_LARGE")


def _client_ip(request: web.Request) -> str:
    # clientIP is the TCP peer, as ZTS takes it (ServletRequestUtil.getRemoteAddress).
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if isinstance(peer, tuple) else ""


def _client_cert(request: web.Request) -> x509.Certificate | None:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return x509.load_der_x509_certificate(der) if der else None


async def _register(request: web.Request) -> web.Response:
    identity, location = await request.app[CA_KEY].register(
        await request.read(), client_ip=_client_ip(request)
    )
    return web.json_response(identity, status=201, headers={"Location": location})


async def _refresh(request: web.Request) -> web.Response:
    match = request.match_info
    identity = await request.app[CA_KEY].refresh(
        await request.read(),
        provider=match["provider"],
        domain=match["domain"],
        service=match["service"],
        instance_id=match["instance_id"],
        client_ip=_client_ip(request),
        client_cert=_client_cert(request),
    )
    return web.json_response(identity, status=200)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(ca: DevCA) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=DEFAULT_MAX_BODY_BYTES)
    app[CA_KEY] = ca
    app.router.add_post(INSTANCE_PATH, _register)
    app.router.add_post(INSTANCE_PATH + "/{provider}/{domain}/{service}/{instance_id}", _refresh)
    app.router.add_get("/healthz", _healthz)
    return app


def server_context(files: DevCAFiles) -> ssl.SSLContext:
    """HTTPS for agents; a client certificate is optional (register has none) and, when
    given, must chain to this CA (refresh presents the one it issued)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.server_cert, files.server_key)
    ctx.load_verify_locations(cafile=files.ca_cert)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class DevCAService:
    """The dev CA serving on an already-bound socket; an async context manager."""

    def __init__(self, settings: DevCAServerSettings, sock: socket.socket) -> None:
        if not settings.providers:
            raise ConfigError("CONFIG_ERROR", "the dev CA needs at least one --provider")
        self._settings = settings
        self._sock = sock
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.ca: DevCA | None = None
        self.authority: CertificateAuthority | None = None
        self.files = DevCAFiles(settings.state_dir)

    @property
    def url(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"https://{f'[{host}]' if ':' in host else host}:{port}"

    async def __aenter__(self) -> DevCAService:
        settings = self._settings
        authority, self.files = prepare_state(
            settings.state_dir,
            client_cn=settings.client_cn,
            server_names=settings.server_names,
            server_ips=settings.server_ips,
        )
        provider_ca = str(settings.provider_ca or self.files.ca_cert)
        self._session = aiohttp.ClientSession()
        try:
            providers: dict[str, Provider] = {
                name: HTTPSProvider(
                    name,
                    endpoint,
                    session=self._session,
                    ssl_context=provider_ssl_context(
                        name,
                        ca_file=provider_ca,
                        client_cert=str(self.files.client_cert),
                        client_key=str(self.files.client_key),
                    ),
                    timeout=settings.provider_timeout,
                )
                for name, endpoint in settings.providers.items()
            }
            self.authority = authority
            self.ca = DevCA(authority, providers, settings.ca)
            self._runner = web.AppRunner(create_app(self.ca), access_log=None, handle_signals=False)
            await self._runner.setup()
            site = web.SockSite(self._runner, self._sock, ssl_context=server_context(self.files))
            await site.start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        log.info("dev CA serving on %s (state in %s)", self.url, settings.state_dir)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None


def bind(address: str) -> socket.socket:
    host, port = host_port(address)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


# --- command line ------------------------------------------------------------------------------

DESCRIPTION = (
    "A DEVELOPMENT CA speaking the register/refresh subset of the Athenz ZTS API. "
    "It asks the provider (identityd) before it signs, exactly as ZTS does, so the "
    "whole flow runs on one machine. Not a production CA: keys and instance records "
    "live in a local directory and in memory, there is no revocation and no ZMS."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = IdentitySettings()
    parser.description = DESCRIPTION
    parser.add_argument("--listen", default="127.0.0.1:4443", help="HOST:PORT to serve HTTPS on")
    parser.add_argument(
        "--state-dir",
        required=True,
        type=Path,
        help="directory for the CA key and certificates (created; the CA key is kept)",
    )
    parser.add_argument(
        "--provider",
        action="append",
        default=[],
        metavar="NAME=URL",
        help=f"provider service name and its https endpoint, e.g. "
        f"{defaults.provider}=https://localhost:8443 (repeatable)",
    )
    parser.add_argument(
        "--provider-ca",
        type=Path,
        default=None,
        help="CA bundle for providers' server certificates (default: this CA's certificate)",
    )
    parser.add_argument(
        "--client-cn",
        default=DEFAULT_CLIENT_CN,
        help="CN of the client certificate presented to providers (add it to identityd's "
        "--allowed-client)",
    )
    parser.add_argument(
        "--server-name",
        action="append",
        default=None,
        help="DNS name for this CA's HTTPS certificate (repeatable; default localhost)",
    )
    parser.add_argument(
        "--server-ip",
        action="append",
        default=None,
        help="IP address for this CA's HTTPS certificate (repeatable; default loopback)",
    )
    parser.add_argument(
        "--write-provider-certs",
        type=Path,
        default=None,
        metavar="DIR",
        help="also issue each provider a server certificate (CN = provider name, SAN "
        "localhost and loopback) into DIR as <provider>.pem/.key, for identityd's --tls-cert",
    )
    parser.add_argument(
        "--default-expiry-minutes", type=int, default=DevCASettings.default_expiry_minutes
    )
    parser.add_argument("--max-expiry-minutes", type=int, default=DevCASettings.max_expiry_minutes)
    parser.add_argument(
        "--no-forward-csr",
        action="store_true",
        help="do not send the PEM CSR to the provider as attribute 'csr' (ZTS sends only "
        "csrPublicKey)",
    )
    parser.add_argument(
        "--no-csr-public-key",
        action="store_true",
        help="do not send attribute csrPublicKey (PEM), which ZTS sends",
    )
    parser.add_argument("--log-level", default="INFO")


def settings_from_args(args: argparse.Namespace) -> DevCAServerSettings:
    providers: dict[str, str] = {}
    for item in args.provider:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise ConfigError("CONFIG_ERROR", f"--provider: expected NAME=URL, got {item!r}")
        providers[name.lower()] = url
    if not providers:
        raise ConfigError("CONFIG_ERROR", "--provider NAME=URL is required")
    if args.default_expiry_minutes <= 0 or args.max_expiry_minutes <= 0:
        raise ConfigError("CONFIG_ERROR", "expiry minutes must be positive")
    return DevCAServerSettings(
        state_dir=args.state_dir,
        providers=providers,
        provider_ca=args.provider_ca,
        client_cn=args.client_cn,
        server_names=tuple(args.server_name or ("localhost",)),
        server_ips=tuple(args.server_ip or ("127.0.0.1", "::1")),
        listen=args.listen,
        ca=DevCASettings(
            default_expiry_minutes=args.default_expiry_minutes,
            max_expiry_minutes=args.max_expiry_minutes,
            forward_csr=not args.no_forward_csr,
            send_csr_public_key=not args.no_csr_public_key,
        ),
    )


async def serve(settings: DevCAServerSettings, provider_certs: Path | None = None) -> None:
    sock = bind(settings.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with DevCAService(settings, sock) as service:
        if provider_certs is not None and service.authority is not None:
            write_provider_certs(service.authority, settings.providers, provider_certs)
        print(f"dev CA (development only) on {service.url}; CA certificate {service.files.ca_cert}")
        await stop.wait()
    sock.close()


def write_provider_certs(
    authority: CertificateAuthority, providers: Mapping[str, str], out: Path
) -> None:
    """A server certificate per provider (CN = its name) for identityd's --tls-cert."""
    out.mkdir(parents=True, exist_ok=True)
    for name in providers:
        issue_to(
            authority,
            out / f"{name}.pem",
            out / f"{name}.key",
            common_name=name,
            usage="server",
            dns=("localhost",),
            ips=("127.0.0.1", "::1"),
        )


def devca_main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(settings_from_args(args), args.write_provider_certs))
    except ConfigError as exc:
        print(f"identityd dev-ca: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"identityd dev-ca: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return EXIT_OK
