"""Offline vLLM jobs for the SEAL experiment, run in a child process so the engine's memory
and worker processes are gone before training starts.

    python -m safeserve.models.seal.generate JOB.json RESULT.json

JOB: {"model": dir, "max_model_len": int, "seed": int, "tasks": [task, ...]} with tasks

* {"name", "kind": "chat", "max_tokens", "lora": adapter dir or null,
   "items": [{"messages": [...], "prefill": str or null}]}  -> greedy completions (the
  prefill, when given, is an assistant message the model continues; the returned text is the
  continuation only)
* {"name", "kind": "nll", "lora": ..., "items": [{"messages": [...], "response": str}]}
  -> mean NLL per response token (end-of-turn included), from prompt log-probabilities.
  Only on an engine without LoRA: vLLM 0.32's CPU LoRA logits path fails on prompt
  log-probabilities (einsum shape error), so the experiment computes NLL with transformers.

RESULT: {task name: [text or nll, ...]} in item order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _lora_requests(tasks: list[dict]):
    from vllm.lora.request import LoRARequest

    paths = sorted({t["lora"] for t in tasks if t.get("lora")})
    return {p: LoRARequest(f"adapter{i}", i + 1, p) for i, p in enumerate(paths)}


def run_job(job: dict) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from safeserve.models.seal.data import encode

    tasks = job["tasks"]
    loras = _lora_requests(tasks)
    llm = LLM(model=job["model"], dtype="float32", max_model_len=job.get("max_model_len", 512),
              seed=job.get("seed", 0), enforce_eager=True,
              kv_cache_memory_bytes=int(job.get("kv_cache_gib", 1.0) * (1 << 30)),
              max_num_batched_tokens=job.get("max_num_batched_tokens", 1024),
              enable_lora=bool(loras), max_lora_rank=job.get("max_lora_rank", 16),
              max_loras=max(1, len(loras)))
    tok = AutoTokenizer.from_pretrained(job["model"])
    results: dict[str, list] = {}
    for task in tasks:
        lora = loras.get(task["lora"]) if task.get("lora") else None
        items = task["items"]
        if task["kind"] == "chat":
            sp = SamplingParams(temperature=0.0, max_tokens=task["max_tokens"])
            texts: list = [None] * len(items)
            for prefilled in (False, True):
                idx = [i for i, it in enumerate(items) if bool(it.get("prefill")) == prefilled]
                if not idx:
                    continue
                convs = [items[i]["messages"] + ([{"role": "assistant",
                                                   "content": items[i]["prefill"]}]
                                                  if prefilled else []) for i in idx]
                outs = llm.chat(convs, sp, lora_request=lora, use_tqdm=True,
                                add_generation_prompt=not prefilled,
                                continue_final_message=prefilled)
                for i, o in zip(idx, outs):
                    texts[i] = o.outputs[0].text
            results[task["name"]] = texts
        elif task["kind"] == "nll":
            sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
            encs = [encode(tok, it["messages"], it["response"]) for it in items]
            outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in encs], sp,
                                lora_request=lora, use_tqdm=True)
            nlls = []
            for (ids, n_prompt), o in zip(encs, outs):
                lps = [o.prompt_logprobs[p][ids[p]].logprob for p in range(n_prompt, len(ids))]
                nlls.append(-sum(lps) / len(lps))
            results[task["name"]] = nlls
        else:
            raise ValueError(f"unknown task kind {task['kind']!r}")
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run_job(job)))


if __name__ == "__main__":
    main()
