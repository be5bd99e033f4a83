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


def hf_chat(model_dir: str | Path, items: list[dict], max_tokens: int, batch_size: int = 16,
            log=None) -> list[str]:
    """Greedy completions with transformers (no vLLM engine): same item format as a "chat"
    task (``messages`` and an optional ``prefill`` the model continues; the returned text is
    the continuation only). Prompts are the chat template plus the generation prompt, left
    padded; generation stops at end-of-turn. On a small shared CPU this avoids the vLLM CPU
    engine's start-up and its slow first LoRA steps; it is the same model and greedy decoding,
    so answers differ from the engine's only by floating-point ties."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safeserve.models.seal.data import prompt_token_ids

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    encs = []
    for it in items:
        if it.get("prefill"):
            text = tok.apply_chat_template(
                it["messages"] + [{"role": "assistant", "content": it["prefill"]}],
                tokenize=False, continue_final_message=True)
            encs.append(list(tok(text, add_special_tokens=False)["input_ids"]))
        else:
            encs.append(prompt_token_ids(tok, it["messages"]))
    # Batches of similar length waste less padding; results go back in item order.
    order = sorted(range(len(encs)), key=lambda i: len(encs[i]))
    out: list[str | None] = [None] * len(encs)
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = max(len(encs[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(encs[i]):] = torch.tensor(encs[i])
                att[r, width - len(encs[i]):] = 1
            gen = model.generate(input_ids=ids, attention_mask=att, do_sample=False,
                                 max_new_tokens=max_tokens, pad_token_id=pad,
                                 eos_token_id=tok.eos_token_id, temperature=None, top_p=None,
                                 top_k=None)
            for r, i in enumerate(idx):
                out[i] = tok.decode(gen[r, width:], skip_special_tokens=True)
            if log is not None:
                log(f"hf generate {model_dir}: {min(b + batch_size, len(order))}/{len(order)}")
    return out  # type: ignore[return-value]
