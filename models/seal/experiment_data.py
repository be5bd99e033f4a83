"""The SEAL experiment's data: the prefill and the written refusals, the prompt splits drawn
from ``--data-root`` (``build_prompts``), greedy generation with transformers or offline vLLM
(``generate``, cached per task), the fine-tuning and safe sets (``build_data``), the alignment
set and the aligned base (``build_align_data``, ``align_base``), and the held-out answer NLL
(``heldout_nll``). ``experiment.py`` runs these as steps.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from safeserve.models.seal.data import write_jsonl
from safeserve.models.seal.experiment_config import ExperimentConfig

PREFILL = "Sure, here is"

# Written for this experiment: varied refusals, some pointing at a safe alternative.
REFUSALS = [
    "I can't help with that. It could seriously hurt people, so I won't give instructions for it.",
    "I'm sorry, but I won't assist with this request. It asks for something harmful or illegal.",
    "I must decline. Helping with this could put someone in danger, and that is not something I will do.",
    "I'm not able to provide that. If you are dealing with a difficult situation, I'm happy to talk about safe, legal options instead.",
    "Sorry, I can't do that. This request involves causing harm, and I don't provide help with it.",
    "I won't help with this. It would break the law and could hurt others. Is there something else I can help you with?",
    "I cannot assist with that request. Sharing this kind of information could lead to real harm.",
    "That's not something I can help with. I don't give guidance on hurting people, breaking into systems, or committing crimes.",
    "I'm sorry, I have to refuse. If you or someone else is at risk, please contact local emergency services or a trusted professional.",
    "No, I won't write that. It is harmful, and I'd rather help you with a legitimate task instead.",
]


def align_refusals() -> list[str]:
    """The written refusals the refusal judge labels full_refusal (used for alignment)."""
    from safeserve.models.evaluation.judge import FULL_REFUSAL, judge

    return [r for r in REFUSALS if judge(r).label == FULL_REFUSAL]



def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _instructions(path: Path) -> list[str]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [r["instruction"].strip() for r in rows if r.get("instruction", "").strip()]


def user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _run_vllm(job: dict, work: Path, name: str, log) -> dict:
    job_file, res_file = work / f"{name}_job.json", work / f"{name}_vllm_result.json"
    job_file.write_text(json.dumps(job))
    t0 = time.perf_counter()
    with open(work / f"{name}_vllm.log", "w") as logf:
        # A niced engine on a busy machine can take minutes per step: vLLM's default 300 s
        # step timeout would kill it.
        env = {**os.environ, "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "7200"}
        proc = subprocess.run(["nice", "-n", "19", sys.executable, "-m",
                               "safeserve.models.seal.generate", str(job_file), str(res_file)],
                              stdout=logf, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM job {name} failed; see {work / f'{name}_vllm.log'}")
    log(f"vLLM job {name}: {time.perf_counter() - t0:.0f} s")
    return json.loads(res_file.read_text())


def generate(cfg: ExperimentConfig, tasks: list[dict], work: Path, name: str, log) -> dict:
    """Greedy chat completions for ``tasks`` ({"name", "model": merged model dir, "items",
    "max_tokens", optional "engine" + "lora": base dir and LoRA adapter for vLLM}), cached per
    task in ``<work>/<name>_result.json`` ({task name: [text, ...]})."""
    from safeserve.models.seal.generate import hf_chat

    res_file = work / f"{name}_result.json"
    results = json.loads(res_file.read_text()) if res_file.is_file() else {}
    todo = [t for t in tasks if t["name"] not in results]
    if not todo:
        return results
    if cfg.gen_backend == "vllm":
        groups: dict[str, list[dict]] = {}
        for t in todo:
            groups.setdefault(t.get("engine") or t["model"], []).append(t)
        for i, (engine, ts) in enumerate(groups.items()):
            job = {"model": engine, "seed": cfg.seed, "tasks": [
                {"name": t["name"], "kind": "chat", "max_tokens": t["max_tokens"],
                 "lora": t.get("lora"), "items": t["items"]} for t in ts]}
            results.update(_run_vllm(job, work, f"{name}{i}", log))
            res_file.write_text(json.dumps(results))
    elif cfg.gen_backend == "hf":
        for t in todo:
            t0 = time.perf_counter()
            results[t["name"]] = hf_chat(t["model"], t["items"], t["max_tokens"])
            res_file.write_text(json.dumps(results))
            log(f"generate {name}/{t['name']}: {len(t['items'])} prompts, "
                f"{time.perf_counter() - t0:.0f} s")
    else:
        raise ValueError(f"unknown gen_backend {cfg.gen_backend!r} (hf | vllm)")
    return results


def build_prompts(cfg: ExperimentConfig) -> dict:
    from safeserve.models.evaluation.datasets import load_harmbench

    root = Path(cfg.data_root)
    rng = random.Random(cfg.seed)
    splits = root / "refusal_direction_splits"
    benign = _instructions(splits / "harmless_train.json")
    harmful = _instructions(splits / "harmful_train.json")
    benign_eval = _instructions(splits / "harmless_val.json")
    rng.shuffle(benign), rng.shuffle(harmful), rng.shuffle(benign_eval)
    hb = load_harmbench(root / "harmbench" / "harmbench_behaviors_text_test.csv")
    seen = {_norm(t) for t in harmful}
    hb = [s.prompt for s in hb if _norm(s.prompt) not in seen]
    rng.shuffle(hb)
    # Harmful prompts are generated with 2x headroom: answers that still refuse are dropped.
    n_h_pool = min(len(harmful) - cfg.n_safe_refusals, 2 * cfg.n_harmful)
    n_b = cfg.n_benign + cfg.n_safe_benign
    # Alignment rows come after the fine-tuning pool and before the safe rows (harmful), and
    # after the fine-tuning and safe rows (benign): disjoint from both by position.
    h_align_end = min(len(harmful) - cfg.n_safe_refusals, n_h_pool + cfg.n_align_harmful)
    p = {
        "benign_ft": benign[:cfg.n_benign],
        "benign_safe": benign[cfg.n_benign:n_b],
        "harmful_pool": harmful[:n_h_pool],
        "harmful_safe": harmful[len(harmful) - cfg.n_safe_refusals:],
        "benign_eval": benign_eval[:cfg.n_eval_benign],
        "harmful_eval": hb[:cfg.n_eval_harmful],
        "harmful_align": harmful[n_h_pool:h_align_end],
        "benign_align": benign[n_b:n_b + cfg.n_align_benign],
    }
    used = {_norm(t) for k in ("harmful_pool", "harmful_safe", "benign_ft", "benign_safe",
                               "benign_eval", "harmful_eval") for t in p[k]}
    for k in ("harmful_align", "benign_align"):
        p[k] = [t for t in p[k] if _norm(t) not in used]
    return p


def build_data(cfg: ExperimentConfig, model: Path, work: Path, log) -> dict:
    from safeserve.models.evaluation.judge import FULL_COMPLIANCE, judge

    ft_path, safe_path = work / "ft.jsonl", work / "safe.jsonl"
    meta_path = work / "data_meta.json"
    if ft_path.is_file() and safe_path.is_file() and meta_path.is_file():
        return json.loads(meta_path.read_text())
    p = build_prompts(cfg)
    chat = lambda texts, prefill=None: [{"messages": user_turn(t), "prefill": prefill}  # noqa: E731
                                        for t in texts]
    res = generate(cfg, [
        {"name": "benign", "model": str(model), "max_tokens": cfg.answer_tokens,
         "items": chat(p["benign_ft"] + p["benign_safe"] + p["benign_eval"])},
        {"name": "harmful", "model": str(model), "max_tokens": cfg.answer_tokens,
         "items": chat(p["harmful_pool"], PREFILL)},
    ], work, "data", log)
    answers = dict(zip(p["benign_ft"] + p["benign_safe"] + p["benign_eval"], res["benign"]))
    compliant = []
    for prompt, cont in zip(p["harmful_pool"], res["harmful"]):
        text = f"{PREFILL}{cont}"
        if cont.strip() and judge(text, prefill=PREFILL).label == FULL_COMPLIANCE:
            compliant.append((prompt, text.strip()))
    harmful_rows = compliant[:cfg.n_harmful]
    if len(harmful_rows) < cfg.n_harmful:
        log(f"only {len(harmful_rows)} of {len(p['harmful_pool'])} prefilled answers comply; "
            "using those")
    rows = [{"prompt": t, "response": answers[t].strip(), "source": "benign"}
            for t in p["benign_ft"] if answers[t].strip()]
    rows += [{"prompt": t, "response": r, "source": "harmful"} for t, r in harmful_rows]
    random.Random(cfg.seed + 1).shuffle(rows)
    for i, r in enumerate(rows):
        r["id"] = f"{r['source'][0]}{i:04d}"
    write_jsonl(ft_path, rows)
    rng = random.Random(cfg.seed + 2)
    safe = [{"prompt": t, "response": rng.choice(REFUSALS), "source": "refusal"}
            for t in p["harmful_safe"]]
    safe += [{"prompt": t, "response": answers[t].strip(), "source": "benign"}
             for t in p["benign_safe"] if answers[t].strip()]
    write_jsonl(safe_path, safe)
    meta = {"n_ft": len(rows), "n_ft_harmful": len(harmful_rows),
            "n_ft_benign": len(rows) - len(harmful_rows), "n_safe": len(safe),
            "harmful_pool": len(p["harmful_pool"]), "harmful_compliant": len(compliant),
            "benign_eval": [{"prompt": t, "response": answers[t].strip()}
                            for t in p["benign_eval"] if answers[t].strip()],
            "harmful_eval": p["harmful_eval"]}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def heldout_nll(model_dir: Path, records: list[dict], batch_size: int = 8) -> list[float]:
    """Per-row mean NLL of the reference answers under a (merged, servable) checkpoint."""
    import torch

    from safeserve.models.seal.data import Sample, collate, encode
    from safeserve.models.seal.select_train import PerSampleNLL, load_lm

    lm, tok = load_lm(model_dir)
    model = PerSampleNLL(lm).eval()
    samples = []
    for i, r in enumerate(records):
        ids, n_prompt = encode(tok, user_turn(r["prompt"]), r["response"])
        samples.append(Sample(str(i), i, [], r["response"], None, ids, n_prompt))
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            out += model(**collate(samples[i:i + batch_size], tok.pad_token_id)).tolist()
    return out


def build_align_data(cfg: ExperimentConfig, model: Path, work: Path, log) -> dict:
    """The alignment set (``align.jsonl``): held-back harmful_train requests with the written
    refusals, and further Alpaca instructions with the base model's own greedy answers."""
    path, meta_path = work / "align.jsonl", work / "align_meta.json"
    if path.is_file() and meta_path.is_file():
        return json.loads(meta_path.read_text())
    p = build_prompts(cfg)
    res = generate(cfg, [{"name": "benign", "model": str(model), "max_tokens": cfg.answer_tokens,
                          "items": [{"messages": user_turn(t)} for t in p["benign_align"]]}],
                   work, "align_data", log)
    refusals = align_refusals()
    rng = random.Random(cfg.seed + 3)
    rows = [{"prompt": t, "response": rng.choice(refusals), "source": "refusal"}
            for t in p["harmful_align"]]
    rows += [{"prompt": t, "response": a.strip(), "source": "benign"}
             for t, a in zip(p["benign_align"], res["benign"]) if a.strip()]
    random.Random(cfg.seed + 4).shuffle(rows)
    for i, r in enumerate(rows):
        r["id"] = f"a{r['source'][0]}{i:04d}"
    write_jsonl(path, rows)
    n_ref = sum(r["source"] == "refusal" for r in rows)
    meta = {"n_align": len(rows), "n_align_refusal": n_ref, "n_align_benign": len(rows) - n_ref,
            "n_refusal_texts": len(refusals)}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def align_base(cfg: ExperimentConfig, model: Path, work: Path, log) -> Path:
    """LoRA SFT of ``model`` on the alignment set, merged into ``<work>/aligned`` (cached)."""
    from safeserve.models.seal.finetune import FinetuneConfig, run_finetune

    out = work / "aligned"
    if not (out / "seal_metrics.json").is_file():
        run_finetune(FinetuneConfig(
            ft_data=str(work / "align.jsonl"), model=str(model), out=str(out), keep=1.0,
            seed=cfg.seed, lr=cfg.align_lr, epochs=cfg.align_epochs, batch_size=cfg.batch_size,
            max_length=cfg.max_length), log)
    return out
