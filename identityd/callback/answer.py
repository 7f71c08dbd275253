"""What an allow hands back to the CA: the InstanceConfirmation, with attributes rebuilt.

ZTS reads the provider's answer as the provider's grant: ``certExpiryTime``,
``certRefresh``, ``certUsage``, ``certSubjectOU``, ``certSSH``, ... (the
attribute names of Athenz's ``InstanceProvider``). Echoing the request's
attributes would hand back whatever the requester asked for (``certSSH=true``,
``certSubjectOU=admin``) as if identityd had approved it. So, failing closed,
the answer carries only

- the request attributes in :data:`ECHOED_ATTRIBUTES`, which describe the
  instance (what ZTS sent; the policy has checked them), and
- the attributes of the policy's decision, which win over an echoed one.

Everything else the request carried is dropped, whatever its name, so an
attribute ZTS learns to read in a later version is never granted by accident.
Athenz's own providers do the same: they answer with a fresh attribute map.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from identityd.callback.request import CallbackRequest
from identityd.policy.base import Decision

# InstanceProvider's ZTS_INSTANCE_ID, ZTS_INSTANCE_SAN_DNS / _SAN_IP / _SAN_URI,
# ZTS_INSTANCE_CLIENT_IP and ZTS_INSTANCE_HOSTNAME. Not csrPublicKey, csr,
# principal or the cert* / attested* names: they are the CA's business or a grant.
ECHOED_ATTRIBUTES = frozenset({"instanceId", "sanDNS", "sanIP", "sanURI", "clientIP", "hostname"})


def answer_attributes(requested: Mapping[str, str], granted: Mapping[str, str]) -> dict[str, str]:
    """The allowlisted request attributes, overlaid with the decision's."""
    attributes = {name: value for name, value in requested.items() if name in ECHOED_ATTRIBUTES}
    attributes.update(granted)
    return attributes


def allow_document(request: CallbackRequest, decision: Decision) -> dict[str, Any]:
    """The InstanceConfirmation an allow answers with (DESIGN §2)."""
    return {
        "provider": request.provider,
        "domain": request.domain,
        "service": request.service,
        "attestationData": request.attestation_data,
        "attributes": answer_attributes(request.attributes, decision.attributes),
    }
