"""OpenAI-style error bodies (`{"error": {message, type, param, code}}`) and their handlers.

Every failure path of the app ends here, so a client never sees a bare 500 or HTML page.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from jaxserve.errors import (
    ContextLengthError,
    InvalidRequestError,
    JaxserveError,
    LoraAdapterError,
    LoraNotFoundError,
    QueueFullError,
)
from jaxserve.server.bridge import EngineUnavailableError
from jaxserve.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("jaxserve.server")

RETRY_AFTER_S = 1
CLIENT_GONE = 499  # nginx's "client closed request"; nobody reads it


class APIError(Exception):
    """An error the route wants to return as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=self.info).model_dump()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def from_engine_error(exc: Exception) -> APIError:
    """Map the engine's input errors (raised before any device work) to HTTP errors."""
    if isinstance(exc, QueueFullError):
        return APIError(
            429,
            f"server overloaded: {exc}; retry later",
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, LoraNotFoundError):  # as an unknown model
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, LoraAdapterError):
        return APIError(400, str(exc), param="lora_path", code="invalid_lora_adapter")
    if isinstance(exc, EngineUnavailableError):
        return APIError(
            503,
            str(exc),
            "server_error",
            code="not_ready",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(exc, APIError):
        return exc
    return APIError(500, f"{type(exc).__name__}: {exc}", "server_error", code="internal_error")


def from_validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """A pydantic error list -> one message naming the first bad field (400, as OpenAI)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # The top-level field is the param (deeper parts name union members such as "list[int]").
    param = loc[0] if loc else None
    given = repr(first.get("input"))
    given = given if len(given) <= 60 else given[:57] + "..."
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}, got {given}{more}"
    return APIError(400, message, param=param, code="invalid_type")


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    return from_validation_error(exc).response()


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    err = APIError(exc.status_code, str(exc.detail), kind, headers=exc.headers)
    return err.response()


async def _engine_error(_: Request, exc: Exception) -> JSONResponse:
    return from_engine_error(exc).response()


async def _client_gone(_: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_GONE)  # left mid-body: nothing to log, nobody to tell


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in a route", exc_info=exc)
    return from_engine_error(exc).response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(JaxserveError, _engine_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
