"""The failures a client can meet, each mapped once to its HTTP status and body.

TGI routes answer {"error": message, "error_type": kind}; OpenAI routes answer
{"error": {"message", "type", "param", "code"}} with the same status.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


class RouterError(Exception):
    status = 500
    error_type = "internal"
    openai_type = "server_error"

    def __init__(self, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def tgi_body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.openai_type,
                          "param": self.param, "code": self.error_type}}

    def response(self, openai: bool) -> JSONResponse:
        return JSONResponse(self.openai_body() if openai else self.tgi_body(), self.status,
                            headers=self.headers)


class ValidationError(RouterError):
    status = 422
    error_type = "validation"
    openai_type = "invalid_request_error"


class MalformedRequest(ValidationError):
    """The body is not JSON at all."""

    status = 400


class Overloaded(RouterError):
    status = 429
    error_type = "overloaded"
    openai_type = "rate_limit_error"


class ShardUnavailable(RouterError):
    status = 503
    error_type = "unavailable"


class GenerationError(RouterError):
    """A shard group failed the request after accepting it."""

    status = 424
    error_type = "generation"


class Unauthorized(RouterError):
    """No API key, or one the keys file does not hold."""

    status = 401
    error_type = "authentication"
    openai_type = "invalid_request_error"


class RateLimited(RouterError):
    """The tenant's requests or tokens per minute are spent; headers say when to retry."""

    status = 429
    error_type = "rate_limited"
    openai_type = "rate_limit_error"


class ContentFiltered(RouterError):
    """The prompt matched a content filter rule."""

    status = 422
    error_type = "content_filter"
    openai_type = "invalid_request_error"


class Draining(RouterError):
    """The router got SIGTERM: it finishes what it has and takes nothing new."""

    status = 503
    error_type = "unavailable"


class RequestTimeout(RouterError):
    """The request ran past --request-timeout (queue wait included); the shard stops it."""

    status = 504
    error_type = "timeout"


class ClientDisconnected(Exception):
    """The client went away before its answer: nothing is sent; logged and counted as 499."""
