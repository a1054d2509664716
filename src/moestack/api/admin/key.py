"""The admin key: long enough to start with, and checked on every admin request.

It is read from the environment variable named by ``tenancy.admin_key_env`` (never from the
config) and compared in constant time; while it is unset the admin API answers 403. Failed
attempts are throttled per client address (:class:`~moestack.tenancy.throttle.FailedAuthThrottle`,
on the operator app as ``state.admin_throttle``).
"""

from __future__ import annotations

import hmac
import os

from fastapi import Request

from moestack.api.context import bearer_token
from moestack.errors import (
    AuthenticationError,
    ConfigError,
    PermissionDeniedError,
    RateLimitError,
)

MIN_ADMIN_KEY_CHARS = 32


def check_admin_key(env: str) -> None:
    """Refuse to start with an admin key shorter than :data:`MIN_ADMIN_KEY_CHARS` (an unset
    key is allowed: the admin API then stays off). The message never contains the key."""
    key = os.environ.get(env, "")
    if key and len(key) < MIN_ADMIN_KEY_CHARS:
        raise ConfigError(f"the admin key in ${env} has {len(key)} characters; it needs at least "
                          f"{MIN_ADMIN_KEY_CHARS} (e.g. `openssl rand -hex 32`)")


def require_admin(request: Request) -> None:
    """The admin key, compared in constant time; failures are throttled per client address
    when the app has an ``admin_throttle`` (the operator app does)."""
    env = request.app.state.config.tenancy.admin_key_env
    expected = os.environ.get(env, "")
    if not expected:
        raise PermissionDeniedError(f"The admin API is disabled: set {env}.",
                                    code="admin_disabled")
    throttle = getattr(request.app.state, "admin_throttle", None)
    client = request.client.host if request.client else ""
    if throttle is not None and (wait := throttle.retry_after_s(client)) is not None:
        raise RateLimitError("Too many failed admin authentications; retry later.",
                             retry_after_s=wait, code="admin_auth_throttled")
    given = bearer_token(request) or ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        if throttle is not None:
            throttle.failed(client)
        raise AuthenticationError("Incorrect admin key provided.")
    if throttle is not None:
        throttle.succeeded(client)
