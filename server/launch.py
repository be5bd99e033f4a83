"""Resolve what to serve (model directory, safety head, fail-closed rules) and run uvicorn."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import uvicorn
from safeserve.models.checkpoint import (
    HEAD_DIR,
    CheckpointError,
    has_safety_head,
    load_safety_head,
)
from safeserve.server.engine import Engine, EngineSpec
from safeserve.server.settings import Settings

log = logging.getLogger(__name__)


def one_line(e: Exception) -> str:
    """An error's message on one line (YAML parser errors span several)."""
    return " ".join(str(e).split())


class StartupError(SystemExit):
    """A configuration that must not be served; the message says why and how to fix it."""

    def __init__(self, message: str):
        super().__init__(f"safeserve: {message}")


# SAFESERVE_* variables that are not server settings but are read elsewhere (cache, tests,
# benchmarks, kernels).
_OTHER_VARIABLES = {"CACHE_DIR", "SKIP_DDP", "TELEMETRY_ADDR", "BENCH_API_KEY",
                    "TEST_START_TIMEOUT", "FORCE_TRITON", "SYNC_FREE", "TRACEBACK"}


def unknown_variables(environ=None) -> list[str]:
    """``SAFESERVE_*`` variables that name no setting: a typo (``SAFESERVE_API_KEY`` for
    ``SAFESERVE_API_KEYS``) would otherwise be ignored without a word."""
    import os

    known = {name.upper() for name in Settings.model_fields} | _OTHER_VARIABLES
    env = os.environ if environ is None else environ
    # in any case, as the settings reader matches them: safeserve_api_key is a typo too
    return sorted(k for k in env if k.upper().startswith("SAFESERVE_")
                  and k[len("SAFESERVE_"):].upper() not in known)


def load_settings(**overrides) -> Settings:
    """Flags over ``SAFESERVE_*`` variables; a bad value is one line naming the setting. An
    unknown ``SAFESERVE_*`` variable is a startup error (a misspelt key list would leave the
    server open). A server on a non-loopback address without keys is only warned about: a
    trusted network may be meant."""
    from pydantic import ValidationError

    unknown = unknown_variables()
    if unknown:
        raise StartupError(f"unknown setting variable(s) {', '.join(unknown)}; the settings "
                           "are " + ", ".join(f"SAFESERVE_{n.upper()}"
                                              for n in Settings.model_fields))
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else "settings"
            flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
            problems.append(f"{flag} (or SAFESERVE_{name.upper()}): {err['msg']}, "
                            f"got {err.get('input')!r}")
        raise StartupError("invalid setting " + "; ".join(problems)) from None
    if (not settings.api_keys and settings.grants is None
            and settings.host not in ("127.0.0.1", "localhost", "::1")):
        log.warning("listening on %s with no API keys: anyone who can reach it can use it "
                    "(set --api-key / SAFESERVE_API_KEYS, or --grants)", settings.host)
    return settings


# Settings whose command-line flag is not their name with dashes.
_FLAGS = {"api_keys": "--api-key"}

def resolve_spec(settings: Settings) -> EngineSpec:
    from safeserve.models.model_store import DEFAULT_MODEL_NAME, ensure_default_model

    if settings.model is None:
        base_dir, name = ensure_default_model(), DEFAULT_MODEL_NAME
        model_dir = base_dir if settings.safety_head else compose_default(base_dir, settings)
    else:
        model_dir = settings.model.expanduser().resolve()
        if not (model_dir / "config.json").is_file():
            raise StartupError(f"--model {model_dir} is not a Hugging Face model directory "
                               "(no config.json)")
        name = model_dir.name
    if settings.safety_head:
        model_dir = compose_with_head(model_dir, settings.safety_head)
    name = settings.served_model_name or name
    # A head asked for, or a safety_head/ folder present, is loaded whatever --allow-unsafe
    # says: an incomplete one (its weights lost in a copy) is an error naming the missing
    # file, never a model served without its head. (lexists: a dangling safety_head link
    # is a head that went missing, not no head.)
    if not has_safety_head(model_dir) and not settings.safety_head \
            and not os.path.lexists(model_dir / HEAD_DIR):
        if not settings.allow_unsafe:
            raise StartupError(
                f"{model_dir} has no safety head ({HEAD_DIR}/); refusing to serve it without "
                "--allow-unsafe")
        log.warning("serving %s WITHOUT a safety head (--allow-unsafe)", model_dir)
        return EngineSpec(model_dir=model_dir, served_name=name)
    return _safe_spec(model_dir, name)


def compose_default(base_dir: Path, settings: Settings) -> Path:
    """The embedded model with the committed default head, or the bare model if no head
    ships (then only --allow-unsafe serves it)."""
    from safeserve.models.model_store import DEFAULT_HEAD_DIR, compose_checkpoint

    if not has_safety_head(DEFAULT_HEAD_DIR):
        return base_dir
    return compose_checkpoint(base_dir, DEFAULT_HEAD_DIR)


def compose_with_head(model_dir: Path, head: str) -> Path:
    """``model_dir`` with the safety head ``head`` (a bundled name or a directory) in place of
    any head it has; a LoRA adapter beside that head is merged into the LM."""
    from safeserve.models.model_store import compose_checkpoint, resolve_head_dir

    try:
        head_dir = resolve_head_dir(head)
    except FileNotFoundError as e:
        raise StartupError(str(e)) from None
    try:
        return compose_checkpoint(model_dir, head_dir)
    except Exception as e:  # PEFT missing, an adapter for another base (RuntimeError): one line
        raise StartupError(f"cannot compose {model_dir} with the safety head {head_dir}: "
                           + " ".join(str(e).split())) from None


