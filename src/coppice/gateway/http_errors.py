"""The one place errors become HTTP answers, for the control plane and the relay alike:
E2B's `{"code", "message"}` body (plus `error_code` where the SDK tells errors apart by it)
and the status the `CoppiceError` subclass names. An unexpected exception is logged whole
and answered with a generic 500: its text is ours, not the caller's."""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import JSONResponse

from coppice.errors import CoppiceError, PoolExhausted

log = logging.getLogger("coppice.gateway")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status, headers=headers)


def from_coppice(exc: CoppiceError) -> JSONResponse:
    headers = {}
    if isinstance(exc, PoolExhausted):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    body: dict[str, Any] = {**exc.extra_json(), "code": exc.http_status, "message": str(exc)}
    if exc.error_code is not None:
        body["error_code"] = exc.error_code
    return JSONResponse(body, exc.http_status, headers=headers)


def unexpected(exc: BaseException) -> JSONResponse:
    log.error("unexpected error", exc_info=exc)
    return error(500, "internal error in the gateway; its log has the details")
