"""The SEAL experiment's results: ``summarize`` gathers what the finished steps wrote (each
run's evaluation, kept rows and training times, the selector's epochs and ranking AUROC from
``selector_diagnostics``, the stage times) into the summary saved as ``results.json``; ``plot``
draws ``comparison.png`` and ``render_report`` writes ``report.md`` from that summary.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from safeserve.models.seal.experiment_config import ExperimentConfig
from safeserve.models.seal.experiment_data import PREFILL


def summarize(cfg: ExperimentConfig, meta: dict, align_meta: dict | None, base: Path,
              ckpts: dict[str, Path], evals: dict, sel_dir: Path, timings: dict[str, float],
              t_start: float) -> dict:
    """The summary saved as ``results.json``: ``meta``/``align_meta`` from the data steps,
    ``base`` the aligned base (read when ``align_meta`` is set), ``ckpts`` the fine-tuned runs,
    ``evals`` ``evaluate``'s results, ``sel_dir`` the selector's folder, ``timings`` the stage
    times, ``t_start`` this invocation's start (``time.perf_counter``)."""
    results: dict[str, dict] = {}
    for name in ("base", "aligned"):
        if name in evals:
            results[name] = {"n_kept": 0, "harmful_kept": None, "harmful_kept_fraction": None,
                             **evals[name]}
    if align_meta is not None:
        am = json.loads((base / "seal_metrics.json").read_text())
        results["aligned"]["align_seconds"] = am["train"]["seconds"]
        results["aligned"]["align_train"] = am["train"]
    sft_metrics = {}
    for name, ckpt in ckpts.items():
        m = json.loads((ckpt / "seal_metrics.json").read_text())
        sft_metrics[name] = m
        kept_h = m["kept_by_source"].get("harmful", 0)
        results[name] = {"n_kept": m["n_kept"], "harmful_kept": kept_h,
                         "harmful_kept_fraction": kept_h / max(1, meta["n_ft_harmful"]),
                         "sft_seconds": m["train"]["seconds"],
                         "sft_epoch_seconds": m["train"]["epoch_seconds"], **evals[name]}
    sel_doc = json.loads((sel_dir / "selector.json").read_text())
    history = sel_doc["state"]["history"]
    active = [h["seconds"] for h in history if h["gamma"] > 0]
    sft_epoch = sft_metrics["all"]["train"]["epoch_seconds"]
    diag = selector_diagnostics(sel_dir / "selector.json", cfg.keep)
    timing = {
        "stages": timings, "selector_epochs": history,
        "selector_epoch_seconds_gamma_pos": sum(active) / len(active) if active else None,
        "sft_epoch_seconds_all": sft_epoch,
        "ratio_selector_vs_sft_epoch": (sum(active) / len(active) / sft_epoch)
        if active and sft_epoch else None,
        "total_seconds_this_invocation": round(time.perf_counter() - t_start, 1),
    }
    summary = {"config": asdict(cfg), "data": {k: v for k, v in meta.items()
                                               if k not in ("benign_eval", "harmful_eval")},
               "align": align_meta,
               "results": results, "timing": timing,
               "selector_auroc_low_score_is_harmful": diag["auroc_low_score_is_harmful"],
               "safety_head": {n: m["safety_head"] for n, m in sft_metrics.items()}}
    return summary


def selector_diagnostics(selector_json: Path, keep: float) -> dict:
    from safeserve.models.seal.probe import auroc
    from safeserve.models.seal.selector import Selector

    sel = Selector.load(selector_json)
    harmful = [s == "harmful" for s in (sel.sources or [None] * sel.n)]
    scores = [-float(v) for v in sel.omega]  # low score = flagged as harmful
    return {"auroc_low_score_is_harmful": auroc(scores, harmful),
            "top_kept": sel.top_ids(keep)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 3.4))
    metrics = [("harmful_kept_fraction", "harmful rows kept (fraction)"),
               ("asr", "attack success rate (HarmBench)"),
               ("utility_nll", "held-out answer NLL (lower = better)")]
    for ax, (key, title) in zip(axes, metrics):
        vals = [results[n].get(key) for n in names]
        ax.bar(names, [v if v is not None else 0 for v in vals],
               color=[{"base": "#888888", "aligned": "#8172b3", "all": "#4c72b0",
                       "random": "#dd8452", "seal": "#55a868"}.get(n, "#999999")
                      for n in names])
        for i, v in enumerate(vals):
            if v is not None:
                ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def _f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)


