"""The agent's loop: one attempt = read token → key + CSR → refresh or register → check the
answer → publish the files; attempts are scheduled by the certificate's lifetime and
retried with exponential backoff and jitter.

Refresh is tried when the output directory holds a certificate for this pod
that is still valid (it authenticates the refresh); if the CA refuses the
refresh (say it forgot the instance, or certRefresh was false) the same attempt
registers again with the token. The current files are replaced only by a
certificate that is for the new key, names the planned CN and SAN URIs (and no
other SPIFFE ID or instance), is valid now and chains to the CA's signer — a
failure of any kind leaves them as they are.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from identityd.errors import ConfigError, Denied, IdentitydError, Unavailable
from identityd.keys.ca_pem import CertFacts, cert_facts
from identityd.keys.csr import PrivateKey, build_csr, generate_key, key_to_pem, public_key_sha256
from identityd.keys.zts_wire import (
    INSTANCE_ID_URI_PREFIX,
    InstanceIdentity,
    InstanceRefreshInformation,
    InstanceRegisterInformation,
)
from identityd.settings import CLOCK_SKEW_SECONDS
from identityd.sia.client import ZTSClient
from identityd.sia.config import AgentConfig
from identityd.sia.files import Material, read_current, write_material
from identityd.sia.workload import CertPlan, plan_certificate, pod_facts, read_token, token_claims

log = logging.getLogger("identityd.sia")

# A certificate closer than this to its end is not used to authenticate a refresh.
MIN_REMAINING_SECONDS = 30.0
# Never schedule the next refresh sooner than this after a success (a very short
# certificate must not turn the loop into a busy one).
MIN_REFRESH_DELAY_SECONDS = 1.0
# Long waits are cut into steps this long, so a suspended machine or a clock jump is
# noticed within a step.
MAX_WAIT_STEP_SECONDS = 60.0


@dataclass(frozen=True)
class Issued:
    kind: str  # "instance" (registered) or "refresh"
    directory: Path  # the generation written
    plan: CertPlan
    facts: CertFacts


@dataclass
class AgentStatus:
    """What the loop has done, for logs and tests."""

    attempts: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    last_issued: Issued | None = None
    retry_delays: deque[float] = field(default_factory=lambda: deque(maxlen=32))


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        client: ZTSClient | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._client = client or ZTSClient(
            config.ca_url, ca_bundle=config.ca_bundle, timeout=config.timeout
        )
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.status = AgentStatus()

    # --- schedule ---------------------------------------------------------------------------

    def refresh_at(self, facts: CertFacts, received_at: float | None = None) -> float:
        """Unix time of the next refresh: the configured fraction of the lifetime, minus
        a random share of the jitter fraction.

        The lifetime counts from ``received_at`` when known: CAs backdate notBefore
        (ours by 5 minutes), which would make a short certificate look half used
        the moment it arrives."""
        cfg = self._config
        fraction = cfg.refresh_fraction - self._rng.uniform(0.0, cfg.jitter_fraction)
        start = facts.not_before.timestamp()
        if received_at is not None:
            start = max(start, received_at)
        return start + (facts.not_after.timestamp() - start) * fraction

    def retry_delay(self, failures: int) -> float:
        """Exponential backoff with jitter: the n-th failure waits up to initial·2ⁿ⁻¹
        (capped), at least half of that."""
        cfg = self._config
        step = min(cfg.retry_max, cfg.retry_initial * 2.0 ** max(0, failures - 1))
        return step * self._rng.uniform(0.5, 1.0)

    # --- one attempt ------------------------------------------------------------------------

    async def attempt(self) -> Issued:
        """Get one new certificate and publish it; raises IdentitydError."""
        cfg = self._config
        self.status.attempts += 1
        token = read_token(cfg.token_file)
        facts = pod_facts(token_claims(token), cfg.pod_env)
        for conflict in facts.conflicts:
            log.warning("environment and token disagree on the pod's %s", conflict)
        plan = plan_certificate(facts, cfg)
        current = self._refreshable(plan)
        key = generate_key(cfg.key_type, cfg.key_bits)
        try:
            csr = build_csr(key, cn=plan.common_name, dns=plan.dns, ips=plan.ips, uris=plan.uris)
        except ValueError as exc:
            # A name cryptography refuses (say a non-ASCII --dns-suffix): configuration.
            raise ConfigError("SIA_NAME_INVALID", f"the certificate's names: {exc}") from exc
        identity: InstanceIdentity | None = None
        kind = "instance"
        if current is not None:
            refresh: InstanceRefreshInformation = {"attestationData": token, "csr": csr}
            if cfg.expiry_minutes:
                refresh["expiryTime"] = cfg.expiry_minutes
            try:
                identity = await self._client.refresh(
                    refresh,
                    provider=plan.provider,
                    domain=plan.domain,
                    service=plan.service,
                    instance_id=plan.instance_id,
                    cert_dir=current[0],
                )
                kind = "refresh"
            except Denied as exc:
                log.warning("refresh refused (%s); registering again", exc.detail)
        if identity is None:
            register: InstanceRegisterInformation = {
                "provider": plan.provider,
                "domain": plan.domain,
                "service": plan.service,
                "attestationData": token,
                "csr": csr,
            }
            if cfg.expiry_minutes:
                register["expiryTime"] = cfg.expiry_minutes
            identity = await self._client.register(register)
        previous_ca = current[1].ca_pem if current is not None else None
        material, cert = self._accept(identity, key, plan, previous_ca)
        try:
            directory = write_material(cfg.out_dir, material)
        except OSError as exc:
            # Configuration (or a full disk): exit 2 with --once, retried with backoff in
            # the loop, never a traceback. Names the file, never its content.
            raise ConfigError(
                "SIA_OUTPUT_UNWRITABLE", f"{exc.filename or cfg.out_dir}: {exc.strerror}"
            ) from exc
        issued = Issued(kind=kind, directory=directory, plan=plan, facts=cert_facts(cert))
        log.info(
            "%s %s instance %s: certificate serial %x valid until %s, written to %s",
            "refreshed" if kind == "refresh" else "registered",
            plan.common_name,
            plan.instance_id,
            issued.facts.serial,
            issued.facts.not_after.isoformat(),
            cfg.out_dir,
        )
        return issued

    def _refreshable(self, plan: CertPlan) -> tuple[Path, Material] | None:
        """The current generation when its certificate can authenticate a refresh for
        ``plan``: same CN and instance, key matches, not about to expire."""
        found = read_current(self._config.out_dir)
        if found is None:
            return None
        try:
            cert = x509.load_pem_x509_certificate(found[1].cert_pem)
            key = serialization.load_pem_private_key(found[1].key_pem, password=None)
            facts = cert_facts(cert)
        # Files someone else may have changed: an encrypted key is a TypeError, a
        # garbled extension one of several types (no common base). Unusable: register.
        except Exception:  # noqa: BLE001
            return None
        remaining = facts.not_after.timestamp() - self._clock()
        if (
            facts.common_name != plan.common_name
            or plan.uris[-1] not in facts.uris
            or facts.public_key_sha256 != public_key_sha256(key.public_key())
            or remaining < MIN_REMAINING_SECONDS
        ):
            return None
        return found

    def _startup_facts(self) -> CertFacts | None:
        """The certificate found at start when it is this pod's and can be refreshed;
        else None (ask at once). A volume that outlives its pod, or one shared by
        mistake, holds another identity's certificate, valid for hours: scheduling
        from its dates left this pod without its own until then."""
        cfg = self._config
        try:
            plan = plan_certificate(
                pod_facts(token_claims(read_token(cfg.token_file)), cfg.pod_env), cfg
            )
        except IdentitydError:
            return None  # the first attempt reports it, and backs off
        found = self._refreshable(plan)
        if found is None:
            return None
        try:
            return cert_facts(x509.load_pem_x509_certificate(found[1].cert_pem))
        except Exception:  # noqa: BLE001 - as in _refreshable: unusable, not fatal
            return None

    def current_facts(self) -> CertFacts | None:
        """The certificate in the output directory, if any and still valid."""
        found = read_current(self._config.out_dir)
        if found is None:
            return None
        try:
            facts = cert_facts(x509.load_pem_x509_certificate(found[1].cert_pem))
        except Exception:  # noqa: BLE001 - as in _refreshable: unusable, not fatal
            return None
        return facts if facts.not_after.timestamp() > self._clock() else None

    def _accept(
        self,
        identity: InstanceIdentity,
        key: PrivateKey,
        plan: CertPlan,
        previous_ca: bytes | None,
    ) -> tuple[Material, x509.Certificate]:
        """Check the CA's answer before anything is written."""
        try:
            cert = x509.load_pem_x509_certificate(identity["x509Certificate"].encode("ascii"))
            signer_pem = identity.get("x509CertificateSigner", "").encode("ascii") or previous_ca
            signers = x509.load_pem_x509_certificates(signer_pem) if signer_pem else []
            # Extensions and the key are parsed lazily, here: a garbled SAN raises
            # ValueError, DuplicateExtension, UnsupportedAlgorithm, ... (no common base).
            facts = cert_facts(cert)
        except Exception as exc:  # the boundary with the CA's answer
            raise Unavailable(
                "CA_BAD_RESPONSE",
                f"the certificate or signer does not parse ({type(exc).__name__})",
            ) from exc
        if facts.public_key_sha256 != public_key_sha256(key.public_key()):
            raise Unavailable("CA_BAD_RESPONSE", "the certificate is not for the agent's key")
        if facts.common_name != plan.common_name:
            raise Unavailable(
                "CA_BAD_RESPONSE",
                f"certificate CN {facts.common_name!r}, expected {plan.common_name!r}",
            )
        uris = set(facts.uris)
        missing = [uri for uri in plan.uris if uri not in uris]
        if missing:
            raise Unavailable("CA_BAD_RESPONSE", f"the certificate lacks SAN URI {missing[0]}")
        # Another SPIFFE ID or instance beside ours would be another identity.
        foreign = sorted(
            uri
            for uri in uris - set(plan.uris)
            if uri.startswith(("spiffe://", INSTANCE_ID_URI_PREFIX))
        )
        if foreign:
            raise Unavailable("CA_BAD_RESPONSE", f"the certificate also names {foreign[0]}")
        now = self._clock()
        if facts.not_after.timestamp() <= now:
            raise Unavailable("CA_BAD_RESPONSE", "the certificate has already expired")
        # Nearly spent on arrival (a CA whose clock runs behind): it would be due for
        # refresh at once, and the loop would ask every MIN_REFRESH_DELAY_SECONDS; as
        # a failure it is retried with backoff instead.
        if facts.not_after.timestamp() - now < MIN_REMAINING_SECONDS:
            raise Unavailable(
                "CA_BAD_RESPONSE",
                f"the certificate ends within {MIN_REMAINING_SECONDS:g} s of its arrival "
                f"(notAfter {facts.not_after.isoformat()})",
            )
        # A certificate from a CA whose clock runs ahead would replace a working one
        # with one that peers refuse until its notBefore.
        if facts.not_before.timestamp() > now + CLOCK_SKEW_SECONDS:
            raise Unavailable(
                "CA_BAD_RESPONSE",
                f"the certificate is not valid yet (notBefore {facts.not_before.isoformat()})",
            )
        if not any(_issued_by(cert, signer) for signer in signers):
            raise Unavailable("CA_BAD_RESPONSE", "the certificate does not chain to the signer")
        material = Material(
            key_pem=key_to_pem(key),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            ca_pem=b"".join(s.public_bytes(serialization.Encoding.PEM) for s in signers),
        )
        return material, cert

    # --- loops ------------------------------------------------------------------------------

    async def run_once(self) -> Issued:
        """One certificate (init container): retry an unreachable CA with backoff up to
        ``once_attempts`` times; a refusal raises at once."""
        attempts = self._config.once_attempts
        number = 1
        while True:
            try:
                return await self.attempt()
            except Unavailable as exc:
                self._failed(exc)
                if number >= attempts:
                    raise
                delay = self.retry_delay(number)
                self.status.retry_delays.append(delay)
                log.warning("%s; attempt %d of %d in %.1fs", exc, number + 1, attempts, delay)
                await asyncio.sleep(delay)
                number += 1

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a certificate fresh until ``stop`` is set (sidecar)."""
        current = self._startup_facts()
        next_at = self.refresh_at(current) if current is not None else self._clock()
        while not await self._sleep_until(stop, next_at):
            try:
                issued = await self.attempt()
            except IdentitydError as exc:
                # Any failure (CA down, refused, token not there yet): keep the files,
                # try again later. They stay valid until their notAfter.
                self._failed(exc)
                delay = self.retry_delay(self.status.consecutive_failures)
                self.status.retry_delays.append(delay)
                kept = self.current_facts()
                log.warning(
                    "%s; retrying in %.1fs; %s",
                    exc,
                    delay,
                    f"keeping the current certificate (valid until {kept.not_after.isoformat()})"
                    if kept
                    else "no valid certificate",
                )
                next_at = self._clock() + delay
                continue
            self.status.consecutive_failures = 0
            self.status.last_error = None
            self.status.last_issued = issued
            now = self._clock()
            next_at = max(self.refresh_at(issued.facts, now), now + MIN_REFRESH_DELAY_SECONDS)
            log.info(
                "next refresh at %s",
                datetime.datetime.fromtimestamp(next_at, datetime.UTC).isoformat(),
            )

    def _failed(self, exc: IdentitydError) -> None:
        self.status.consecutive_failures += 1
        self.status.last_error = str(exc)

    async def _sleep_until(self, stop: asyncio.Event, when: float) -> bool:
        """Wait until ``when`` (Unix time) or ``stop``; True if stopped."""
        while not stop.is_set():
            remaining = when - self._clock()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(stop.wait(), min(remaining, MAX_WAIT_STEP_SECONDS))
            except TimeoutError:
                continue
        return True


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
