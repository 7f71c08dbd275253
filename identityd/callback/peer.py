"""The client certificate as the TLS layer hands it over (``ssl.getpeercert()``'s dict).

One reading of it for every use (the allowed-client check, the rate-limit key), so
that a subject two readers would take differently cannot be allowed by one and
charged to another client by the other.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["certificate_cns", "certificate_names", "certificate_valid_now", "single_cn"]


def certificate_cns(cert: Mapping[str, Any]) -> list[str]:
    """Every commonName in the subject, in order."""
    return [
        value
        for rdn in cert.get("subject", ())
        for key, value in rdn
        if key == "commonName" and isinstance(value, str)
    ]


def single_cn(cert: Mapping[str, Any]) -> str | None:
    """The subject's CN when there is exactly one; None for none or several (a subject
    with two CNs names nobody: readers disagree on which one counts)."""
    cns = certificate_cns(cert)
    return cns[0] if len(cns) == 1 else None


def certificate_names(cert: Mapping[str, Any]) -> set[str]:
    """The single CN and the DNS and URI SANs: what --allowed-client matches."""
    names = {value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "URI")}
    cn = single_cn(cert)
    if cn is not None:
        names.add(cn)
    names.discard("")
    return names


def certificate_valid_now(cert: Mapping[str, Any], now: float | None = None) -> bool:
    """notBefore <= now < notAfter. The handshake checked it, but a resumed TLS
    session is not verified again, and a keep-alive connection outlives its check."""
    now = time.time() if now is None else now
    try:
        not_before = ssl.cert_time_to_seconds(str(cert["notBefore"]))
        not_after = ssl.cert_time_to_seconds(str(cert["notAfter"]))
    except (KeyError, ValueError):
        return False
    return not_before <= now < not_after
