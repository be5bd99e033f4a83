"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status
for anything the client got wrong, so bad input never surfaces as a 500."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from safeserve.server.protocol import scrub
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# Validation error types raised by our own validators: their type is the error code.
_OWN_CODES = {"invalid_string"}
# Errors located at the body itself that mean "the body is not a JSON object".
_NOT_AN_OBJECT = {"model_attributes_type", "model_type", "dict_type", "missing"}


def _scrub(text) -> str | None:
    """Errors echo what the client sent, which may hold lone surrogates (JSON ``"\\ud800"``):
    those become U+FFFD instead of breaking the response."""
    return None if text is None else scrub(str(text))


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        message, param, code = _scrub(message), _scrub(param), _scrub(code)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status,
                            headers={**_RETRY_HINTS.get(self.code, {}), **(headers or {})})


# What a client should do about a 5xx (the official clients retry any 5xx twice unless told
# not to): a dead engine stays dead; a busy, loading or momentarily silent one may answer soon.
_RETRY_HINTS = {"engine_dead": {"x-should-retry": "false"},
                "engine_busy": {"Retry-After": "1"},
                "engine_not_ready": {"Retry-After": "5"},
                "safety_telemetry_missing": {"Retry-After": "1"}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def engine_request_error(e: BaseException) -> APIError | None:
    """What the client gets for an exception vLLM raised about its request (None: not one,
    a server error). vLLM's own validation (its client errors; ValueError in older paths) is
    a 400, or 404 for what it did not find; an admission limit (a full queue) carries its
    status; a dead engine is a 503."""
    try:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMNotFoundError
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # pragma: no cover - the HTTP layer's tests run without vLLM too
        GracefulHTTPError = VLLMClientError = VLLMNotFoundError = EngineDeadError = ()
    if isinstance(e, VLLMNotFoundError):
        return APIError(404, str(e), type="not_found_error")
    if isinstance(e, (VLLMClientError, ValueError)):
        return bad_request(str(e), param=getattr(e, "parameter", None))
    if isinstance(e, GracefulHTTPError):
        status = int(e.http_status)
        return APIError(status, e.message, code="engine_busy" if status == 503 else None,
                        type="server_error" if status >= 500 else "invalid_request_error")
    if isinstance(e, EngineDeadError):
        return APIError(503, "the engine has stopped; the server must be restarted",
                        type="server_error", code="engine_dead")
    return None


def request_too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the server's limit of {limit} bytes",
                    code="request_too_large")


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` while the body is read: FastAPI re-raises HTTPExceptions from
    body parsing as they are, so this reaches the handler below as a 413."""

    def __init__(self, limit: int):
        super().__init__(413, str(limit))
        self.limit = limit


class BodyRefused(StarletteHTTPException):
    """Raised while the body's JSON is parsed (server/body_json.py): FastAPI re-raises
    HTTPExceptions from there, so the handler below answers with ``error``."""

    def __init__(self, error: APIError):
        super().__init__(error.status, error.message)
        self.error = error


# Union members pydantic adds to a location ("stop.str", "safety_config.dict[str,any]").
_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def _loc_to_param(loc: tuple, field_last: bool = False) -> str | None:
    """``field_last``: the last element is a key the client sent (an unknown field), kept
    verbatim even when it reads like a union tag ("str", "a[b]")."""
    head, last = (loc[:-1], [str(loc[-1])]) if field_last and loc else (loc, [])
    parts = [str(p) for p in head[1:] if not (isinstance(p, str) and (
        p in _TYPE_TAGS or "[" in p or "(" in p))] if head[:1] == ("body",) else \
        [str(p) for p in head]
    return ".".join(parts + last) or None


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = tuple(first.get("loc", ()))
        kind = first.get("type")
        ctx = first.get("ctx") or {}
        if isinstance(ctx.get("param"), str):  # named by a model-level validator of ours
            param = ctx["param"] or None
        else:
            param = _loc_to_param(loc, field_last=kind == "extra_forbidden")
        if kind == "json_invalid":
            return APIError(400, "request body is not valid JSON", code="invalid_json").response()
        if loc == ("body",) and kind in _NOT_AN_OBJECT:
            return APIError(400, "request body must be a JSON object (Content-Type: "
                            "application/json)", code="invalid_json").response()
        if kind == "extra_forbidden":
            return APIError(400, f"unsupported parameter: {param}", param=param,
                            code="unsupported_parameter").response()
        msg = first.get("msg", "invalid request")
        value = first.get("input")
        if isinstance(value, float) and not math.isfinite(value):
            # NaN fails every bound check, so pydantic's message names the bound it tried
            msg = f"must be a finite number, not {value}"
        part = next((e for e in errs if e.get("type") == "literal_error"
                     and tuple(e.get("loc", ()))[-1:] == ("type",) and "content" in e["loc"]),
                    None)
        if part is not None and "content" in loc:  # an image or audio part, say
            msg = ("only text content parts are supported, not "
                   f"{scrub(str(part.get('input'))[:40])!r}")
        if param and not (msg.startswith(param) or f" {param} " in f" {msg} "):
            msg = f"{param}: {msg}"
        return APIError(400, msg, param=param,
                        code=kind if kind in _OWN_CODES else "invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        if isinstance(exc, BodyTooLarge):
            return request_too_large(exc.limit).response()
        if isinstance(exc, BodyRefused):
            return exc.error.response()
        if exc.status_code == 400:  # FastAPI could not parse the body (bad UTF-8, deep nesting)
            return APIError(400, "request body is not valid JSON (it could not be parsed)",
                            code="invalid_json").response()
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        response = APIError(exc.status_code, str(exc.detail), type=kind).response()
        response.headers.update(exc.headers or {})  # a 405's Allow
        return response

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("internal error")
        return APIError(500, "internal server error", type="server_error").response()