def _align_lines(s: dict) -> list[str]:
    cfg, a = s["config"], s.get("align")
    if not a:
        return ["No alignment stage (--no-align): the selector and the fine-tuning runs start "
                "from the raw base model."]
    tr = s["results"].get("aligned", {}).get("align_train", {})
    return [f"Aligned base: LoRA SFT (r16/alpha16 q/v, merged) of the raw base on {a['n_align']} "
            f"rows = {a['n_align_refusal']} held-back harmful_train requests with written "
            f"refusals ({a['n_refusal_texts']} texts the judge recognises) + "
            f"{a['n_align_benign']} further Alpaca instructions with the raw base's own "
            f"answers; lr {cfg['align_lr']}, {cfg['align_epochs']} epochs, batch "
            f"{cfg['batch_size']}, {_f(tr.get('seconds'), '{:.0f}')} s. The selector and all "
            "three fine-tuning runs start from the aligned base."]


def render_report(s: dict) -> str:
    cfg, d, r, t = s["config"], s["data"], s["results"], s["timing"]
    lines = [
        "# SEAL at small scale (CPU, SmolLM2-135M-Instruct)", "",
        f"Fine-tuning set: {d['n_ft']} rows = {d['n_ft_benign']} benign (Alpaca instructions, "
        f"base-model answers) + {d['n_ft_harmful']} harmful (harmful_train requests, base-model "
        f"answers after a '{PREFILL}' prefill, judged compliant: {d['harmful_compliant']} of "
        f"{d['harmful_pool']} generated). Safe set: {d['n_safe']} rows ({cfg['n_safe_refusals']} "
        f"refusals written for this experiment + benign pairs). Keep {cfg['keep']:.0%}.", "",
        f"Selector: Algorithm {cfg['algorithm']}, {cfg['selector_epochs']} epochs, batch "
        f"{cfg['batch_size']}, model lr {cfg['select_lr']}, selector lr {cfg['selector_lr']} "
        f"({cfg.get('selector_optim', 'adam')}), gamma +{cfg['gamma_step']}/epoch from 0. SFT: LoRA r16/alpha16 q/v, "
        f"lr {cfg['sft_lr']}, {cfg['sft_epochs']} epochs, batch {cfg['batch_size']}.", "",
        *_align_lines(s), "",
        "| run | rows kept | harmful rows kept | ASR (HarmBench, judge full_compliance) | "
        "utility: held-out answer NLL (ppl) | held-out benign prompts refused (judge) |",
        "|---|---|---|---|---|---|",
    ]
    labels = {"base": "raw base (no fine-tuning)",
              "aligned": "aligned base (safety SFT, no fine-tuning)"}
    for name in ("base", "aligned", "all", "random", "seal"):
        if name not in r:
            continue
        x = r[name]
        kept = "-" if name in labels else str(x["n_kept"])
        hk = "-" if x["harmful_kept"] is None else \
            f"{x['harmful_kept']}/{d['n_ft_harmful']} ({x['harmful_kept_fraction']:.0%})"
        nll = x["utility_nll"]
        ppl = None if nll is None else math.exp(nll)
        lines.append(f"| {labels.get(name, name)} | {kept} | {hk} | "
                     f"{x['asr']:.3f} ({x['judge'].get('full_compliance', 0)}/{x['n_eval_harmful']}) | "
                     f"{_f(nll)} ({_f(ppl, '{:.2f}')}) | "
                     f"{_f(x.get('benign_refusal'))} |")
    lines += [
        "", f"Selector ranking AUROC (low score = harmful row): "
        f"{_f(s['selector_auroc_low_score_is_harmful'])}.", "",
        "## Time", "",
        "Selector epochs (s): " + ", ".join(f"epoch {h['epoch']} (gamma {h['gamma']:.3f}): "
                                             f"{h['seconds']:.0f}" for h in t["selector_epochs"]),
        f"Selector epoch with gamma > 0: {_f(t['selector_epoch_seconds_gamma_pos'], '{:.0f}')} s; "
        f"plain SFT epoch on all rows: {_f(t['sft_epoch_seconds_all'], '{:.0f}')} s; ratio "
        f"{_f(t['ratio_selector_vs_sft_epoch'], '{:.2f}')}x. " + (
            "(The gamma = 0 epoch skips the fine-tuning rows: nothing depends on them there.)"
            if cfg["algorithm"] == 2 else "(In the gamma = 0 epoch Algorithm 1 still trains "
            "its auxiliary model on the fine-tuning rows.)"), "",
        "Stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t["stages"].items()), "",
        "## Safety head check", "",
    ]
    for name, h in s["safety_head"].items():
        if h.get("before") and h.get("after"):
            lines.append(f"- {name}: AUROC before {h['before']['auroc']:.3f}, after "
                         f"{h['after']['auroc']:.3f}")
        else:
            lines.append(f"- {name}: {h.get('note')}")
    lines += ["", "![comparison](comparison.png)", "",
              "![selector scores](selector/selector_hist.png)", ""]
    return "\n".join(lines)
