"""The in-process vLLM engine: ``AsyncLLM`` built from our settings, started off the event
loop so that /health answers while it loads, and a stat logger that feeds our gauges."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from safeserve.server import metrics
from safeserve.server.process_lifetime import mark_children
from safeserve.server.settings import Settings

log = logging.getLogger(__name__)


def pin_v1_model_runner() -> None:
    """GPU builds default to Model Runner V2, whose logits-processor interface differs from
    the V1 runner our safety processor is written against: pin V1 on every platform, over an
    operator's setting too (under V2 the processor would not run, and the server would serve
    unguarded)."""
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") != "0":
        log.warning("VLLM_USE_V2_MODEL_RUNNER=%s ignored: the safety processor needs vLLM's V1 "
                    "model runner", os.environ["VLLM_USE_V2_MODEL_RUNNER"])
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"

def use_loadable_compile_cache() -> None:
    """vLLM 0.32's CPU build cannot load the ahead-of-time compiled model it saves ("'function'
    object has no attribute 'finalize_loading'"), so every start compiled the model again:
    measured 52-60 s of engine init against 17 s with its older compile cache, which loads
    (78-90 s against 45-51 s from launch to ready, 2 cores). On CPU, use that cache unless
    the operator chose (VLLM_USE_AOT_COMPILE); GPU builds keep vLLM's default."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


# How often a ready engine is checked for having died (its core process killed, e.g. by the
# out-of-memory killer): a dead one stops the server, so a supervisor restarts it.
WATCH_PERIOD_S = 2.0


def _stat_logger_factory():
    from vllm.v1.metrics.loggers import StatLoggerBase

    class GaugeStatLogger(StatLoggerBase):
        """Copies the scheduler's running/waiting counts into our Prometheus gauges."""

        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is not None:
                metrics.RUNNING.set(scheduler_stats.num_running_reqs)
                metrics.WAITING.set(scheduler_stats.num_waiting_reqs)

        def log_engine_initialized(self):
            pass

    return GaugeStatLogger


@dataclass
class EngineSpec:
    """What the engine is started with, resolved from settings and the model directory."""

    model_dir: Path
    served_name: str
    hf_overrides: dict | None = None
    logits_processors: list[str] | None = None
    has_head: bool = False
    safety_enabled: bool = False
    head_info: dict | None = None
    # The middle layer a format-6 head's prompt read-out reads (None: none). It changes what
    # the compiled model returns, so it goes into vLLM's config hash (see _build).
    prompt_layer: int | None = None

    def safety_summary(self) -> dict:
        return {"enabled": self.safety_enabled, "model_has_head": self.has_head,
                "unsafe_allowed": not self.safety_enabled, **(self.head_info or {})}


def freeze_startup_heap() -> None:
    """Move everything allocated while starting (torch, transformers, vLLM's modules, the
    tokenizer: millions of objects) out of the collector's reach. Otherwise each full
    collection while serving walks all of them: measured 0.7 s with the event loop stalled,
    every stream frozen, about once per 4,000 streamed tokens at 32 concurrent requests."""
    gc.collect()
    gc.freeze()


class Engine:
    def __init__(self, settings: Settings, spec: EngineSpec):
        self.settings = settings
        self.spec = spec
        self.llm = None
        self.tokenizer = None
        self.max_model_len = settings.max_model_len
        self.ready = asyncio.Event()
        self.error: BaseException | None = None
        # How a failed start stops the server: run_server points it at uvicorn's exit flag,
        # so the process ends through its own exit path with the reason; without one, SIGTERM.
        self.on_failure = None
        self._watch_task: asyncio.Task | None = None

    def _build(self):
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        pin_v1_model_runner()
        use_loadable_compile_cache()
        mark_children()  # the engine core dies with this process (process_lifetime)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.spec.model_dir))
        args = AsyncEngineArgs(
            model=str(self.spec.model_dir),
            served_model_name=[self.spec.served_name],
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            kv_cache_memory_bytes=int(s.kv_cache_gib * (1 << 30)),
            max_num_seqs=s.max_num_seqs,
            enforce_eager=s.enforce_eager,
            disable_log_stats=False,
            **({"hf_overrides": self.spec.hf_overrides} if self.spec.hf_overrides else {}),
            **({"logits_processors": self.spec.logits_processors}
               if self.spec.logits_processors else {}),
            # vLLM keys its compiled-graph caches by the config's hash, not by state a model
            # class sets on itself: without this, a model directory served before with another
            # head would replay a graph that returns no middle layer (or another one).
            **({"additional_config": {"safeserve_prompt_layer": self.spec.prompt_layer}}
               if self.spec.has_head else {}),
        )
        return AsyncLLM.from_engine_args(args, stat_loggers=[_stat_logger_factory()])

    async def start(self, verify=None) -> None:
        """``verify``: a coroutine function run once the engine is built and before it is
        ready (the head's self-check); its exception fails the start like a build error."""
        try:
            self.llm = await asyncio.to_thread(self._build)
            freeze_startup_heap()
            if verify is not None:
                await verify()
            self.ready.set()
            log.info("engine ready: %s", self.spec.served_name)
        except Exception as e:
            log.exception("engine failed to start; shutting down")
            self._fail(e)
            return
        self._watch_task = asyncio.create_task(self._watch())

    def _fail(self, error: BaseException) -> None:
        """A server whose engine cannot run must not linger half-alive (answering 503s
        forever): stop the process (run_server turns this into a non-zero exit) so a
        supervisor can see it and restart it."""
        self.error = error
        if self.on_failure is not None:
            self.on_failure()
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    async def _watch(self) -> None:
        while (llm := self.llm) is not None:
            if llm.errored:
                error = getattr(llm, "dead_error", None) or RuntimeError("the engine died")
                log.error("the engine died after it was ready (%s); shutting down", error)
                self._fail(error)
                return
            await asyncio.sleep(WATCH_PERIOD_S)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Token ids that are never text (end-of-sequence, chat markers)."""
        return frozenset(int(i) for i in self.tokenizer.all_special_ids)

    @property
    def failed(self) -> bool:
        """It failed to start, or died after it was ready."""
        return self.error is not None or (self.llm is not None and bool(self.llm.errored))

    @property
    def is_ready(self) -> bool:
        return self.ready.is_set() and self.llm is not None and not self.llm.errored

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(request_id)

    def shutdown(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
