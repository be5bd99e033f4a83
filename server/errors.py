"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status
for anything the client got wrong, so bad input never surfaces as a 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from safeserve.server import metrics

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _loc_to_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or None


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        metrics.REQUESTS.labels("400", "invalid").inc()
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = tuple(first.get("loc", ()))
        param = _loc_to_param(loc)
        if first.get("type") == "json_invalid":
            return APIError(400, "request body is not valid JSON", code="invalid_json").response()
        if loc == ("body",):
            return APIError(400, "request body must be a JSON object (Content-Type: "
                            "application/json)", code="invalid_json").response()
        if first.get("type") == "extra_forbidden":
            return APIError(400, f"unsupported parameter: {param}", param=param,
                            code="unsupported_parameter").response()
        msg = first.get("msg", "invalid request")
        return APIError(400, f"{param}: {msg}" if param else msg, param=param,
                        code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("internal error")
        return APIError(500, "internal server error", type="server_error").response()
