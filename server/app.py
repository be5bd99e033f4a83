"""FastAPI application: routes parse and validate; the completion and safety modules decide."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from safeserve.server import completions, metrics, moderation, prepare
from safeserve.server.auth import KeyRing, Principal
from safeserve.server.engine import Engine
from safeserve.server.errors import APIError, bad_request, install_handlers
from safeserve.server.middleware import (AuthenticateFirst, BodyLimit, CheckedJSONRoute,
                                         RequestAccounting, RequestIdHeader)
from safeserve.server.protocol import (ChatCompletionRequest, ModelCard, ModelList,
                                       ModerationRequest)
from safeserve.server.safety_service import SafetyService

log = logging.getLogger(__name__)

_TRACE_ON, _TRACE_OFF = ("1", "true", "yes"), ("", "0", "false", "no")


def create_app(engine: Engine, safety=None, head_check=None) -> FastAPI:
    """``safety``: (SafetyPolicy, TelemetryHub) when the model has a head, else None;
    ``head_check``: the head's startup self-check (a HeadCheckPlan), run before the engine
    is ready."""
    started = int(time.time())
    svc = None
    if safety is not None:
        policy, hub = safety
        svc = SafetyService(policy, hub, lambda: engine.tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if svc is not None:
            svc.hub.export_address()  # before the engine spawns its workers
            try:
                await svc.hub.start()
            except BaseException:
                svc.hub.stop()  # its socket directory too
                raise
        verify = None
        if svc is not None:
            verify = functools.partial(_verify_safety, engine, svc, head_check)
        task = asyncio.create_task(engine.start(verify))
        app.state.engine_task = task
        try:
            yield
        finally:
            if not task.done():
                task.cancel()
            try:
                engine.shutdown()
            finally:  # the hub's task and socket directory go even if the engine's did not
                if svc is not None:
                    svc.hub.stop()

    keyring = KeyRing(list(engine.settings.api_keys), engine.settings.grants)
    # With keys, nothing but /health, /ready and /metrics answers without one: FastAPI's
    # schema and docs pages are left out (the API is OpenAI's, documented in the README).
    docs = {} if not keyring.enabled else {"openapi_url": None, "docs_url": None,
                                            "redoc_url": None}
    app = FastAPI(title="SafeServe", version="0.1.0", lifespan=lifespan, **docs)
    app.router.route_class = CheckedJSONRoute  # bodies: bounded values, each key once
    install_handlers(app)
    # Outermost last: the accounting sees the body limit's 413s.
    app.add_middleware(BodyLimit, limit=engine.settings.max_request_body_bytes)
    if keyring.enabled:
        app.add_middleware(AuthenticateFirst, authenticate=keyring.authenticate,
                           paths=(CHAT_PATH, MODERATIONS_PATH))
    app.add_middleware(RequestAccounting, path=CHAT_PATH,
                       other_paths=(MODERATIONS_PATH, MODELS_PATH, MODELS_PATH + "/{id}"))
    app.add_middleware(RequestIdHeader)  # outermost: every response, 413s and 401s included
    if svc is not None:
        keyring.check(svc.policy)

    async def authorize(request: Request) -> Principal:
        return keyring.authenticate(request.headers.get("authorization"))

    def require_ready() -> None:
        if engine.is_ready:
            return
        if engine.failed:
            raise APIError(503, "the engine has stopped; the server is shutting down",
                           type="server_error", code="engine_dead")
        raise APIError(503, "the engine is not ready yet", type="server_error",
                       code="engine_not_ready")

    def check_model(name: str) -> None:
        if name != engine.spec.served_name:
            raise APIError(404, f"The model `{name}` does not exist.", type="not_found_error",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if engine.is_ready:
            return {"status": "ready", "model": engine.spec.served_name}
        status = "failed" if engine.failed else "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> ModelCard:
        return ModelCard(id=engine.spec.served_name, created=started,
                         root=str(engine.spec.model_dir), max_model_len=engine.max_model_len,
                         safety=safety_summary())

    def safety_summary() -> dict:
        summary = engine.spec.safety_summary()
        if head_check is not None:
            summary["head_check"] = head_check.result or {"status": "pending"}
        return summary

    @app.get(MODELS_PATH, dependencies=[Depends(authorize)])
    async def list_models():
        return ModelList(data=[model_card()])

    # `client.models.retrieve(id)`; a model id may hold slashes (an HF-style name)
    @app.get(MODELS_PATH + "/{model_id:path}", dependencies=[Depends(authorize)])
    async def retrieve_model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post(CHAT_PATH)
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               principal: Principal = Depends(authorize)):
        request.state.safeserve_mode = "stream" if body.stream else "unary"
        try:
            return await serve_chat(body, request, principal)
        except APIError:
            raise
        except Exception:  # a clean JSON 500 (the connection stays usable), logged
            log.exception("chat completion failed")
            raise APIError(500, "internal server error", type="server_error") from None

    async def serve_chat(body: ChatCompletionRequest, request: Request, principal: Principal):
        check_model(body.model)
        x_config = utf8_header(request, "X-Safety-Config")
        req_safety = None
        trace = (utf8_header(request, "X-Safety-Trace") or "").strip().lower()
        if trace not in _TRACE_ON + _TRACE_OFF:
            # a switch misread as off would silently return no trace
            raise APIError(400, "X-Safety-Trace must be 1, true or yes (or 0, false, no)",
                           param="X-Safety-Trace", code="invalid_value")
        if svc is not None:
            req_safety = svc.resolve(x_config, body.safety_config, trace=trace in _TRACE_ON)
            svc.authorize(principal, req_safety)
        elif (asked := body.safety_config is not None or bool((x_config or "").strip())) \
                or trace in _TRACE_ON:
            raise APIError(400, "this server runs without a safety head (--allow-unsafe); "
                           "safety configs cannot be enforced nor scores traced",
                           param="safety_config" if asked else "X-Safety-Trace",
                           code="safety_unavailable")
        require_ready()
        prep = await prepare.prepare(engine, body, req_safety)
        prep.cache_salt = principal.cache_salt
        request.state.safeserve_request_id = prep.completion_id  # the x-request-id header
        if body.stream:
            events = _counted(completions.stream(engine, svc, prep))
            # The first event is produced before the response starts (it waits for the
            # engine's first output): a failure up to there, the engine's rejection included,
            # is still an HTTP error; after it, the stream ends with an error event.
            try:
                first = await _unless_disconnected(request, anext(events))
            except BaseException:
                await events.aclose()
                raise
            if isinstance(first, Response):  # the client left before the first output
                await events.aclose()
                return first
            return ClosingStreamingResponse(
                _relay(first, events), events=events, media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", **_config_headers(req_safety)})
        metrics.IN_FLIGHT.inc()
        try:
            result = await _unless_disconnected(request, completions.complete(engine, svc, prep))
        finally:
            metrics.IN_FLIGHT.dec()
        if isinstance(result, Response):
            return result
        response, reports = result
        return JSONResponse(response.model_dump(mode="json"),
                            headers={**_config_headers(req_safety), **_safety_headers(reports)})

    @app.post(MODERATIONS_PATH)
    async def moderations(body: ModerationRequest, request: Request,
                          principal: Principal = Depends(authorize)):
        if body.model is not None and not moderation.OPENAI_MODERATION_MODEL.match(body.model):
            check_model(body.model)
        if svc is None:
            raise APIError(400, "this server runs without a safety head (--allow-unsafe): it "
                           "has nothing to moderate with", code="safety_unavailable")
        req_safety = svc.resolve(utf8_header(request, "X-Safety-Config"), body.safety_config)
        svc.authorize(principal, req_safety, trace_returned=False)  # verdicts only
        require_ready()
        metrics.IN_FLIGHT.inc()
        try:
            result = await _unless_disconnected(
                request, moderation.moderate(engine, svc, body, req_safety,
                                             principal.cache_salt))
        except APIError:
            raise
        except Exception:
            log.exception("moderation failed")
            raise APIError(500, "internal server error", type="server_error") from None
        finally:
            metrics.IN_FLIGHT.dec()
        if isinstance(result, Response):
            return result
        return JSONResponse(result.model_dump(mode="json"), headers=_config_headers(req_safety))

    return app


CHAT_PATH = "/v1/chat/completions"
MODERATIONS_PATH = "/v1/moderations"
MODELS_PATH = "/v1/models"


async def _verify_safety(engine: Engine, svc: SafetyService, head_check) -> None:
    """Startup checks that need the model's tokenizer, run before the engine is ready: the
    presets' guidelines, then the head's self-check (when planned)."""
    prepare.check_preset_guidelines(engine.tokenizer, svc.policy.presets)
    if head_check is not None and head_check.runs:
        from safeserve.server.head_check import run_head_check

        await run_head_check(engine, svc, head_check)


def utf8_header(request: Request, name: str) -> str | None:
    """A header's value decoded as UTF-8 (Starlette decodes headers as latin-1, which garbles
    non-ASCII text such as a guideline in ``X-Safety-Config``)."""
    values = request.headers.getlist(name)
    if not values:
        return None
    if len(values) > 1:  # which one would win is the proxy's choice, not the client's
        raise bad_request(f"header {name} sent {len(values)} times; send it once", param=name,
                          code="invalid_header")
    value = values[0]
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise bad_request(f"header {name} is not valid UTF-8", param=name,
                          code="invalid_header") from None


def _config_headers(req_safety) -> dict:
    if req_safety is None:
        return {"X-Safety-Enabled": "false"}
    return {"X-Safety-Enabled": "true", "X-Safety-Preset": req_safety.preset or "custom"}


def _safety_headers(reports) -> dict:
    acted = [r for r in reports if r.action != "none"]
    cats = sorted({c for r in reports
                   for c in ((r.response.categories if r.response.flagged else [])
                             + (r.prompt.categories if r.prompt and r.prompt.flagged else []))})
    return {"X-Safety-Action": acted[0].action if acted else "none",
            "X-Safety-Categories": ",".join(cats)}


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body, and the event stream behind it, when the response ends, however it
    ends: Starlette leaves an abandoned body to the garbage collector, and until then the
    request's engine request, tracker and in-flight count live on (a client gone while a
    write was pending). The stream is closed itself too: a body never iterated (the client
    gone before the first write) does not close what it wraps."""

    def __init__(self, content, *, events, **kw):
        super().__init__(content, **kw)
        self._events = events

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                await self._events.aclose()


async def _counted(gen):
    metrics.IN_FLIGHT.inc()
    try:
        async for item in gen:
            yield item
    finally:
        try:
            await gen.aclose()  # (aborts the engine request: may raise on a failing engine)
        finally:
            metrics.IN_FLIGHT.dec()


async def _relay(first: str, events):
    """``first``, then the rest of ``events`` (already started; closed here, or by the event
    loop's async-generator finalizer should the response never iterate this)."""
    try:
        yield first
        async for item in events:
            yield item
    finally:
        await events.aclose()


async def _unless_disconnected(request: Request, coro):
    """Run a non-streaming completion, cancelling it (and so aborting it in the engine) if the
    client goes away first."""
    work = asyncio.ensure_future(coro)
    gone = False

    async def watch():
        nonlocal gone
        while not work.done():
            if await request.is_disconnected():
                gone = True
                work.cancel()
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:  # this handler was cancelled (the server shutting down): not a 499
            raise
        return Response(status_code=499)
    finally:
        watcher.cancel()
