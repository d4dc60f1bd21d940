"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with real status codes.

Every failure a client can see goes through :func:`to_api_error`: typed engine and store errors map to their
status (table in ``docs/server.md``), request validation to 422, and anything unexpected to a 500 whose message
says nothing about the code (the exception is logged with its traceback instead). No response ever carries a
traceback or an internal path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.errors import (
    ContextLengthError,
    FingerprintMismatchError,
    HistoryConflictError,
    InvalidMessageError,
    InvalidOptionError,
    InvalidStateError,
    MessageTooLongError,
    PortableFormatError,
    TooManyMessagesError,
)
from ..errors import DeltaMemError
from ..store.base import (
    ConcurrentUpdateError,
    CorruptStateError,
    InvalidIdentifierError,
    SessionExistsError,
    SessionNotFoundError,
    StoreError,
)

__all__ = [
    "APIError",
    "engine_errors",
    "error_body",
    "install_error_handlers",
    "to_api_error",
]

logger = logging.getLogger("deltamem_agents.server")

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
SERVER_ERROR = "server_error"

_STATUS_TYPES = {401: AUTHENTICATION, 403: "permission_error", 404: INVALID_REQUEST, 405: INVALID_REQUEST,
                 409: INVALID_REQUEST, 413: INVALID_REQUEST, 422: INVALID_REQUEST, 429: "rate_limit_error"}


class APIError(DeltaMemError):
    """An error response: HTTP ``status`` and OpenAI's error object (plus optional response headers)."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _STATUS_TYPES.get(status, SERVER_ERROR if status >= 500 else INVALID_REQUEST)
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def internal_error() -> APIError:
    return APIError(500, "internal server error (logged on the server)", type=SERVER_ERROR, code="internal_error")


def to_api_error(exc: BaseException, *, engine_call: bool = False) -> APIError:
    """The response for ``exc``. ``engine_call``: it came out of an engine call, where a plain ``ValueError``
    is the engine refusing an option (a 422), not a bug. Unexpected errors are logged here."""
    if isinstance(exc, APIError):
        return exc
    message = str(exc)
    if isinstance(exc, SessionNotFoundError):
        return APIError(404, message, code="session_not_found", param="session_id")
    if isinstance(exc, SessionExistsError):
        return APIError(409, message, code="session_exists", param="session_id")
    if isinstance(exc, HistoryConflictError):  # before ConcurrentUpdateError, its base
        return APIError(409, message, code="history_conflict", param="messages",
                        headers={"X-Session-Version": str(exc.version)})
    if isinstance(exc, ConcurrentUpdateError):
        return APIError(409, message + " (the session was changed by another request; retry)",
                        code="session_conflict", param="session_id")
    if isinstance(exc, FingerprintMismatchError):
        return APIError(409, message, code="fingerprint_mismatch")
    if isinstance(exc, ContextLengthError):
        return APIError(413, message, code="context_length_exceeded", param="messages")
    if isinstance(exc, MessageTooLongError):
        return APIError(413, message, code="message_too_long", param="messages")
    if isinstance(exc, TooManyMessagesError):
        return APIError(413, message, code="too_many_messages", param="messages")
    if isinstance(exc, InvalidOptionError):
        return APIError(422, message, code="invalid_value", param=exc.option)
    if isinstance(exc, InvalidMessageError):
        return APIError(422, message, code="invalid_messages", param="messages")
    if isinstance(exc, InvalidIdentifierError):
        return APIError(422, message, code="invalid_identifier", param="session_id")
    if isinstance(exc, PortableFormatError | InvalidStateError):
        return APIError(422, message, code="invalid_session_file")
    if isinstance(exc, CorruptStateError | StoreError):
        logger.error("store error: %s", exc, exc_info=exc)
        return APIError(500, "the session store failed (logged on the server)", code="store_error")
    if engine_call and isinstance(exc, ValueError | TypeError):
        return APIError(422, message, code="invalid_value")
    logger.error("unexpected error: %r", exc, exc_info=exc)
    return internal_error()


@contextmanager
def engine_errors() -> Iterator[None]:
    """Turn what an engine call raises into :class:`APIError` (see :func:`to_api_error`)."""
    try:
        yield
    except APIError:
        raise
    except Exception as exc:
        raise to_api_error(exc, engine_call=True) from exc


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts)


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's validation errors as one 422 (the input values are not echoed: they may be large)."""
    errors = exc.errors()
    described = []
    for err in errors[:10]:
        where = _loc(tuple(err.get("loc", ())))
        msg = str(err.get("msg", "invalid value"))
        msg = msg.removeprefix("Value error, ")
        described.append(f"{where}: {msg}" if where else msg)
    param = _loc(tuple(errors[0].get("loc", ()))) if errors else None
    return APIError(422, "; ".join(described) or "invalid request", param=param or None, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped responses for our errors, validation errors, HTTP errors (unknown route, wrong method)
    and the engine's and store's typed errors. The catch-all for the rest is the server's middleware."""

    async def on_api_error(_request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    async def on_validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc).response()

    async def on_http(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = {404: "no such route", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        code = {404: "unknown_route", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {})).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for cls in (StoreError, FingerprintMismatchError, InvalidMessageError, InvalidOptionError, InvalidStateError,
                PortableFormatError):
        app.add_exception_handler(cls, on_api_error)
