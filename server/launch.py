"""Resolve what to serve (model directory, safety head, fail-closed rules) and run uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from safeserve.server.engine import Engine, EngineSpec
from safeserve.server.settings import Settings

log = logging.getLogger(__name__)


class StartupError(SystemExit):
    """A configuration that must not be served; the message says why and how to fix it."""

    def __init__(self, message: str):
        super().__init__(f"safeserve: {message}")


def resolve_spec(settings: Settings) -> EngineSpec:
    from safeserve.models.model_store import DEFAULT_MODEL_NAME, ensure_default_model

    if settings.model is None:
        model_dir, name = ensure_default_model(), DEFAULT_MODEL_NAME
    else:
        model_dir = settings.model.expanduser().resolve()
        if not (model_dir / "config.json").is_file():
            raise StartupError(f"--model {model_dir} is not a Hugging Face model directory "
                               "(no config.json)")
        name = model_dir.name
    name = settings.served_model_name or name
    if not settings.allow_unsafe:
        raise StartupError(
            f"{model_dir} has no safety head; refusing to serve it without --allow-unsafe")
    return EngineSpec(model_dir=model_dir, served_name=name)


def run_server(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = resolve_spec(settings)
    from safeserve.server.app import create_app

    engine = Engine(settings, spec)
    app = create_app(engine)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=5)
