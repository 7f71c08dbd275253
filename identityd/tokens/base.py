"""The TokenVerifier edge: attestation token in, verified claims out, or InvalidToken."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The verified claims of a bound service-account token, as the policy sees them."""

    issuer: str
    audience: tuple[str, ...]
    subject: str
    namespace: str
    service_account: str
    service_account_uid: str
    pod_name: str
    pod_uid: str
    node_name: str | None
    node_uid: str | None
    issued_at: int
    expires_at: int
    not_before: int | None
    # "jwks" or "tokenreview": how the claims were established.
    verified_by: str = "jwks"


class TokenVerifier(Protocol):
    async def start(self) -> None:
        """Begin what verification needs in the background (e.g. fetch keys); never blocks
        on it and never raises for an unreachable dependency (``ready`` tells)."""
        ...

    @property
    def ready(self) -> bool:
        """Whether a token can be verified now (the ``tokens`` check of ``/readyz``)."""
        ...

    async def verify(self, token: str, *, now: float) -> TokenClaims:
        """Verify ``token`` at time ``now``; raise InvalidToken (or KeysUnavailable)."""
        ...

    async def aclose(self) -> None: ...
