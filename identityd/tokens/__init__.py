"""Attestation token verification: JWKS (file, URL, discovery) and TokenReview."""

from identityd.tokens.base import TokenClaims, TokenVerifier
from identityd.tokens.claims import validate_claims
from identityd.tokens.jwks import JWKSVerifier
from identityd.tokens.key_sources import (
    DiscoveryKeySource,
    FileKeySource,
    KeySource,
    URLKeySource,
    key_source_from_settings,
)

__all__ = [
    "DiscoveryKeySource",
    "FileKeySource",
    "JWKSVerifier",
    "KeySource",
    "TokenClaims",
    "TokenVerifier",
    "URLKeySource",
    "key_source_from_settings",
    "validate_claims",
]