def _safe_spec(model_dir: Path, name: str) -> EngineSpec:
    from safeserve.models.decision_defaults import overall_threshold
    from safeserve.server.safety_model import SUPPORTED_ARCHITECTURES

    config = json.loads((model_dir / "config.json").read_text())
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise StartupError(f"architecture {archs} is not supported with a safety head "
                           f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    try:  # fail at startup, in this process, on a head that does not fit the model
        head = load_safety_head(model_dir)
        head.validate(config.get("hidden_size"), config.get("num_hidden_layers"))
    except CheckpointError as e:
        raise StartupError(str(e)) from None
    except Exception as e:  # a truncated safetensors file, a malformed config: one line
        raise StartupError(f"cannot load the safety head of {model_dir}: {type(e).__name__}: "
                           + " ".join(str(e).split())) from None
    return EngineSpec(
        model_dir=model_dir, served_name=name,
        hf_overrides={"architectures": [f"SafeServe{arch}"]},
        logits_processors=["safeserve.server.safety_processor:SafetyLogitsProcessor"],
        has_head=True, safety_enabled=True, prompt_layer=head.prompt_layer,
        head_info={"categories": list(head.taxonomy.ids), "layer": head.layer,
                   # the head's own: every output, the overall one (folded at 0.5) included
                   "thresholds": {**{c.id: c.threshold for c in head.taxonomy.categories},
                                  "unsafe": overall_threshold(head.extra)}},
    )


def build_safety(spec: EngineSpec, settings: Settings):
    """The HTTP side of the safety path, or None when serving without a head."""
    if not spec.safety_enabled:
        return None
    from safeserve.models.decision_defaults import (
        alert_band,
        allowlist_overall_shift,
        prompt_logit_offset,
        check_sampled_clear_margin,
        head_tau,
        overall_threshold,
        sampled_clear_margin,
        sampled_overall_shift_points,
    )
    from safeserve.server.safety_config import DEFAULT_TAU, SafetyPolicy
    from safeserve.server.safety_tracker import TelemetryHub

    head = load_safety_head(spec.model_dir)
    try:
        alert_margin, alert_tau = alert_band(head.extra)
        prompt_logit_offset(head.extra)  # the worker reads it; a bad one fails here, clearly
        sampled_points = sampled_overall_shift_points(head.extra)
        clear_margin = sampled_clear_margin(head.extra)
        check_sampled_clear_margin(head.extra)
        allowlist_overall_shift(head.extra)
        threshold, tau = overall_threshold(head.extra), head_tau(head.extra, DEFAULT_TAU)
    except (TypeError, ValueError) as e:
        raise StartupError(f"safety head {spec.model_dir}: {e}") from None
    try:
        policy = SafetyPolicy(head.taxonomy, settings.presets, settings.default_preset,
                              overall_threshold=threshold, default_tau=tau,
                              allowlist_overall_shift=allowlist_overall_shift(head.extra),
                              sampled_overall_shift=sampled_points,
                              sampled_clear_margin=clear_margin,
                              alert_margin=alert_margin, alert_tau=alert_tau,
                              explain_sentences=settings.refusal_explain_sentences,
                              gate_replaces_prompt_categories=(
                                  head.topic is not None and head.gate_replaces_prompt_categories))
    except (ValueError, OSError) as e:
        raise StartupError(f"safety presets: {one_line(e)}") from None
    return policy, TelemetryHub()


def build_head_check(spec: EngineSpec, settings: Settings):
    """The head's startup self-check (None when serving without a head); a malformed record
    is a startup error."""
    if not spec.safety_enabled:
        return None
    from safeserve.models.head_check import SelfCheck
    from safeserve.server.head_check import HeadCheckPlan

    from safeserve.models.decision_defaults import prompt_logit_offset

    head = load_safety_head(spec.model_dir)
    try:
        record = SelfCheck.from_extra(head.extra)
    except ValueError as e:
        raise StartupError(f"safety head {spec.model_dir}: {e}") from None
    return HeadCheckPlan.build(record, settings.head_check, settings.head_check_tolerance,
                               settings.dtype, prompt_logit_offset(head.extra))


def uvicorn_config(app, settings: Settings) -> uvicorn.Config:
    # uvicorn takes whole seconds; a fraction rounds up, so a grace is never cut short
    return uvicorn.Config(app, host=settings.host, port=settings.port,
                          log_level=settings.log_level,
                          timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s))


def run_server(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = resolve_spec(settings)
    from safeserve.server.app import create_app

    engine = Engine(settings, spec)
    try:
        app = create_app(engine, build_safety(spec, settings), build_head_check(spec, settings))
    except (ValueError, OSError) as e:  # unreadable grants file and the like
        raise StartupError(one_line(e)) from None
    config = uvicorn_config(app, settings)
    server = uvicorn.Server(config)
    try:
        # Bound before the app starts (uvicorn would bind after its startup, which begins the
        # engine's build): a port in use fails now, not after minutes of loading a model.
        sock = config.bind_socket()
    except SystemExit:  # uvicorn has logged the reason
        raise StartupError(f"cannot listen on {settings.host}:{settings.port}") from None
    # A failed start asks uvicorn to exit rather than signalling the process: uvicorn re-raises
    # a signal it caught once it is done, which would end the process before the reason below.
    engine.on_failure = lambda: setattr(server, "should_exit", True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down; exit 0 as uvicorn.run does
        pass
    if engine.error is not None:
        from safeserve.server.head_check import HeadCheckFailed

        if isinstance(engine.error, HeadCheckFailed):
            raise StartupError(f"safety head self-check failed: {engine.error}")
        if engine.ready.is_set():
            raise StartupError(f"the engine died while serving: {engine.error}")
        raise StartupError(f"engine failed to start: {engine.error}")
