"""The one error hierarchy of identityd, each category mapped to one HTTP status.

    IdentitydError                      root; never raised itself
    ├── BadRequest            400       malformed input (JSON, types, base64, CSR syntax)
    │   └── PayloadTooLarge   413       body over the configured limit
    ├── Denied                403       attestation or policy says no
    │   ├── InvalidToken                the attestation token does not verify
    │   └── InvalidCSR                  the CSR parses but does not verify or match
    ├── Unavailable           503       a dependency cannot answer; fail closed
    │   ├── InventoryUnavailable        pod inventory not synced, stale or unreachable
    │   ├── PolicyUnavailable           engine down, timed out, undefined or broken decision
    │   └── KeysUnavailable             no verification keys obtainable
    └── ConfigError                     bad configuration at start-up (never a request)
        └── PolicyCompileError          a policy set failed to compile; the old set stays

Every error carries one or more stable reason codes (``UPPER_SNAKE``), which the
CA sees in the deny message and the decision log records. ``detail`` is for the
log only: it may name what was wrong but never contains a token, key or CSR.
"""

from __future__ import annotations


class IdentitydError(Exception):
    """Root of every error identityd raises on purpose."""

    status: int = 500
    default_code: str = "INTERNAL"

    def __init__(self, code: str | None = None, detail: str = "") -> None:
        self.code = code or self.default_code
        self.detail = detail
        super().__init__(f"{self.code}: {detail}" if detail else self.code)

    @property
    def reasons(self) -> list[str]:
        """Reason strings in the ``CODE: detail`` form the decision document uses."""
        return [f"{self.code}: {self.detail}" if self.detail else self.code]

    @property
    def codes(self) -> list[str]:
        """The distinct reason codes, sorted: what a caller may see of a deny."""
        return sorted({r.split(":", 1)[0].strip() for r in self.reasons})


class BadRequest(IdentitydError):
    status = 400
    default_code = "BAD_REQUEST"


class PayloadTooLarge(BadRequest):
    status = 413
    default_code = "BODY_TOO_LARGE"


class Denied(IdentitydError):
    status = 403
    default_code = "DENIED"

    def __init__(
        self, code: str | None = None, detail: str = "", *, reasons: list[str] | None = None
    ) -> None:
        super().__init__(code, detail)
        self._reasons = list(reasons) if reasons else None

    @property
    def reasons(self) -> list[str]:
        return self._reasons if self._reasons is not None else super().reasons


class InvalidToken(Denied):
    default_code = "TOKEN_INVALID"


class InvalidCSR(Denied):
    default_code = "CSR_INVALID"


class Unavailable(IdentitydError):
    status = 503
    default_code = "UNAVAILABLE"


class InventoryUnavailable(Unavailable):
    default_code = "INVENTORY_UNAVAILABLE"


class PolicyUnavailable(Unavailable):
    default_code = "POLICY_UNAVAILABLE"


class KeysUnavailable(Unavailable):
    default_code = "TOKEN_KEYS_UNAVAILABLE"


class ConfigError(IdentitydError):
    default_code = "CONFIG_ERROR"


class PolicyCompileError(ConfigError):
    """A policy set failed to compile or was refused; the previous set stays in force."""

    default_code = "POLICY_COMPILE_ERROR"

    def __init__(self, detail: str, module: str | None = None) -> None:
        self.module = module
        super().__init__(None, f"{module}: {detail}" if module else detail)
