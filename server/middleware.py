"""ASGI middleware of the HTTP layer: authentication before the body, the request body limit
and per-request accounting; and the routes' JSON body parsing (server/body_json.py)."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import Request
from fastapi.routing import APIRoute

from safeserve.server import metrics
from safeserve.server.body_json import MAX_JSON_VALUES, RepeatedKey, TooManyValues, loads_checked
from safeserve.server.errors import APIError, BodyRefused, BodyTooLarge, request_too_large


class AuthenticateFirst:
    """With API keys, a POST to one of ``paths`` whose key does not authenticate gets its 401
    before its body is read: an unauthenticated client cannot make the server buffer and
    parse megabytes of JSON. (The route's own dependency authenticates again and knows the
    key's grant.)"""

    def __init__(self, app, authenticate, paths: tuple[str, ...]):
        self.app, self.authenticate, self.paths = app, authenticate, frozenset(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            header = next((v.decode("latin-1") for k, v in scope["headers"]
                           if k == b"authorization"), None)
            try:
                self.authenticate(header)
            except APIError as e:
                return await e.response()(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with a 413: at once when Content-Length
    says so, else as soon as the body read so far passes it (so a huge body is never
    buffered, parsed or tokenized)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    break
                if declared > self.limit:
                    # (the server reads and drops the rest of the body: the client sees the 413)
                    return await request_too_large(self.limit).response()(scope, receive, send)
                break
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


class RequestIdHeader:
    """Every HTTP response carries ``x-request-id`` (the official clients expose it as
    ``_request_id`` and on their errors, so a report can be matched to the server's log): the
    chat completion's id once the route has one (``request.state.safeserve_request_id``),
    else a fresh one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    rid = ((scope.get("state") or {}).get("safeserve_request_id")
                           or f"req-{uuid.uuid4().hex}")
                    headers.append((b"x-request-id", rid.encode("latin-1", "replace")))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class RequestAccounting:
    """Counts each request to ``path`` once, with the status it got (401s, 413s and validation
    errors included; a stream counts as its 200): as its last byte goes out, so the count is
    there by the time the client has the response, or when it ends without one. Requests to
    ``other_paths`` (a fixed set: the label stays bounded) count the same way in
    ``safeserve_api_requests_total{path,status}``; an entry ending in ``/{id}`` stands for
    every path below its prefix and is the label they count under."""

    def __init__(self, app, path: str, other_paths: tuple[str, ...] = ()):
        self.app, self.path = app, path
        self.other_paths = frozenset(p for p in other_paths if not p.endswith("/{id}"))
        self.templates = tuple((p[:-len("{id}")], p) for p in other_paths if p.endswith("/{id}"))

    def _label(self, path: str) -> str | None:
        if path == self.path or path in self.other_paths:
            return path
        return next((label for prefix, label in self.templates
                     if path.startswith(prefix) and len(path) > len(prefix)), None)

    async def __call__(self, scope, receive, send):
        path = self._label(scope["path"]) if scope["type"] == "http" else None
        if path is None:
            return await self.app(scope, receive, send)
        status = None
        counted = False

        def count(final_status) -> None:
            nonlocal counted
            if not counted:
                counted = True
                if path != self.path:
                    metrics.API_REQUESTS.labels(path, str(final_status)).inc()
                    return
                mode = (scope.get("state") or {}).get("safeserve_mode", "invalid")
                metrics.REQUESTS.labels(str(final_status), mode).inc()

        disconnected = False

        async def watching_receive():
            nonlocal disconnected
            message = await receive()
            disconnected = disconnected or message["type"] == "http.disconnect"
            return message

        async def watching_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                count(status)
            await send(message)

        try:
            await self.app(scope, watching_receive, watching_send)
        except asyncio.CancelledError:
            # 499 only when the client went away; a handler the server cancelled (uvicorn's
            # graceful-shutdown timeout) gets uvicorn's 500, if its connection still stands
            count(status or (499 if disconnected else 500))
            raise
        except Exception:
            count(status or 500)  # the server error middleware answers it with a 500
            raise
        finally:
            count(status or 500)


class _CheckedJSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            try:
                self._json = loads_checked(await self.body())
            except TooManyValues:
                raise BodyRefused(APIError(
                    400, f"the request body holds more than {MAX_JSON_VALUES} JSON values "
                    "(list items and object members, nested ones included)",
                    code="too_long")) from None
            except RepeatedKey as e:
                raise BodyRefused(APIError(
                    400, f"the request body sets the key '{e.key}' more than once in one "
                    "object", code="repeated_key")) from None
        return self._json


class CheckedJSONRoute(APIRoute):
    """A route whose body is parsed by ``loads_checked`` (FastAPI's pattern for a custom
    request class)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def checked(request: Request):
            return await handler(_CheckedJSONRequest(request.scope, request.receive))

        return checked
