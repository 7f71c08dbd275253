"""The dev CA's files: its CA key and certificate (kept across restarts, so agents and
identityd keep trusting it), and the TLS certificates it issues itself at start-up.

``<state-dir>/ca.pem``, ``ca.key`` (0600) — the CA; created on first start.
``server.pem``/``server.key`` — its HTTPS certificate for agents.
``client.pem``/``client.key`` — the client certificate it presents to providers.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from identityd.errors import ConfigError
from identityd.keys.ca_pem import authority_from_pem
from identityd.keys.certs import CertificateAuthority
from identityd.keys.csr import key_to_pem

CA_COMMON_NAME = "identityd development CA"
SERVER_COMMON_NAME = "identityd-dev-ca"
# The certificates the dev CA issues itself; re-issued at every start.
SELF_CERT_LIFETIME = datetime.timedelta(days=30)


@dataclass(frozen=True)
class DevCAFiles:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"


def write_file(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write atomically (temporary file in the same directory, fsync, rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_create_authority(files: DevCAFiles) -> CertificateAuthority:
    if files.ca_cert.exists() or files.ca_key.exists():
        try:
            return authority_from_pem(files.ca_cert.read_bytes(), files.ca_key.read_bytes())
        except OSError as exc:
            raise ConfigError("CONFIG_ERROR", f"dev CA files: {exc}") from exc
    authority = CertificateAuthority(CA_COMMON_NAME, lifetime_days=3650)
    write_file(files.ca_key, key_to_pem(authority.key), mode=0o600)
    write_file(files.ca_cert, authority.cert_pem)
    return authority


def issue_to(
    authority: CertificateAuthority,
    cert_path: Path,
    key_path: Path,
    *,
    common_name: str,
    usage: str,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    lifetime: datetime.timedelta = SELF_CERT_LIFETIME,
) -> None:
    """Issue a fresh key and certificate and write both (the key 0600)."""
    issued = authority.issue(common_name, dns=dns, ips=ips, usage=usage, lifetime=lifetime)
    write_file(key_path, issued.key_pem, mode=0o600)
    write_file(cert_path, issued.cert_pem)


def prepare_state(
    directory: Path,
    *,
    client_cn: str,
    server_names: Sequence[str],
    server_ips: Sequence[str],
) -> tuple[CertificateAuthority, DevCAFiles]:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError("CONFIG_ERROR", f"--state-dir: {exc}") from exc
    files = DevCAFiles(directory)
    authority = load_or_create_authority(files)
    issue_to(
        authority,
        files.server_cert,
        files.server_key,
        common_name=SERVER_COMMON_NAME,
        usage="server",
        dns=server_names,
        ips=server_ips,
    )
    issue_to(authority, files.client_cert, files.client_key, common_name=client_cn, usage="client")
    return authority, files
