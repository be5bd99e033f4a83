"""The SEAL experiment's step bookkeeping: the settings each cached step depends on
(``step_configs``), what each step writes (``step_outputs``, ``clear_eval``, ``remove_paths``),
the record of which settings each step was made with and whether it finished (``StepRecord``,
``<out>/step_configs.json``), and ``StepRunner``, which reuses or redoes a step accordingly and
keeps the stage times (``<out>/timings.json``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from safeserve.models.seal.data import SealInputError
from safeserve.models.seal.experiment_config import RUNS, ExperimentConfig

STEPS_FILE = "step_configs.json"


def step_configs(cfg: ExperimentConfig, model: Path) -> dict[str, dict]:
    """The settings each cached step's output depends on. A step's config holds the configs of
    the steps it reads, so a change anywhere reaches every later step. The generation backend
    counts too: greedy decoding in transformers and in vLLM can part ways in float32. Left out:
    threads and stop_after, which change no result, and the selector's epoch count, which
    ``run_experiment`` checks itself (fewer done: resume)."""
    model = Path(model).resolve()  # the same relative path run from elsewhere is another model
    data = {"data_root": str(Path(cfg.data_root).resolve()), "model": str(model),
            "gen_backend": cfg.gen_backend, "seed": cfg.seed, "answer_tokens": cfg.answer_tokens,
            **{k: getattr(cfg, k) for k in ("n_benign", "n_harmful", "n_safe_refusals",
                                            "n_safe_benign", "n_eval_harmful", "n_eval_benign")}}
    steps: dict[str, dict] = {"data": data}
    base: dict = {"model": str(model)}
    if cfg.align:
        steps["align_data"] = {"data": data, "n_align_harmful": cfg.n_align_harmful,
                               "n_align_benign": cfg.n_align_benign}
        steps["align"] = {"align_data": steps["align_data"], "align_lr": cfg.align_lr,
                          "align_epochs": cfg.align_epochs, "batch_size": cfg.batch_size,
                          "max_length": cfg.max_length}
        base = steps["align"]
    train = {"data": data, "base": base, "batch_size": cfg.batch_size,
             "max_length": cfg.max_length}
    steps["selector"] = {**train, "algorithm": cfg.algorithm, "gamma_step": cfg.gamma_step,
                         "select_lr": cfg.select_lr, "selector_lr": cfg.selector_lr,
                         "selector_optim": cfg.selector_optim}
    sft = {**train, "sft_lr": cfg.sft_lr, "sft_epochs": cfg.sft_epochs}
    steps["sft_all"] = {**sft, "keep": 1.0}
    steps["sft_random"] = {**sft, "keep": cfg.keep, "random": True}
    steps["sft_seal"] = {**sft, "keep": cfg.keep,
                         "selector": {**steps["selector"], "epochs": cfg.selector_epochs}}
    steps["eval:base"] = {"data": data}
    if cfg.align:
        steps["eval:aligned"] = {"data": data, "run": base}
    for name in RUNS:
        steps[f"eval:{name}"] = {"data": data, "run": steps[f"sft_{name}"]}
    return steps


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Leaf settings that differ, as 'path: old -> new'."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a} -> {b}")
    return out


def remove_paths(paths) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def step_outputs(work: Path) -> dict[str, list[Path]]:
    """What each step writes (vLLM job files included), for clearing a step made with other
    settings. Evaluation entries live in shared files: see ``clear_eval``."""
    out = {"data": [work / n for n in ("ft.jsonl", "safe.jsonl", "data_meta.json",
                                       "data_result.json")] + sorted(work.glob("data[0-9]*_*")),
           "align_data": [work / n for n in ("align.jsonl", "align_meta.json",
                                             "align_data_result.json")]
           + sorted(work.glob("align_data[0-9]*_*")),
           "align": [work / "aligned"], "selector": [work / "selector"]}
    out.update({f"sft_{name}": [work / f"ft_{name}"] for name in RUNS})
    return out


def clear_eval(work: Path, name: str) -> None:
    for path, keys in ((work / "eval_result.json", (f"{name}:asr", f"{name}:benign")),
                       (work / "eval_nll.json", (name,))):
        if path.is_file():
            doc = json.loads(path.read_text())
            path.write_text(json.dumps({k: v for k, v in doc.items() if k not in keys}))


class StepRecord:
    """``<out>/step_configs.json``: per step, the config it was (or is being) made with and
    whether it finished."""

    def __init__(self, work: Path, log):
        self.work, self.path, self.log = work, work / STEPS_FILE, log
        self.steps: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def refuse_unrecorded(self) -> None:
        """Outputs without a record come from a run before the record existed: their settings
        are unknown, so they can neither be trusted nor silently deleted."""
        if self.path.is_file():
            return
        found = [n for n in ("data_meta.json", "align_meta.json", "aligned", "selector",
                             *(f"ft_{r}" for r in RUNS), "eval_result.json")
                 if (self.work / n).exists()]
        if found:
            raise SealInputError(f"{self.work} holds outputs of an older run ({', '.join(found)}) "
                                 f"with no {STEPS_FILE}, so their settings are unknown: use "
                                 "another --out, or delete them to redo them")

    def reuse(self, name: str, config: dict, clear, complete: bool) -> bool:
        """True when step ``name`` finished with ``config`` and its outputs are there
        (``complete``). Otherwise ``clear()``s what another config made, records ``config`` as
        begun, and returns False; outputs begun with the same config stay (generation caches
        resume)."""
        rec = self.steps.get(name)
        if rec is not None and rec["config"] == config:
            return rec["done"] and complete
        if rec is not None:
            self.log(f"[{name}] settings changed ({'; '.join(_config_diff(rec['config'], config))}):"
                     " redoing it")
        clear()
        self.steps[name] = {"config": config, "done": False}
        self._save()
        return False

    def finish(self, name: str) -> None:
        self.steps[name]["done"] = True
        self._save()

    def _save(self) -> None:
        self.path.write_text(json.dumps(self.steps, indent=1))


class StepRunner:
    """Runs the experiment's steps on ``record``: a step reuses the outputs made with its
    settings (``configs``) and clears (``outputs``) what other settings made. Stage times persist
    across invocations in ``timing_file`` (a rerun resumes from the cached stages)."""

    def __init__(self, record: StepRecord, configs: dict[str, dict],
                 outputs: dict[str, list[Path]], timing_file: Path, log):
        self.record, self.configs, self.outputs = record, configs, outputs
        self.timing_file, self.log = timing_file, log
        self.timings: dict[str, float] = (json.loads(timing_file.read_text())
                                          if timing_file.is_file() else {})

    def stage(self, name, fn, cached: bool = False):
        t0 = time.perf_counter()
        result = fn()
        if not cached or name not in self.timings:
            self.timings[name] = round(time.perf_counter() - t0, 1)
            self.timing_file.write_text(json.dumps(self.timings, indent=1))
        self.log(f"[{name}] {time.perf_counter() - t0:.0f} s{' (cached)' if cached else ''}")
        return result

    def step(self, name, fn, complete):
        """Step ``name``: clear what other settings made, then ``fn`` (which reuses outputs
        still there, all made with these settings); its stage timing has the same name."""
        cached = self.record.reuse(name, self.configs[name],
                                   lambda: remove_paths(self.outputs[name]), complete())
        result = self.stage(name, fn, cached=cached)
        self.record.finish(name)
        return result
