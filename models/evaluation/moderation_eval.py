"""``safeserve eval moderation``: a moderation endpoint (``POST /v1/moderations``, OpenAI's
shape) on labelled prompt sets: how many harmful prompts it flags, how many benign ones.

Any OpenAI-compatible moderation endpoint works: SafeServe's (the safety head's prompt verdict)
or another service, so the two can be put side by side on the same prompts. Per dataset: the
flag rate; over all: the detection rate on harmful prompts, the false-positive rate on benign
ones, and the AUROC of the highest category score (threshold-free: how well the scores alone
separate the two, whatever the endpoint's own thresholds).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from openai import AsyncOpenAI
from tqdm.auto import tqdm

from safeserve.models.evaluation.datasets import Sample
from safeserve.models.evaluation.safety_eval import wait_until_ready, write_rows

MAX_BATCH = 32  # inputs per request (SafeServe's limit)


def _auroc(scores: list[float], labels: list[bool]) -> float | None:
    """AUROC (ties counted half; None without both classes), by the one implementation the
    training metrics use."""
    import torch

    from safeserve.models.safety_calibration import auroc

    return auroc(torch.tensor(scores, dtype=torch.float64), torch.tensor(labels, dtype=torch.float64))


def _rate(k: int, n: int) -> dict:
    return {"flagged": k, "n": n, "rate": round(k / n, 4) if n else None}


async def _run(samples: list[Sample], client: AsyncOpenAI, model: str | None, batch_size: int,
               concurrency: int, extra_body: dict | None, progress: bool) -> list[dict]:
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(samples), desc="moderation", disable=not progress)

    async def one(batch: list[Sample]) -> list[dict]:
        try:
            async with gate:
                kwargs = {"input": [s.prompt for s in batch], "extra_body": extra_body}
                if model:
                    kwargs["model"] = model
                # The raw JSON, not the client's typed result: its fields follow OpenAI's
                # names ("self-harm"), so a server's own category names (SafeServe's
                # "self_harm") would be dropped from the scores and the AUROC.
                raw = await client.moderations.with_raw_response.create(**kwargs)
                results = raw.http_response.json().get("results")
            if not isinstance(results, list) or len(results) != len(batch):
                got = len(results) if isinstance(results, list) else "no"
                raise RuntimeError(f"{len(batch)} inputs sent, {got} results returned")
        except Exception as exc:  # retries are spent: record the batch as failed, go on
            bar.update(len(batch))
            return [{"id": s.id, "dataset": s.dataset, "harmful": s.harmful, "prompt": s.prompt,
                     "error": f"{type(exc).__name__}: {exc}"[:300]} for s in batch]
        rows = []
        for s, d in zip(batch, results):
            d = d if isinstance(d, dict) else {}
            scores = {k: float(v) for k, v in (d.get("category_scores") or {}).items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
            rows.append({"id": s.id, "dataset": s.dataset, "harmful": s.harmful,
                         "prompt": s.prompt, "flagged": bool(d.get("flagged")),
                         "categories": sorted(k for k, v in (d.get("categories") or {}).items() if v),
                         "max_score": max(scores.values(), default=0.0), "scores": scores})
        bar.update(len(batch))
        return rows

    try:
        return [row for rows in await asyncio.gather(*(one(b) for b in batches)) for row in rows]
    finally:
        bar.close()


def summarise(rows: list[dict]) -> dict:
    """Rates over the rows that got a result; failed ones are counted apart."""
    errors = sum(1 for r in rows if r.get("error"))
    rows = [r for r in rows if not r.get("error")]
    by_set: dict[tuple[str, bool], dict] = {}
    for r in rows:  # a .jsonl set may mix labels: one line per (set, label)
        d = by_set.setdefault((r["dataset"], r["harmful"]), {"k": 0, "n": 0})
        d["k"] += r["flagged"]
        d["n"] += 1
    harmful = [r for r in rows if r["harmful"]]
    benign = [r for r in rows if not r["harmful"]]
    return {
        "datasets": [{"dataset": name, "harmful": label, **_rate(d["k"], d["n"])}
                     for (name, label), d in by_set.items()],
        "errors": errors,
        "harmful_flagged": _rate(sum(r["flagged"] for r in harmful), len(harmful)),
        "benign_flagged": _rate(sum(r["flagged"] for r in benign), len(benign)),
        "auroc_max_score": _auroc([r["max_score"] for r in rows], [r["harmful"] for r in rows]),
    }


def summary_table(summary: dict) -> list[str]:
    pct = lambda d: "-" if d["rate"] is None else f"{100 * d['rate']:.1f}% ({d['flagged']} / {d['n']})"  # noqa: E731
    lines = ["| dataset | prompts | flagged |", "|---|---|---|"]
    for d in summary["datasets"]:
        lines.append(f"| {d['dataset']} | {'harmful' if d['harmful'] else 'benign'} | {pct(d)} |")
    lines.append(f"| **all harmful** | harmful | {pct(summary['harmful_flagged'])} |")
    lines.append(f"| **all benign** | benign | {pct(summary['benign_flagged'])} |")
    auroc = summary["auroc_max_score"]
    lines.append("")
    lines.append(f"AUROC of the highest category score, harmful vs benign: "
                 f"{'-' if auroc is None else f'{auroc:.3f}'}")
    if summary.get("errors"):
        lines.append(f"{summary['errors']} prompts got no result (see the error field in "
                     "results.jsonl); the rates leave them out")
    return lines


def evaluate_moderation(samples: list[Sample], *, base_url: str, out_dir: str | Path,
                        model: str | None = None, api_key: str = "EMPTY",
                        batch_size: int = MAX_BATCH, concurrency: int = 4,
                        safety_config: dict | str | None = None, timeout: float = 600.0,
                        progress: bool = True, meta: dict | None = None) -> dict:
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch size must be 1 to {MAX_BATCH}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"safety_config": safety_config} if safety_config is not None else None
    started = time.time()

    async def go() -> list[dict]:
        await wait_until_ready(base_url)  # a SafeServe server still loading answers 503
        async with AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout,
                               max_retries=3) as client:
            return await _run(samples, client, model, batch_size, concurrency, extra, progress)

    rows = asyncio.run(go())
    summary = {**summarise(rows), "meta": {**(meta or {}), "base_url": base_url, "model": model,
                                           "safety_config": safety_config},
               "duration_s": round(time.time() - started, 1)}
    write_rows(rows, out / "results.jsonl")
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (out / "summary.md").write_text("\n".join(summary_table(summary)) + "\n", encoding="utf-8")
    return summary
