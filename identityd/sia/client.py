"""The agent's CA edge: ZTS register and refresh over HTTPS (refresh with mTLS).

aiohttp errors stop here. A 4xx answer is ``Denied("CA_REFUSED")`` carrying the
CA's message (the provider's reason codes); a 5xx, a timeout or no connection is
``Unavailable`` (retried with backoff); a 2xx that is not an InstanceIdentity is
``Unavailable("CA_BAD_RESPONSE")``. Redirects are not followed (a 307/308 re-posts the
body, token included, wherever it points, plain HTTP too): a 3xx is ``Unavailable``.
Anything shaped like a JWT is cut out of the CA's message before it is reported.
"""

from __future__ import annotations

import json
import re
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from identityd.errors import ConfigError, Denied, Unavailable
from identityd.keys.zts_wire import (
    INSTANCE_PATH,
    ZTS_PREFIX,
    InstanceIdentity,
    InstanceRefreshInformation,
    InstanceRegisterInformation,
    read_answer,
    refresh_path,
)

MAX_ANSWER_BYTES = 256 * 1024
MAX_MESSAGE_CHARS = 512
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A JWT (or the start of one a message cut short): base64url JSON ``{"...`` then parts.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}")


def base_url(url: str) -> str:
    """``https://ca:4443``, ``.../`` and ``.../zts/v1`` all mean the same CA."""
    url = url.rstrip("/")
    return url[: -len(ZTS_PREFIX)] if url.endswith(ZTS_PREFIX) else url


def _message(raw: bytes) -> str:
    try:
        doc = json.loads(raw)
        text = str(doc.get("message", "")) if isinstance(doc, dict) else ""
    except ValueError:
        text = raw.decode("utf-8", "replace")
    # Redacted before it is cut, so a cut cannot leave a token's tail unrecognised.
    text = _JWT.sub("<jwt>", _CONTROL.sub(" ", text))
    return text.strip()[:MAX_MESSAGE_CHARS] or "(no message)"


def _identity(doc: Any) -> InstanceIdentity:
    if not isinstance(doc, dict):
        raise Unavailable("CA_BAD_RESPONSE", "the answer is not a JSON object")
    for key in ("provider", "name", "instanceId", "x509Certificate"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise Unavailable("CA_BAD_RESPONSE", f"the answer has no {key}")
    signer = doc.get("x509CertificateSigner")
    identity: InstanceIdentity = {
        "provider": doc["provider"],
        "name": doc["name"],
        "instanceId": doc["instanceId"],
        "x509Certificate": doc["x509Certificate"],
    }
    if isinstance(signer, str) and signer:
        identity["x509CertificateSigner"] = signer
    return identity


class ZTSClient:
    """One CA; a fresh TLS context per call (refresh presents whatever is current)."""

    def __init__(self, url: str, *, ca_bundle: Path | None, timeout: float) -> None:
        self._base = base_url(url)
        self._ca_bundle = ca_bundle
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def _context(self, cert_dir: Path | None = None) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(
                cafile=str(self._ca_bundle) if self._ca_bundle else None
            )
            if cert_dir is not None:
                ctx.load_cert_chain(cert_dir / "cert.pem", cert_dir / "key.pem")
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("CONFIG_ERROR", f"TLS files: {exc}") from exc
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def register(self, info: InstanceRegisterInformation) -> InstanceIdentity:
        """``POST /zts/v1/instance`` → 201 + InstanceIdentity."""
        return await self._post(INSTANCE_PATH, info, self._context())

    async def refresh(
        self,
        info: InstanceRefreshInformation,
        *,
        provider: str,
        domain: str,
        service: str,
        instance_id: str,
        cert_dir: Path,
    ) -> InstanceIdentity:
        """``POST /zts/v1/instance/{provider}/{domain}/{service}/{instanceId}`` over mTLS
        with the key and certificate in ``cert_dir``."""
        path = refresh_path(provider, domain, service, instance_id)
        return await self._post(path, info, self._context(cert_dir))

    async def _post(self, path: str, body: Any, ctx: ssl.SSLContext) -> InstanceIdentity:
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as http,
                http.post(self._base + path, json=body, ssl=ctx, allow_redirects=False) as resp,
            ):
                status = resp.status
                raw = await read_answer(resp.content, MAX_ANSWER_BYTES)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise Unavailable(
                "CA_UNREACHABLE", f"the CA's certificate does not verify: {exc.certificate_error}"
            ) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable("CA_UNREACHABLE", f"{self._base}: {type(exc).__name__}") from exc
        if 400 <= status < 500:
            raise Denied("CA_REFUSED", f"{status}: {_message(raw)}")
        if status not in (200, 201):
            raise Unavailable("CA_UNAVAILABLE", f"{status}: {_message(raw)}")
        if len(raw) > MAX_ANSWER_BYTES:
            raise Unavailable("CA_BAD_RESPONSE", "the answer is too large")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise Unavailable("CA_BAD_RESPONSE", "the answer is not JSON") from exc
        return _identity(doc)
