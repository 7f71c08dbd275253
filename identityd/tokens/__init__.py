"""Attestation token verification: JWKS (file, URL, discovery) and TokenReview."""

from identityd.tokens.base import TokenClaims, TokenVerifier

__all__ = ["TokenClaims", "TokenVerifier"]
