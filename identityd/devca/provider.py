"""The provider edge of the dev CA: ``POST {endpoint}/instance`` or ``/refresh`` over HTTPS.

Like ZTS's HTTP provider client, the CA presents its own client certificate and
accepts the provider only if the server certificate chains to the configured CA
*and* its CN is the provider's service name (ZTS's ProviderHostnameVerifier;
the host name in the URL is not what is checked). The CN check runs inside the
TLS handshake (:class:`_ProviderNameCheck`), so nothing — in particular not the
attestation token — is sent to a server that is not the provider.
"""

from __future__ import annotations

import json
import re
import ssl
from typing import Any, Protocol

import aiohttp
from cryptography import x509
from cryptography.x509.oid import NameOID

from identityd.errors import ConfigError, Denied, Unavailable
from identityd.keys.zts_wire import InstanceConfirmation, read_answer

# ZTS gives a provider this long; identityd answers far sooner (settings.py).
PROVIDER_TIMEOUT_SECONDS = 10.0
# A provider answer larger than this is not an InstanceConfirmation.
MAX_ANSWER_BYTES = 64 * 1024
# The part of a deny message passed on to the agent.
MAX_MESSAGE_CHARS = 512
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Provider(Protocol):
    name: str

    async def confirm(self, kind: str, confirmation: InstanceConfirmation) -> Any:
        """POST the confirmation to ``/instance`` (kind ``instance``) or ``/refresh``;
        return the decoded 200 answer, raise Denied for any other answer and
        Unavailable when the provider cannot be reached."""
        ...


class ProviderNameMismatch(ssl.SSLCertVerificationError):
    """The provider's certificate verified but its CN is not the provider name."""


class _ProviderNameCheck(ssl.SSLObject):
    # Set per provider by provider_ssl_context (a subclass per expected name).
    expected_cn = ""

    def do_handshake(self) -> None:
        super().do_handshake()
        der = self.getpeercert(binary_form=True)
        subject = x509.load_der_x509_certificate(der).subject if der else x509.Name([])
        names = [a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [self.expected_cn]:
            raise ProviderNameMismatch(
                f"provider certificate CN {names[0] if names else None!r} "
                f"is not {self.expected_cn!r}"
            )


def provider_ssl_context(
    provider: str, *, ca_file: str, client_cert: str, client_key: str
) -> ssl.SSLContext:
    """Client TLS for one provider: trust ``ca_file``, present the CA's client certificate,
    and require CN = ``provider`` instead of a host name match."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # replaced by the CN check, as in ZTS
    try:
        ctx.load_cert_chain(client_cert, client_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("CONFIG_ERROR", f"CA client certificate: {exc}") from exc
    ctx.sslobject_class = type(
        "ProviderNameCheck", (_ProviderNameCheck,), {"expected_cn": provider}
    )
    return ctx


def _message(raw: bytes) -> str:
    """The provider's deny message (``{"message": ...}`` or text), cleaned and bounded."""
    try:
        doc = json.loads(raw)
        text = str(doc.get("message", "")) if isinstance(doc, dict) else ""
    except ValueError:
        text = raw.decode("utf-8", "replace")
    return _CONTROL.sub(" ", text).strip()[:MAX_MESSAGE_CHARS]


class HTTPSProvider:
    """One provider endpoint; the session belongs to the caller (one per dev CA)."""

    def __init__(
        self,
        name: str,
        endpoint: str,
        *,
        session: aiohttp.ClientSession,
        ssl_context: ssl.SSLContext,
        timeout: float = PROVIDER_TIMEOUT_SECONDS,
    ) -> None:
        if not endpoint.startswith("https://"):
            raise ConfigError("CONFIG_ERROR", f"provider {name}: endpoint must be https://")
        self.name = name
        self._endpoint = endpoint.rstrip("/")
        self._session = session
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def confirm(self, kind: str, confirmation: InstanceConfirmation) -> Any:
        path = "/instance" if kind == "instance" else "/refresh"
        try:
            # No redirect is followed: a 307/308 would re-post the confirmation, token
            # included, wherever it points. Its status is a deny like any non-200.
            async with self._session.post(
                self._endpoint + path,
                json=confirmation,
                ssl=self._ssl,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                raw = await read_answer(resp.content, MAX_ANSWER_BYTES)
        except aiohttp.ClientConnectorCertificateError as exc:
            if isinstance(exc.certificate_error, ProviderNameMismatch):
                raise Denied("PROVIDER_IDENTITY_MISMATCH", str(exc.certificate_error)) from exc
            raise Denied(
                "PROVIDER_CERT_INVALID",
                f"provider certificate does not verify: {exc.certificate_error}",
            ) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(
                "PROVIDER_UNAVAILABLE", f"provider {self.name}: {type(exc).__name__}"
            ) from exc
        if status != 200:
            raise Denied("PROVIDER_DENIED", f"provider answered {status}: {_message(raw)}")
        if len(raw) > MAX_ANSWER_BYTES:
            raise Unavailable("PROVIDER_ANSWER_INVALID", "answer too large")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise Unavailable("PROVIDER_ANSWER_INVALID", "answer is not JSON") from exc
