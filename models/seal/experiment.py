"""Small-scale CPU reproduction of SEAL's comparison (``safeserve train seal-experiment``).

Data (all drawn with one seed from the public sets under ``--data-root``):

* fine-tuning set: Alpaca instructions (refusal_direction_splits/harmless_train) answered by
  the base model (vLLM, greedy), plus harmful requests (harmful_train) answered compliantly by
  the base model after a "Sure, here is" prefill; only answers the refusal judge labels
  full_compliance are kept, so the harmful part really is harmful-compliant.
* safe set: other harmful_train requests paired with refusals written below, plus a few
  benign instruction/answer pairs (so "be safe" does not collapse into "refuse everything").
* held out: HarmBench test behaviours (standard) for attack success, harmless_val
  instructions with base-model answers for utility.
* alignment set (``--align``, on by default): further harmful_train requests (disjoint from
  the fine-tuning and safe rows; HarmBench eval prompts are never used) paired with the
  refusals written below, plus further Alpaca instructions with the base model's own greedy
  answers (so the aligned model does not learn to refuse everything).

Alignment stage: SEAL's setting is a safety-aligned model whose safety fine-tuning erodes.
SmolLM2-135M-Instruct is not aligned (it answers nearly every harmful request), so the
experiment first makes an "aligned base": LoRA SFT of the base model on the alignment set
(``finetune.run_finetune``, keep everything), merged into ``<out>/aligned/``. The selector and
all three fine-tuning runs start from it; the report shows it beside the raw base.
``--no-align`` skips the stage (everything starts from the raw base, as before). Only the
refusals the project's judge recognises as refusals are used for alignment (one written
refusal, "That's not something I can help with...", is missed by the judge's phrase list and
would count as compliance in the ASR); the safe set keeps all of them.

Runs: (a) all data, (b) a random ``keep`` fraction, (c) the SEAL top ``keep`` fraction, each
fine-tuned with LoRA SFT (``finetune.run_finetune``) from the aligned base. Attack success rate
(ASR) = fraction of held-out harmful prompts whose greedy answer the project's refusal judge
labels full_compliance; the same judge on the held-out benign instructions gives the
over-refusal rate. Utility = mean per-token NLL of the base model's answers to held-out benign
instructions: the fine-tuning task here is "answer instructions the way the base model's
answer data does", so the NLL of held-out answers of that distribution measures how well each
run learned the task (lower is better), with no second model needed as a judge.

Generation (``--gen-backend``): ``hf`` (default) decodes greedily with transformers on each
run's merged checkpoint directory (``generate.hf_chat``); ``vllm`` runs offline vLLM jobs in a
child process, one engine per base model with each run's LoRA adapter (mathematically the
merged checkpoint). Both are greedy on the same weights; on 32 HarmBench prompts the two gave
identical answers, and on this shared 2-core CPU the vLLM CPU engine spent up to 20 minutes on
its first LoRA batch, so ``hf`` is the default. The NLL is computed with transformers on the
merged checkpoint directories themselves.

Steps are cached in the output directory (rerun to resume; generations are cached per task in
``<step>_result.json``). ``step_configs.json`` records the settings each cached step was made
with: a rerun with other settings (``--keep``, ``--seed``, ``--n-benign``, ...) redoes the
steps they change and every step after them, and a selector with fewer epochs than asked is
resumed. A folder with outputs but no ``step_configs.json`` (an older run) is refused.
``--stop-after data|align|selector|sft`` ends a run after that step
(e.g. to check the aligned base before spending the selector's time). ``report.md``,
``results.json`` and ``comparison.png`` are the results.

The experiment's modules, each importing only the ones before it: ``experiment_config``
(``ExperimentConfig``, ``STAGES``, ``RUNS``), ``experiment_data`` (prompts, generation, the
data sets, the aligned base), ``experiment_steps`` (step settings, the step record, the stage
runner), ``experiment_report`` (``results.json``, ``comparison.png``, ``report.md``) and this
one (the evaluation and one function per stage).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from safeserve.models.seal.experiment_config import STAGES, ExperimentConfig
from safeserve.models.seal.experiment_data import (align_base, build_align_data, build_data,
                                                   generate, heldout_nll, user_turn)
from safeserve.models.seal.experiment_report import plot, render_report, summarize
from safeserve.models.seal.experiment_steps import (StepRecord, StepRunner, clear_eval,
                                                    remove_paths, step_configs, step_outputs)


def evaluate(cfg: ExperimentConfig, runs: dict[str, dict], meta: dict, work: Path, log) -> dict:
    """ASR from greedy generations, utility NLL with transformers on the merged checkpoints
    (vLLM 0.32's CPU LoRA path fails on prompt log-probabilities, so they are not taken from
    the engine). ``runs``: name -> {"model": merged dir, "engine": base dir for vLLM,
    "lora": adapter dir or None}."""
    from collections import Counter

    from safeserve.models.evaluation.judge import FULL_COMPLIANCE, judge

    tasks = [{"name": f"{name}:asr", "max_tokens": cfg.answer_tokens, **r,
              "items": [{"messages": user_turn(t)} for t in meta["harmful_eval"]]}
             for name, r in runs.items()]
    # Over-refusal check: the same judge on the held-out benign instructions.
    tasks += [{"name": f"{name}:benign", "max_tokens": cfg.answer_tokens, **r,
               "items": [{"messages": user_turn(b["prompt"])} for b in meta["benign_eval"]]}
              for name, r in runs.items()]
    res = generate(cfg, tasks, work, "eval", log)
    nll_file = work / "eval_nll.json"
    nlls = json.loads(nll_file.read_text()) if nll_file.is_file() else {}
    for name, r in runs.items():
        if name not in nlls:
            nlls[name] = heldout_nll(Path(r["model"]), meta["benign_eval"])
            nll_file.write_text(json.dumps(nlls))
    out = {}
    for name in runs:
        labels = Counter(judge(t).label for t in res[f"{name}:asr"])
        nll = nlls[name]
        n = sum(labels.values())
        b_labels = Counter(judge(t).label for t in res[f"{name}:benign"])
        nb = sum(b_labels.values())
        out[name] = {"asr": labels[FULL_COMPLIANCE] / max(1, n), "judge": dict(labels),
                     # None when no held-out benign answer survived (all empty, or none asked)
                     "n_eval_harmful": n, "utility_nll": sum(nll) / len(nll) if nll else None,
                     "n_eval_benign": len(nll), "benign_judge": dict(b_labels),
                     "benign_refusal": (nb - b_labels[FULL_COMPLIANCE]) / max(1, nb)}
    samples = {name: res[f"{name}:asr"][:5] for name in runs}
    (work / "eval_samples.json").write_text(json.dumps(
        {"prompts": meta["harmful_eval"][:5], "answers": samples}, indent=1))
    return out


def run_experiment(cfg: ExperimentConfig, log=print) -> dict:
    from safeserve.models.model_store import ensure_default_model

    import torch

    if cfg.threads > 0:
        # On a small shared CPU, one intra-op thread beats two: OpenMP barriers stall when the
        # other core is busy (measured here: 32 ms vs 0.08 ms for a 400x64 @ 64x64 matmul).
        torch.set_num_threads(cfg.threads)
    if cfg.stop_after is not None and cfg.stop_after not in STAGES[:-1]:
        raise ValueError(f"stop_after must be one of {STAGES[:-1]}, not {cfg.stop_after!r}")
    t_start = time.perf_counter()
    work = Path(cfg.out)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(cfg.model) if cfg.model else ensure_default_model()
    record = StepRecord(work, log)
    record.refuse_unrecorded()
    steps = StepRunner(record, step_configs(cfg, model), step_outputs(work),
                       work / "timings.json", log)

    meta = steps.step("data", lambda: build_data(cfg, model, work, log),
                      lambda: (work / "data_meta.json").is_file())
    if cfg.stop_after == "data":
        return {"stopped_after": "data", "data": meta}
    align_meta, base = _align_stage(cfg, model, work, steps, log)
    if cfg.stop_after == "align":
        return {"stopped_after": "align", "data": meta, "align": align_meta}
    _selector_stage(cfg, base, work, steps, log)
    if cfg.stop_after == "selector":
        return {"stopped_after": "selector"}
    ckpts = _sft_stage(cfg, base, work, steps, log)
    if cfg.stop_after == "sft":
        return {"stopped_after": "sft"}
    evals = _eval_stage(cfg, model, base, ckpts, meta, work, steps, log)

    summary = summarize(cfg, meta, align_meta, base, ckpts, evals, work / "selector",
                        steps.timings, t_start)
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    plot(summary["results"], work / "comparison.png")
    (work / "report.md").write_text(render_report(summary))
    log(f"report: {work / 'report.md'}")
    return summary


def _align_stage(cfg: ExperimentConfig, model: Path, work: Path, steps: StepRunner,
                 log) -> tuple[dict | None, Path]:
    """The alignment steps (``--align``): the alignment set's meta and the model the selector
    and the fine-tuning runs start from (the aligned base, or ``model`` without alignment)."""
    align_meta = None
    base = model  # the model the selector and the fine-tuning runs start from
    if cfg.align:
        align_meta = steps.step("align_data", lambda: build_align_data(cfg, model, work, log),
                                lambda: (work / "align_meta.json").is_file())
        base = steps.step("align", lambda: align_base(cfg, model, work, log),
                          lambda: (work / "aligned" / "seal_metrics.json").is_file())
    return align_meta, base


def _selector_stage(cfg: ExperimentConfig, base: Path, work: Path, steps: StepRunner,
                    log) -> None:
    """The selector step, from ``base``, in ``<work>/selector``."""
    from safeserve.models.seal.select_train import SelectConfig, run_select

    ft, safe = work / "ft.jsonl", work / "safe.jsonl"
    sel_dir = work / "selector"

    def select():
        if selector_epochs_done() == cfg.selector_epochs:
            return  # step() already cleared a selector made with other settings
        sel_json = sel_dir / "selector.json"
        resume = str(sel_json) if sel_json.is_file() else None
        run_select(SelectConfig(
            ft_data=str(ft), safe_data=str(safe), model=str(base), out=str(sel_dir),
            algorithm=cfg.algorithm, epochs=cfg.selector_epochs, gamma_step=cfg.gamma_step,
            lr=cfg.select_lr, selector_lr=cfg.selector_lr, selector_optim=cfg.selector_optim,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length, seed=cfg.seed, resume=resume, keep_preview=cfg.keep), log)

    def selector_epochs_done() -> int:
        sel_json = sel_dir / "selector.json"
        return json.loads(sel_json.read_text())["state"].get("epochs_done", 0) \
            if sel_json.is_file() else 0

    if selector_epochs_done() > cfg.selector_epochs:
        # More epochs than asked cannot be undone; fewer resume (same ranking as a straight run).
        log(f"[selector] {selector_epochs_done()} epochs done, {cfg.selector_epochs} asked: redoing it")
        remove_paths(steps.outputs["selector"])
    steps.step("selector", select, lambda: selector_epochs_done() == cfg.selector_epochs)


def _sft_stage(cfg: ExperimentConfig, base: Path, work: Path, steps: StepRunner,
               log) -> dict[str, Path]:
    """The three fine-tuning steps from ``base`` (all rows, a random ``keep`` fraction, SEAL's
    top ``keep`` fraction); returns run name -> checkpoint folder ``<work>/ft_<name>``."""
    from safeserve.models.seal.finetune import FinetuneConfig, run_finetune

    ft, sel_dir = work / "ft.jsonl", work / "selector"
    runs = {"all": dict(keep=1.0), "random": dict(keep=cfg.keep, random_baseline=True),
            "seal": dict(keep=cfg.keep, selector=str(sel_dir / "selector.json"))}
    ckpts: dict[str, Path] = {}
    for name, kw in runs.items():
        out = ckpts[name] = work / f"ft_{name}"
        done = lambda: (out / "seal_metrics.json").is_file()  # noqa: E731 (called in this pass)
        steps.step(f"sft_{name}", lambda: None if done() else run_finetune(FinetuneConfig(
            ft_data=str(ft), model=str(base), out=str(out), seed=cfg.seed, lr=cfg.sft_lr,
            epochs=cfg.sft_epochs, batch_size=cfg.batch_size, max_length=cfg.max_length, **kw),
            log), done)
    return ckpts


def _eval_stage(cfg: ExperimentConfig, model: Path, base: Path, ckpts: dict[str, Path],
                meta: dict, work: Path, steps: StepRunner, log) -> dict:
    """The evaluation stage: ``evaluate`` on the raw base, the aligned base (``--align``) and
    the fine-tuned runs; one recorded step per run (``eval:<name>``), one stage time."""
    eval_runs = {"base": {"model": str(model), "engine": str(model), "lora": None}}
    if cfg.align:
        eval_runs["aligned"] = {"model": str(base), "engine": str(base), "lora": None}
    for name, ckpt in ckpts.items():
        eval_runs[name] = {"model": str(ckpt), "engine": str(base),
                           "lora": str((ckpt / "adapter").resolve())}
    eval_file, nll_file = work / "eval_result.json", work / "eval_nll.json"

    def eval_complete(name: str) -> bool:
        return eval_file.is_file() and nll_file.is_file() and all(
            f"{name}:{k}" in json.loads(eval_file.read_text()) for k in ("asr", "benign")) \
            and name in json.loads(nll_file.read_text())

    eval_cached = all([steps.record.reuse(f"eval:{n}", steps.configs[f"eval:{n}"],
                                          lambda n=n: clear_eval(work, n), eval_complete(n))
                       for n in eval_runs])
    evals = steps.stage("eval", lambda: evaluate(cfg, eval_runs, meta, work, log),
                        cached=eval_cached)
    for n in eval_runs:
        steps.record.finish(f"eval:{n}")
    return evals
