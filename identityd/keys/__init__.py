"""CSR parsing and the key/CSR recipes the agent and the dev CA use."""

from identityd.keys.csr import (
    PrivateKey,
    build_csr,
    generate_key,
    key_to_pem,
    parse_csr,
    public_key_sha256,
)
from identityd.keys.csr_info import CSRInfo

__all__ = [
    "CSRInfo",
    "PrivateKey",
    "build_csr",
    "generate_key",
    "key_to_pem",
    "parse_csr",
    "public_key_sha256",
]
