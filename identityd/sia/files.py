"""Key, certificate and CA bundle in the output directory, swapped atomically as one set.

The layout is the one the kubelet uses for projected volumes (AtomicWriter)::

    out/..data        -> ..gen-<ns>-<rand>      (a symlink, swapped with one rename)
    out/..gen-.../key.pem  cert.pem  ca.pem  bundle.pem
    out/key.pem       -> ..data/key.pem         (stable symlinks, created once)
    out/cert.pem      -> ..data/cert.pem
    out/ca.pem        -> ..data/ca.pem
    out/bundle.pem    -> ..data/bundle.pem      (key + certificate + CA, one file)

A new generation is written in full (each file fsynced, then the directory)
before ``..data`` is repointed by ``rename(2)``, which is atomic. So:

- every file a reader opens is complete;
- one file (``bundle.pem``) always holds a matching key and certificate;
- a reader that resolves ``..data`` once and reads ``key.pem`` and ``cert.pem``
  from that directory gets a matching pair (a generation never changes after
  the swap and is deleted only two swaps later — it may then see
  FileNotFoundError and retry, never a mismatch);
- a reader that opens ``out/key.pem`` and then ``out/cert.pem`` separately can
  straddle a swap: TLS libraries detect that (Python's ``load_cert_chain``
  raises) and a reload should retry — or use one of the two ways above.

The key files are mode 0600.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

DATA_LINK = "..data"
GENERATION_PREFIX = "..gen-"
KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
CA_FILE = "ca.pem"
BUNDLE_FILE = "bundle.pem"
_MODES = {KEY_FILE: 0o600, CERT_FILE: 0o644, CA_FILE: 0o644, BUNDLE_FILE: 0o600}
# Generations kept: the current one and the one before (a reader may still be in it).
KEEP_GENERATIONS = 2


@dataclass(frozen=True)
class Material:
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes

    def files(self) -> dict[str, bytes]:
        return {
            KEY_FILE: self.key_pem,
            CERT_FILE: self.cert_pem,
            CA_FILE: self.ca_pem,
            BUNDLE_FILE: self.key_pem + self.cert_pem + self.ca_pem,
        }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask says
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _symlink_replace(target: str, link: Path) -> None:
    """Point ``link`` at ``target`` with one rename (atomic for readers)."""
    tmp = link.with_name(f"{link.name}.tmp-{secrets.token_hex(4)}")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generations(out_dir: Path) -> list[Path]:
    """Generation directories, oldest first."""
    found = [p for p in out_dir.glob(f"{GENERATION_PREFIX}*") if p.is_dir()]
    return sorted(found, key=lambda p: p.name)


def write_material(out_dir: Path, material: Material) -> Path:
    """Publish ``material`` as the new current generation; return its directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{GENERATION_PREFIX}{time.time_ns():020d}-{secrets.token_hex(4)}"
    generation = out_dir / name
    generation.mkdir(mode=0o755)
    try:
        for filename, data in material.files().items():
            _write(generation / filename, data, _MODES[filename])
        _fsync_dir(generation)
        _symlink_replace(name, out_dir / DATA_LINK)
    except BaseException:
        shutil.rmtree(generation, ignore_errors=True)
        raise
    for filename in _MODES:
        link = out_dir / filename
        wanted = f"{DATA_LINK}/{filename}"
        if not (link.is_symlink() and os.readlink(link) == wanted):
            _symlink_replace(wanted, link)
    _fsync_dir(out_dir)
    for old in generations(out_dir)[:-KEEP_GENERATIONS]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return generation


def current_generation(out_dir: Path) -> Path | None:
    """The directory ``..data`` points at now, resolved once."""
    link = out_dir / DATA_LINK
    try:
        target = os.readlink(link)
    except OSError:
        return None
    return out_dir / target


def read_current(out_dir: Path) -> tuple[Path, Material] | None:
    """The current generation's directory and its key, certificate and CA, or None."""
    generation = current_generation(out_dir)
    if generation is None:
        return None
    try:
        material = Material(
            key_pem=(generation / KEY_FILE).read_bytes(),
            cert_pem=(generation / CERT_FILE).read_bytes(),
            ca_pem=(generation / CA_FILE).read_bytes(),
        )
    except OSError:
        return None
    return generation, material
