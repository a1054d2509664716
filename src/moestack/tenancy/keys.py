"""API keys: ``msk-<key_id>-<secret>``; only SHA-256 of the secret is stored.

The secret has 256 bits of entropy, so a fast hash is enough (as for GitHub or Stripe tokens; a
slow password hash buys nothing against brute force of a random 32-byte value). The key id is
public (it names the key in the ledger and in ``revoke-key``); the lookup is by key id and the
secret is compared with :func:`hmac.compare_digest`, also when the key id is unknown, so the time
taken does not tell which part was wrong.

Tenants' prefix-cache salts (:func:`cache_salt`) are derived here too: key material kept apart
per tenant, computed from a server secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass

PREFIX = "msk"
_KEY_RE = re.compile(r"^msk-([0-9a-f]{16})-([A-Za-z0-9_\-]{43})$")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True)
class NewKey:
    """A freshly made key: ``plaintext`` is shown once and never stored."""

    key_id: str
    plaintext: str
    secret_sha256: str


def generate_key() -> NewKey:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return NewKey(key_id, f"{PREFIX}-{key_id}-{secret}", hash_secret(secret))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(plaintext: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else None."""
    m = _KEY_RE.match(plaintext.strip())
    return (m.group(1), m.group(2)) if m else None


def secret_matches(secret: str, stored_sha256: str | None) -> bool:
    """Constant-time check; ``stored_sha256=None`` (unknown key) still costs one comparison."""
    expected = stored_sha256 if stored_sha256 is not None else _DUMMY_HASH
    ok = hmac.compare_digest(hash_secret(secret), expected)
    return ok and stored_sha256 is not None


CACHE_SALT_CHARS = 32


def cache_salt_secret(admin_key_env: str) -> bytes:
    """The server secret that per-tenant cache salts derive from: the admin key (in the
    gateway's environment, never in its arguments), else a random one for this process (the
    admin API is off; gateway replicas then salt apart and share no prefix cache)."""
    key = os.environ.get(admin_key_env)
    return key.encode() if key else secrets.token_bytes(32)


def cache_salt(secret: bytes, tenant_id: int) -> str:
    """A tenant's prefix-cache salt: HMAC-SHA256 of its id under ``secret``, as 32 hex digits.

    vLLM's prefix cache shares blocks only between requests with the same ``cache_salt``, so a
    tenant cannot tell from ``cached_tokens`` (or from time to first token) whether another
    tenant sent a prompt; without the secret nobody can compute another tenant's salt, and the
    gateway overrides whatever salt a client sends."""
    digest = hmac.new(secret, b"moestack-cache-salt:%d" % tenant_id, hashlib.sha256)
    return digest.hexdigest()[:CACHE_SALT_CHARS]
