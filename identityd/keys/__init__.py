"""CSR and public-key parsing, and the key/CSR recipes the agent and the dev CA use."""

from identityd.keys.csr import (
    PrivateKey,
    build_csr,
    generate_key,
    key_to_pem,
    parse_csr,
    parse_public_key,
    public_key_sha256,
)
from identityd.keys.csr_info import CSRInfo
from identityd.keys.key_info import KeyInfo

__all__ = [
    "CSRInfo",
    "KeyInfo",
    "PrivateKey",
    "build_csr",
    "generate_key",
    "key_to_pem",
    "parse_csr",
    "parse_public_key",
    "public_key_sha256",
]
