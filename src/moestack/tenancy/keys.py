"""API keys: ``msk-<key_id>-<secret>``; only SHA-256 of the secret is stored.

The secret has 256 bits of entropy, so a fast hash is enough (as for GitHub or Stripe tokens; a
slow password hash buys nothing against brute force of a random 32-byte value). The key id is
public (it names the key in the ledger and in ``revoke-key``); the lookup is by key id and the
secret is compared with :func:`hmac.compare_digest`, also when the key id is unknown, so the time
taken does not tell which part was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
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
