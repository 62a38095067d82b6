"""The serving engine's refusals, each carrying the HTTP answer it maps to.

The engine knows nothing of HTTP, but the app turns every `ServeError` into OpenAI's error object
with the `status`, `kind` (OpenAI's `type`), `code`, `param` and Retry-After set here, so a library
caller and an HTTP client are told the same thing.
"""

from __future__ import annotations

from ..errors import PortLLMError


class ServeError(PortLLMError):
    """A refused request; `status` and `code` are what an HTTP layer answers with."""

    status = 400
    code: str | None = None
    kind = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.retry_after = retry_after


class BadRequest(ServeError):
    pass


class UnknownModel(ServeError):
    status = 404
    code = "model_not_found"


class ContextTooLong(ServeError):
    code = "context_length_exceeded"


class PatchRefused(ServeError):
    """`check` found the patch incompatible with the served base (its reason is the message)."""

    code = "patch_incompatible"


class Overloaded(ServeError):
    """The queue is full: try again shortly (HTTP 429 with Retry-After)."""

    status = 429
    code = "queue_full"
    kind = "rate_limit_error"


class Unavailable(ServeError):
    """The engine is not running (starting, stopping, or its worker died): HTTP 503."""

    status = 503
    code = "unavailable"
    kind = "server_error"
