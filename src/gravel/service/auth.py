"""Bearer tokens: the admin token for model management, one token per session.

Tokens are random (secrets.token_urlsafe, 256 bits); the store keeps only their SHA-256, and
every comparison is between digests with hmac.compare_digest, in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["bearer", "hash_token", "new_token", "token_matches"]


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str | None, stored_hash: str) -> bool:
    if not token:
        return False
    return hmac.compare_digest(hash_token(token), stored_hash)


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
