"""One error hierarchy; `api/app.py` maps it to the OpenAI error body in exactly one place."""

from __future__ import annotations


class FluxportError(Exception):
    """Base error: carries the HTTP status and the OpenAI error fields."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    # Set by a provider when the work it was paid for completed before the failure (e.g. the
    # result download failed): the attempt is still billed.
    provider_billed: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def record(self) -> dict[str, str | int | None]:
        """The error as stored with a request or attempt."""
        return {
            "status": self.status,
            "type": self.type,
            "code": self.code,
            "param": self.param,
            "message": self.message,
        }

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(FluxportError):
    """The client's fault (400); never retried elsewhere."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class ContentPolicyViolation(InvalidRequest):
    """A provider's safety checker refused the prompt or the result."""

    code = "content_policy_violation"


class NotFound(FluxportError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(FluxportError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(FluxportError):
    """Too many requests (ours or a provider's); carries Retry-After in seconds."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, param: str | None = None) -> None:
        # The SDK stops retrying above 120 s, so never ask for more.
        self.retry_after = max(0.0, min(retry_after, 120.0))
        super().__init__(
            message,
            param=param,
            headers={
                "retry-after": str(max(1, round(self.retry_after))),
                "retry-after-ms": str(int(self.retry_after * 1000)),
            },
        )


class ServiceUnavailable(FluxportError):
    """A known model with no configured provider: retrying cannot help (x-should-retry: false)."""

    status = 503
    type = "server_error"
    code = "no_provider_configured"

    def __init__(self, message: str, *, param: str | None = "model") -> None:
        super().__init__(message, param=param, headers={"x-should-retry": "false"})


class StorageUnavailable(FluxportError):
    """The database refused the request's record: it is not run (nothing unrecorded is generated)."""

    status = 503
    type = "server_error"
    code = "storage_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"retry-after": "1"})


class ProviderFailure(FluxportError):
    """The provider's fault (5xx, timeout, connection fault, malformed answer): retriable elsewhere."""

    status = 502
    type = "server_error"
    code = "provider_error"


class Interrupted(FluxportError):
    status = 500
    type = "server_error"
    code = "interrupted"


class ClientDisconnected(FluxportError):
    """The client hung up before the answer (and sent no Idempotency-Key to collect it later)."""

    status = 499  # nginx's "client closed request": nobody receives it, the record keeps it
    type = "invalid_request_error"
    code = "client_disconnected"


class CoolingDown(FluxportError):
    """Every able provider's circuit breaker is open; come back when the first one reopens."""

    status = 503
    type = "server_error"
    code = "providers_cooling_down"

    def __init__(self, message: str, *, retry_after: float) -> None:
        seconds = max(1, min(round(retry_after), 120))
        super().__init__(message, headers={"retry-after": str(seconds)})


class DeadlineExceeded(FluxportError):
    """The request's overall deadline passed; every attempt in flight was cancelled."""

    status = 504
    type = "server_error"
    code = "deadline_exceeded"

    def __init__(self, message: str) -> None:
        # A retry would start (and maybe bill) the whole generation again: let the client decide.
        super().__init__(message, headers={"x-should-retry": "false"})


# -- keys, limits and idempotency (issue #6) --------------------------------------------------------


class InvalidApiKey(FluxportError):
    """No key, an unknown key or a revoked key on a /v1 route."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"www-authenticate": 'Bearer realm="fluxport"'})


class BudgetExceeded(FluxportError):
    """The key's monthly spend budget is used up; retrying cannot help before the month turns."""

    status = 403
    type = "invalid_request_error"
    code = "budget_exceeded"


class IdempotencyInProgress(FluxportError):
    """A request with this Idempotency-Key is still running: retry later for its answer (the
    SDK retries 409 by itself, after Retry-After)."""

    status = 409
    type = "invalid_request_error"
    code = "idempotency_key_in_progress"

    def __init__(self, message: str, retry_after: float = 2.0) -> None:
        super().__init__(
            message,
            param="Idempotency-Key",
            headers={"retry-after": f"{max(1, round(retry_after))}", "x-should-retry": "true"},
        )


class IdempotencyConflict(FluxportError):
    """The Idempotency-Key was already used with a different body. The SDK retries 409: forbid it."""

    status = 409
    type = "invalid_request_error"
    code = "idempotency_key_reused"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="Idempotency-Key", headers={"x-should-retry": "false"})
