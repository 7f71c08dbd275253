"""The agent's configuration: flags for what the deployment decides, the downward-API
environment for what the pod is, and one frozen value handed to everything else."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from identityd.errors import ConfigError
from identityd.settings import IdentitySettings

# Where a projected service-account token with audience "identityd" is mounted (k8s/).
DEFAULT_TOKEN_FILE = "/var/run/secrets/identityd/token"  # noqa: S105 - a path
DEFAULT_OUT_DIR = "/var/run/identityd/certs"
# Refresh at 70% of the lifetime minus up to 10% jitter, so a fleet started together
# does not refresh together.
DEFAULT_REFRESH_FRACTION = 0.7
DEFAULT_JITTER_FRACTION = 0.1
# Backoff between failed attempts: doubles from the first to the last, each delay
# drawn from [50%, 100%] of the step (jitter).
DEFAULT_RETRY_INITIAL_SECONDS = 1.0
DEFAULT_RETRY_MAX_SECONDS = 300.0
# --once: how many attempts an unreachable CA gets before the init container gives up.
DEFAULT_ONCE_ATTEMPTS = 5
# One HTTP exchange with the CA; ZTS waits up to 30 s for a provider itself.
DEFAULT_TIMEOUT_SECONDS = 45.0
# Downward-API variables the agent reads (see docs/agent-and-dev-ca.md for the pod spec).
ENV_NAMESPACE = "POD_NAMESPACE"
ENV_POD_NAME = "POD_NAME"
ENV_POD_UID = "POD_UID"
ENV_POD_IP = "POD_IP"
ENV_POD_IPS = "POD_IPS"  # status.podIPs, comma-separated (dual stack)
ENV_SERVICE_ACCOUNT = "POD_SERVICE_ACCOUNT"
POD_ENV_KEYS = (
    ENV_NAMESPACE,
    ENV_POD_NAME,
    ENV_POD_UID,
    ENV_POD_IP,
    ENV_POD_IPS,
    ENV_SERVICE_ACCOUNT,
)
KEY_TYPES = ("EC", "RSA")
RSA_BITS = (2048, 3072, 4096)
SPIFFE_FORMS = ("athenz", "k8s")


@dataclass(frozen=True)
class AgentConfig:
    ca_url: str
    token_file: Path = Path(DEFAULT_TOKEN_FILE)
    out_dir: Path = Path(DEFAULT_OUT_DIR)
    provider: str = IdentitySettings.provider
    dns_suffix: str = IdentitySettings.dns_suffixes[0]
    trust_domain: str = IdentitySettings.trust_domain
    spiffe: str = "athenz"
    extra_dns: tuple[str, ...] = ()
    key_type: str = "EC"
    key_bits: int | None = None
    # Trust anchors for the CA's HTTPS certificate; None = the system's.
    ca_bundle: Path | None = None
    expiry_minutes: int | None = None
    refresh_fraction: float = DEFAULT_REFRESH_FRACTION
    jitter_fraction: float = DEFAULT_JITTER_FRACTION
    retry_initial: float = DEFAULT_RETRY_INITIAL_SECONDS
    retry_max: float = DEFAULT_RETRY_MAX_SECONDS
    once_attempts: int = DEFAULT_ONCE_ATTEMPTS
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    once: bool = False
    # The downward-API environment (POD_NAMESPACE, POD_NAME, POD_UID, POD_IP, ...).
    pod_env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ca_url.startswith("https://"):
            raise ConfigError("CONFIG_ERROR", "--ca-url must be https:// (refresh uses mTLS)")
        if self.key_type not in KEY_TYPES:
            raise ConfigError("CONFIG_ERROR", f"--key-type: one of {KEY_TYPES}")
        if self.key_type == "RSA" and self.key_bits not in (None, *RSA_BITS):
            raise ConfigError("CONFIG_ERROR", f"--key-bits: RSA keys are {RSA_BITS} bits")
        if self.key_type == "EC" and self.key_bits not in (None, 256):
            raise ConfigError("CONFIG_ERROR", "--key-bits: EC keys are P-256 (256 bits)")
        if self.spiffe not in SPIFFE_FORMS:
            raise ConfigError("CONFIG_ERROR", f"--spiffe: one of {SPIFFE_FORMS}")
        if not 0.0 < self.refresh_fraction < 1.0:
            raise ConfigError("CONFIG_ERROR", "--refresh-fraction must be between 0 and 1")
        if not 0.0 <= self.jitter_fraction < self.refresh_fraction:
            raise ConfigError("CONFIG_ERROR", "--jitter must be >= 0 and < --refresh-fraction")
        if not 0.0 < self.retry_initial <= self.retry_max:
            raise ConfigError("CONFIG_ERROR", "need 0 < --retry-initial <= --retry-max")
        if self.once_attempts < 1 or self.timeout <= 0:
            raise ConfigError("CONFIG_ERROR", "--once-attempts and --timeout must be positive")
        if self.expiry_minutes is not None and self.expiry_minutes <= 0:
            raise ConfigError("CONFIG_ERROR", "--expiry-minutes must be positive")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``identityd sia``."""
    parser.description = (
        "The identity agent: reads the pod's bound service-account token, creates a key "
        "and CSR, registers with the CA (Athenz ZTS API) and keeps the certificate fresh. "
        "Pod facts come from the downward-API variables POD_NAMESPACE, POD_NAME, POD_UID, "
        "POD_IP/POD_IPS and POD_SERVICE_ACCOUNT, else from the token."
    )
    parser.add_argument("--ca-url", required=True, help="the CA's base URL (https://host:port)")
    parser.add_argument(
        "--ca-bundle", type=Path, default=None, help="trust anchors for the CA's HTTPS certificate"
    )
    parser.add_argument("--token-file", type=Path, default=Path(DEFAULT_TOKEN_FILE))
    parser.add_argument(
        "--out-dir", type=Path, default=Path(DEFAULT_OUT_DIR), help="where key and cert go"
    )
    parser.add_argument("--provider", default=AgentConfig.provider)
    parser.add_argument("--dns-suffix", default=AgentConfig.dns_suffix)
    parser.add_argument("--trust-domain", default=AgentConfig.trust_domain)
    parser.add_argument(
        "--spiffe",
        choices=SPIFFE_FORMS,
        default="athenz",
        help="SPIFFE URI form: spiffe://<domain>/sa/<service> (athenz) or "
        "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> (k8s)",
    )
    parser.add_argument(
        "--extra-dns",
        action="append",
        default=[],
        help="another SAN DNS name to ask for (the provider's policy must allow it)",
    )
    parser.add_argument("--key-type", choices=KEY_TYPES, default="EC")
    parser.add_argument("--key-bits", type=int, default=None, help="RSA: 2048, 3072 or 4096")
    parser.add_argument("--expiry-minutes", type=int, default=None, help="ask for this lifetime")
    parser.add_argument(
        "--refresh-fraction",
        type=float,
        default=DEFAULT_REFRESH_FRACTION,
        help="refresh after this fraction of the certificate's lifetime",
    )
    parser.add_argument(
        "--jitter",
        type=float,
        default=DEFAULT_JITTER_FRACTION,
        help="refresh up to this fraction of the lifetime earlier, at random",
    )
    parser.add_argument("--retry-initial", type=float, default=DEFAULT_RETRY_INITIAL_SECONDS)
    parser.add_argument("--retry-max", type=float, default=DEFAULT_RETRY_MAX_SECONDS)
    parser.add_argument("--once-attempts", type=int, default=DEFAULT_ONCE_ATTEMPTS)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS)
    parser.add_argument(
        "--once",
        action="store_true",
        help="get one certificate and exit (init container); default: keep refreshing",
    )
    parser.add_argument("--log-level", default="INFO")


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> AgentConfig:
    return AgentConfig(
        ca_url=args.ca_url,
        token_file=args.token_file,
        out_dir=args.out_dir,
        provider=args.provider,
        dns_suffix=args.dns_suffix,
        trust_domain=args.trust_domain,
        spiffe=args.spiffe,
        extra_dns=tuple(args.extra_dns),
        key_type=args.key_type,
        key_bits=args.key_bits,
        ca_bundle=args.ca_bundle,
        expiry_minutes=args.expiry_minutes,
        refresh_fraction=args.refresh_fraction,
        jitter_fraction=args.jitter,
        retry_initial=args.retry_initial,
        retry_max=args.retry_max,
        once_attempts=args.once_attempts,
        timeout=args.timeout,
        once=args.once,
        pod_env={key: env[key] for key in POD_ENV_KEYS if env.get(key)},
    )
