"""Every failure the HTTP side reports is JSON ``{"error": ..., "field": ...}`` with a 4xx (or
503 when the ledger is down): clients and the seed middleware parse one shape, never a 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobledger.errors import (
    ConfigError,
    IntegrationMissing,
    InvalidTransition,
    JobLedgerError,
    JobNotFound,
    PublishError,
    StoreError,
)

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the server refuses: ``status``, a one-line message, the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def error_body(message: str, field: str | None = None) -> dict[str, str | None]:
    return {"error": message, "field": field}


def status_of(exc: JobLedgerError) -> int:
    """The HTTP status of a jobledger error: the caller's fault is 4xx, the ledger's is 503."""
    if isinstance(exc, JobNotFound):
        return 404
    if isinstance(exc, (IntegrationMissing, InvalidTransition)):
        return 409
    if isinstance(exc, PublishError):
        return 502
    if isinstance(exc, StoreError):
        return 503
    if isinstance(exc, ConfigError):
        return 422
    return 400


def _field_of(errors: list[dict[str, object]]) -> str | None:
    if not errors:
        return None
    loc = [str(p) for p in errors[0].get("loc", ()) if p not in ("body", "query", "path")]  # type: ignore[attr-defined]
    return ".".join(loc) or None


def install(app: FastAPI, on_store_error: object = None) -> None:
    """Register the handlers that turn every refusal into the JSON error shape."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.field), status_code=exc.status)

    @app.exception_handler(JobLedgerError)
    async def ledger_error(_: Request, exc: JobLedgerError) -> JSONResponse:
        status = status_of(exc)
        if status == 503:
            log.warning("ledger error: %s", exc)
            if callable(on_store_error):
                on_store_error()
        return JSONResponse(error_body(str(exc)), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        message = str(errors[0].get("msg", "invalid request")) if errors else "invalid request"
        return JSONResponse(error_body(message, _field_of(errors)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        field = "body" if exc.status_code in (400, 413) else None
        return JSONResponse(
            error_body(str(exc.detail), field), status_code=exc.status_code, headers=exc.headers
        )
