"""The one exception hierarchy of moestack.

Every error a client can see is a :class:`MoestackError` subclass carrying the HTTP status and the
OpenAI error ``type``/``code`` it maps to; the API layer renders it as
``{"error": {"message", "type", "param", "code"}}``. Errors that only operators see (bad config)
derive from :class:`MoestackError` too, so one ``except MoestackError`` covers the package.
"""

from __future__ import annotations


class MoestackError(Exception):
    """Base of every moestack error."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}

    def __reduce__(self):  # keep param/code when the error crosses a Ray process boundary
        return (_rebuild, (type(self), self.message, self.param, self.code, dict(self.__dict__)))


def _rebuild(cls, message, param, code, state):
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class ConfigError(MoestackError):
    """The configuration is invalid; the message names the field and the reason."""

    error_type = "configuration_error"


class InvalidRequestError(MoestackError):
    status_code = 400
    error_type = "invalid_request_error"


class PromptTooLongError(InvalidRequestError):
    code = "context_length_exceeded"


class InvalidAdapterError(InvalidRequestError):
    """A LoRA adapter that cannot be served on its base model (missing or malformed files, a
    rank over the model's ``max_lora_rank``, shapes or modules the base has not); the message
    names what is wrong."""

    code = "invalid_adapter"


class AuthenticationError(MoestackError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"

    @classmethod
    def missing_key(cls) -> AuthenticationError:
        """The one 401 for a request that carries no API key."""
        return cls("Missing API key: send `Authorization: Bearer <key>`.")


class PermissionDeniedError(MoestackError):
    status_code = 403
    error_type = "permission_error"
    code = "model_not_allowed"


class NotFoundError(MoestackError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    @classmethod
    def of(cls, model: str) -> ModelNotFoundError:
        """The one 404 for a model that does not exist *or* is outside the tenant's list (as
        OpenAI words it): the same either way, so a tenant cannot learn other tenants' models."""
        return cls(f"The model `{model}` does not exist or you do not have access to it.",
                   param="model")


class ConflictError(MoestackError):
    """The name is taken (a registered adapter, or a configured model)."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class RequestTooLargeError(MoestackError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RetryLaterError(MoestackError):
    """An error the client should retry; ``retry_after_s`` becomes the ``Retry-After`` header
    (whole seconds, rounded up, at least 1)."""

    default_retry_after_s = 1.0

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after_s = (self.default_retry_after_s if retry_after_s is None
                              else retry_after_s)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, int(-(-self.retry_after_s // 1))))}


class RateLimitError(RetryLaterError):
    """A rate limit was hit."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class InsufficientQuotaError(RateLimitError):
    error_type = "insufficient_quota"
    code = "insufficient_quota"


class EngineUnavailableError(MoestackError):
    """The engine is down, overloaded or failed mid-request."""

    status_code = 503
    error_type = "service_unavailable_error"
    code = "engine_unavailable"


class ReplicaDrainingError(EngineUnavailableError):
    """A stream's replica is draining (scale-down, rolling update): the gateway ended the
    stream there to resume it on a live replica (:mod:`moestack.api.migration`)."""


class StoreWriteError(MoestackError):
    """One write to the tenancy store failed on its own (a value the database refused, a bug),
    not for an outage: that request is not served (500) while the writes batched with it
    commit. The cause goes to the operator's log, never to the client."""

    error_type = "server_error"
    code = "store_write_failed"


class StoreUnavailableError(RetryLaterError):
    """The tenancy store (database) is down, locked past the bounded wait, or read-only.

    Fail-closed: no request is served unmetered while the store cannot record it."""

    status_code = 503
    error_type = "service_unavailable_error"
    code = "service_unavailable"
    default_retry_after_s = 2.0
