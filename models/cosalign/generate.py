"""Candidate responses with vLLM's offline engine: several samples per (prompt, config),
the config in the system prompt exactly as the server would place it."""

from __future__ import annotations

import gc
import os
from pathlib import Path


def generate_candidates(model_dir: str | Path, conversations: list[list[dict]], *,
                        num_candidates: int = 4, max_tokens: int = 256,
                        temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
                        max_model_len: int = 2048, kv_cache_gib: float = 1.0,
                        dtype: str = "float32") -> list[list[str]]:
    """One list of ``num_candidates`` texts per conversation, in order."""
    # The SafeServe vLLM plugin only matters for serving heads; a plain base model needs
    # none of it, and skipping it keeps this engine independent of the server code.
    os.environ.setdefault("VLLM_PLUGINS", "none")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=max_model_len, seed=seed,
              kv_cache_memory_bytes=int(kv_cache_gib * (1 << 30)), enforce_eager=True)
    try:
        # No per-request seed: the CPU sampler cannot seed a request (the engine seed holds).
        params = SamplingParams(n=num_candidates, temperature=temperature, top_p=top_p,
                                max_tokens=max_tokens)
        outputs = llm.chat(conversations, params, use_tqdm=True)
        return [[c.text for c in o.outputs] for o in outputs]
    finally:
        # Free the engine (and its worker process) before training starts in this process.
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(
            getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm
        gc.collect()
