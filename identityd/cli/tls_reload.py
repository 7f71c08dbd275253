"""The server's TLS files, read again when they change.

A certificate is rotated by rewriting its files: cert-manager renews the Secret,
the kubelet swaps the mounted volume's contents. Without a reload every worker
served the certificate it started with until a rollout, past its expiry if no
one rolled out. :class:`TLSFiles` checks the certificate, key and client-CA files
at most once per ``--tls-reload-interval`` when a connection arrives, and serves
new connections with the new files once they load together. Files that do not
load (a key written before its certificate, a truncated file, a certificate that
has expired) leave the ones in force in place, with a warning, and are tried
again at the next check. Connections already open keep the certificate they were made with.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable

from cryptography import x509

from identityd.app import tls_context
from identityd.errors import ConfigError
from identityd.settings import TLSSettings

log = logging.getLogger("identityd.serve")

# (device, inode, mtime, size) of each file, None for one that cannot be read: a
# kubelet volume update swaps a symlink, so the inode changes even when the
# timestamps do not.
_Stamp = tuple[tuple[int, int, int, int] | None, ...]


def _stamp(paths: tuple[str, ...]) -> _Stamp:
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


def _check_not_expired(path: str, now: float) -> None:
    """ConfigError when the first certificate in ``path`` (the server's, as OpenSSL
    loads it) expired before ``now``."""
    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as exc:
        raise ConfigError("CONFIG_ERROR", f"TLS files: {path}: {exc}") from exc
    if cert.not_valid_after_utc.timestamp() < now:
        expiry = f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        raise ConfigError("CONFIG_ERROR", f"TLS files: {path}: the certificate expired at {expiry}")


class TLSFiles:
    """The TLS context for the next connection: ``context``, given at start-up,
    until the files of ``tls`` change and load."""

    def __init__(
        self,
        tls: TLSSettings,
        context: ssl.SSLContext,
        *,
        clock: Callable[[], float] = time.monotonic,
        build: Callable[[TLSSettings], ssl.SSLContext] = tls_context,
    ) -> None:
        self._tls = tls
        self._context = context
        self._clock = clock
        self._build = build
        self._paths = tuple(p for p in (tls.cert, tls.key, tls.client_ca) if p)
        self._stamp = _stamp(self._paths)
        self._checked = clock()
        self.reloads = 0

    def context(self) -> ssl.SSLContext:
        interval = self._tls.reload_seconds
        if interval > 0 and self._clock() - self._checked >= interval:
            self._checked = self._clock()
            self._reload_if_changed()
        return self._context

    def _reload_if_changed(self) -> None:
        stamp = _stamp(self._paths)
        if stamp == self._stamp:
            return
        try:
            context = self._build(self._tls)
            # It loads, and every CA would refuse it (a restored backup, a stale
            # Secret): the certificate in force may still be valid.
            _check_not_expired(self._tls.cert or "", time.time())
        except ConfigError as exc:
            # Not recorded as seen: the next check tries again (the rest of an
            # update may still be on its way).
            log.warning("TLS files changed but do not load; the previous ones stay: %s", exc)
            return
        self._context, self._stamp = context, stamp
        self.reloads += 1
        log.info("TLS files reloaded: new connections get the new certificate")
