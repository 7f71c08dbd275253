"""Where key sets come from: a :class:`KeySource` reads a file, a URL, or OIDC discovery.

One edge, two methods (``fetch`` and ``aclose``): a fetch gives the JWK Set
document as parsed JSON or raises KeysUnavailable, so the verifier's key cache
does not care where the keys live (the API server's own set, fetched with the
cluster's credentials, is :class:`~identityd.tokens.tokenreview.ClusterKeySource`).
URLs are https (http only on loopback), redirects are not followed, and a
bearer token goes to a discovered ``jwks_uri`` only on the discovery URL's origin.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import json
import os
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from identityd.errors import ConfigError, KeysUnavailable
from identityd.settings import JWKS_FETCH_TIMEOUT_SECONDS, TokenSettings

# A JWK Set is a few KiB; anything near this is not one (and must not eat memory).
MAX_JWKS_BYTES = 1024 * 1024
DISCOVERY_PATH = "/.well-known/openid-configuration"
# The API server's in-cluster Service (``kubernetes`` in ``default``), by the names a
# pod resolves; ``kubernetes.default.svc.<cluster domain>`` as well.
_API_SERVER_NAMES = frozenset({"kubernetes", "kubernetes.default", "kubernetes.default.svc"})

SessionFactory = Callable[[], aiohttp.ClientSession]
HeadersProvider = Callable[[], Mapping[str, str] | Awaitable[Mapping[str, str]]]


class KeySource(Protocol):
    async def fetch(self) -> object:
        """The current JWK Set document (parsed JSON); raise KeysUnavailable."""
        ...

    async def aclose(self) -> None: ...


class FileKeySource:
    """A JWK Set in a local file, re-read on every fetch (so rotation is picked up)."""

    def __init__(self, path: str | Path, *, max_bytes: int = MAX_JWKS_BYTES) -> None:
        self._path = Path(path)
        self._max_bytes = max_bytes

    async def fetch(self) -> object:
        try:
            data = await asyncio.to_thread(self._read)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise KeysUnavailable(None, f"{self._path}: {reason}") from exc
        if len(data) > self._max_bytes:
            raise KeysUnavailable(None, f"{self._path}: larger than {self._max_bytes} bytes")
        return _json_document(data, str(self._path))

    def _read(self) -> bytes:
        with self._path.open("rb") as file:
            return file.read(self._max_bytes + 1)

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"FileKeySource({str(self._path)!r})"


class _HTTPClient:
    """GETs of JSON documents over one lazily created session, which it owns.

    The session comes from ``session_factory`` (called once, inside the event
    loop) or is a plain one using ``ssl``; either way :meth:`aclose` closes it."""

    def __init__(
        self,
        *,
        session_factory: SessionFactory | None,
        ssl: ssl_module.SSLContext | None,
        timeout: float,
        max_bytes: int,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout: must be positive, got {timeout}")
        self._factory = session_factory
        self._ssl = ssl
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_bytes = max_bytes
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:  # a fetch after aclose() would leak a fresh session
            raise KeysUnavailable(None, "key source is closed")
        if self._session is None:
            if self._factory is not None:
                self._session = self._factory()
            else:
                connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
                self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def get_json(self, url: str, headers: Mapping[str, str]) -> object:
        where = redacted(url)
        try:
            # No redirects: keys come from the configured place, nowhere else.
            async with self._get_session().get(
                url, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as response:
                if response.status != 200:
                    raise KeysUnavailable(None, f"{where}: HTTP {response.status}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise KeysUnavailable(None, f"{where}: larger than {self._max_bytes} bytes")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KeysUnavailable(None, f"{where}: {type(exc).__name__}") from exc
        return _json_document(bytes(body), where)

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None


class URLKeySource:
    """A JWK Set at an https URL (http only on loopback), e.g. the API server's
    ``/openid/v1/jwks``. ``headers`` is asked before each fetch (a bearer token
    file may be rotated), and may be sync or async."""

    def __init__(
        self,
        url: str,
        *,
        session_factory: SessionFactory | None = None,
        ssl: ssl_module.SSLContext | None = None,
        headers: HeadersProvider | None = None,
        timeout: float = JWKS_FETCH_TIMEOUT_SECONDS,
        max_bytes: int = MAX_JWKS_BYTES,
    ) -> None:
        _check_url(url, "url")
        self._url = url
        self._headers = headers
        self._http = _HTTPClient(
            session_factory=session_factory, ssl=ssl, timeout=timeout, max_bytes=max_bytes
        )

    async def fetch(self) -> object:
        return await self._http.get_json(self._url, await _resolve_headers(self._headers))

    async def aclose(self) -> None:
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"URLKeySource({redacted(self._url)!r})"


class DiscoveryKeySource:
    """OIDC discovery: ``<url>/.well-known/openid-configuration`` → ``jwks_uri`` → JWK Set.

    ``issuer``, when given, must equal the discovery document's ``issuer``.
    ``headers`` go to the ``jwks_uri`` only when it has the discovery URL's
    origin, so a bearer token never leaks to another host."""

    def __init__(
        self,
        url: str,
        *,
        issuer: str | None = None,
        session_factory: SessionFactory | None = None,
        ssl: ssl_module.SSLContext | None = None,
        headers: HeadersProvider | None = None,
        timeout: float = JWKS_FETCH_TIMEOUT_SECONDS,
        max_bytes: int = MAX_JWKS_BYTES,
    ) -> None:
        _check_url(url, "url")
        path = urlsplit(url).path
        self._url = url if path.endswith(DISCOVERY_PATH) else url.rstrip("/") + DISCOVERY_PATH
        self._issuer = issuer
        self._headers = headers
        self._http = _HTTPClient(
            session_factory=session_factory, ssl=ssl, timeout=timeout, max_bytes=max_bytes
        )

    async def document(self, headers: Mapping[str, str] | None = None) -> Mapping[str, object]:
        """The discovery document, its ``issuer`` checked (KeysUnavailable otherwise).
        ``headers``: the ones to send (by default, asked of the provider)."""
        if headers is None:
            headers = await _resolve_headers(self._headers)
        document = await self._http.get_json(self._url, headers)
        where = redacted(self._url)
        if not isinstance(document, Mapping):
            raise KeysUnavailable(None, f"{where}: not a JSON object")
        if self._issuer is not None and document.get("issuer") != self._issuer:
            raise KeysUnavailable(None, f"{where}: issuer is not the configured one")
        return document

    async def fetch(self) -> object:
        headers = await _resolve_headers(self._headers)
        document = await self.document(headers)
        where = redacted(self._url)
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise KeysUnavailable(None, f"{where}: no jwks_uri")
        try:
            _check_url(jwks_uri, "jwks_uri")
        except ValueError as exc:
            raise KeysUnavailable(None, f"{where}: {exc}") from exc
        same_origin = _origin(jwks_uri) == _origin(self._url)
        return await self._http.get_json(jwks_uri, headers if same_origin else {})

    async def aclose(self) -> None:
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"DiscoveryKeySource({redacted(self._url)!r})"


def is_api_server_url(url: str, *, service_host: str | None = None) -> bool:
    """Whether ``url`` names the API server by its in-cluster Service
    (``kubernetes.default.svc`` and its other names) or by ``service_host`` (the
    pod's ``KUBERNETES_SERVICE_HOST``). Such a URL needs the cluster's CA and a
    service-account token: :func:`~identityd.tokens.tokenreview.jwks_key_source`
    fetches it through the cluster key source."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return False
    host = (parts.hostname or "").rstrip(".").lower()
    if host in _API_SERVER_NAMES or host.startswith("kubernetes.default.svc."):
        return True
    if not service_host:
        return False
    service_host = service_host.strip("[]").lower()
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(service_host)
    except ValueError:
        return host == service_host


def key_source_from_settings(
    settings: TokenSettings,
    *,
    session_factory: SessionFactory | None = None,
    ssl: ssl_module.SSLContext | None = None,
    headers: HeadersProvider | None = None,
    service_host: str | None = None,
) -> KeySource:
    """The source ``settings.jwks`` names: a path or ``file://`` URL, an http(s)
    URL of a JWK Set, or an http(s) URL ending in the OIDC discovery path.

    A URL of the in-cluster API server (:func:`is_api_server_url`; ``service_host``
    defaults to ``$KUBERNETES_SERVICE_HOST``) without ``headers`` and without a CA
    (``ssl`` or ``session_factory``) is a ConfigError: fetched bare, it fails TLS
    (the cluster CA is not in the system store) and authorization (the JWKS needs a
    service-account token), so the keys would never load."""
    location = settings.jwks
    if not location:
        raise ConfigError(None, "tokens.jwks: no JWKS file or URL configured")
    parts = urlsplit(location)
    if service_host is None:
        service_host = os.environ.get("KUBERNETES_SERVICE_HOST")
    bare = headers is None or (ssl is None and session_factory is None)
    if bare and is_api_server_url(location, service_host=service_host):
        raise ConfigError(
            "TOKENS_JWKS_API_SERVER",
            f"tokens.jwks: {redacted(location)} is the in-cluster API server, which needs "
            "the cluster CA and a service-account token; leave --jwks unset (or build the "
            "source with tokenreview.jwks_key_source) to fetch its keys with them",
        )
    if parts.scheme in ("http", "https"):
        kind = DiscoveryKeySource if parts.path.endswith(DISCOVERY_PATH) else URLKeySource
        http_args: dict[str, Any] = {
            "session_factory": session_factory,
            "ssl": ssl,
            "headers": headers,
            "timeout": settings.fetch_timeout_seconds,
        }
        if kind is DiscoveryKeySource:
            http_args["issuer"] = settings.issuer
        try:
            return kind(location, **http_args)
        except ValueError as exc:
            raise ConfigError(None, f"tokens.jwks: {exc}") from exc
    if parts.scheme == "file":
        return FileKeySource(parts.path)
    if parts.scheme:
        raise ConfigError(None, f"tokens.jwks: unsupported scheme {parts.scheme!r}")
    return FileKeySource(location)


def _check_url(url: str, name: str) -> None:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise ValueError(f"{name}: expected an https URL (http only on loopback)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    default_port = 443 if parts.scheme == "https" else 80
    return parts.scheme, parts.hostname, parts.port or default_port


def redacted(url: str) -> str:
    """The URL without credentials, query or fragment, for logs and details."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


async def _resolve_headers(provider: HeadersProvider | None) -> Mapping[str, str]:
    if provider is None:
        return {}
    try:
        headers = provider()
        return await headers if inspect.isawaitable(headers) else headers
    except OSError as exc:  # e.g. the bearer token file is gone
        raise KeysUnavailable(None, f"request headers: {type(exc).__name__}") from exc


def _json_document(data: bytes, where: str) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise KeysUnavailable(None, f"{where}: not JSON") from exc
