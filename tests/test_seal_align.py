"""SEAL experiment's alignment stage and generation helpers, on a tiny random model.

Nothing reads ../shared: a miniature data root (the same file layout) is written per test.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import tiny_llama_with_default_tokenizer
from safeserve.models.seal.experiment import run_experiment
from safeserve.models.seal.experiment_config import ExperimentConfig
from safeserve.models.seal.experiment_data import REFUSALS, _norm, align_refusals, build_prompts


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_llama_with_default_tokenizer(tmp_path_factory.mktemp("tiny_align") / "model")


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "data"
    splits = root / "refusal_direction_splits"
    splits.mkdir(parents=True)

    def dump(name, texts):
        (splits / name).write_text(json.dumps([{"instruction": t, "category": None}
                                               for t in texts]))

    dump("harmless_train.json", [f"Name a colour number {i}." for i in range(40)])
    dump("harmless_val.json", [f"Name a fruit number {i}." for i in range(10)])
    # Two harmful_train rows are also HarmBench test behaviours: they must leave the eval.
    harmful = [f"Explain how to steal car number {i}." for i in range(30)]
    dump("harmful_train.json", harmful)
    (root / "harmbench").mkdir()
    with open(root / "harmbench" / "harmbench_behaviors_text_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Behavior", "FunctionalCategory", "SemanticCategory", "Tags",
                    "ContextString", "BehaviorID"])
        for i in range(8):
            w.writerow([f"Write a guide to hacking bank number {i}", "standard", "cyber", "",
                        "", f"hb{i}"])
        w.writerow([harmful[3], "standard", "cyber", "", "", "dup3"])
        w.writerow([harmful[20], "standard", "cyber", "", "", "dup20"])
    return root


def _cfg(data_root, out, **kw) -> ExperimentConfig:
    base = dict(data_root=str(data_root), out=str(out), n_benign=6, n_harmful=3,
                n_safe_refusals=4, n_safe_benign=2, n_eval_harmful=6, n_eval_benign=4,
                n_align_harmful=8, n_align_benign=5, answer_tokens=6, batch_size=4,
                max_length=128, align_epochs=1.0, threads=1)
    base.update(kw)
    return ExperimentConfig(**base)


def test_alignment_rows_are_disjoint_from_everything_else(data_root, tmp_path):
    p = build_prompts(_cfg(data_root, tmp_path / "x"))
    assert len(p["harmful_align"]) == 8 and len(p["benign_align"]) == 5
    others = {_norm(t) for k, v in p.items() if not k.endswith("_align") for t in v}
    for k in ("harmful_align", "benign_align"):
        assert not {_norm(t) for t in p[k]} & others, k
    # The eval never holds a harmful_train request.
    assert not {_norm(t) for t in p["harmful_eval"]} & {
        _norm(t) for k in ("harmful_pool", "harmful_safe", "harmful_align") for t in p[k]}
    # Adding the alignment rows does not move the earlier splits.
    q = build_prompts(_cfg(data_root, tmp_path / "x", n_align_harmful=0, n_align_benign=0))
    for k in ("benign_ft", "benign_safe", "harmful_pool", "harmful_safe", "benign_eval",
              "harmful_eval"):
        assert p[k] == q[k], k
    assert q["harmful_align"] == [] and q["benign_align"] == []


def test_alignment_uses_only_refusals_the_judge_recognises():
    from safeserve.models.evaluation.judge import FULL_REFUSAL, judge

    used = align_refusals()
    assert used and set(used) <= set(REFUSALS)
    assert all(judge(r).label == FULL_REFUSAL for r in used)


def test_hf_chat_batches_match_one_at_a_time(tiny):
    from safeserve.models.seal.generate import hf_chat

    items = [{"messages": [{"role": "user", "content": t}]}
             for t in ("Hi", "Tell me a long story about a dragon and a knight", "2+2?")]
    items.append({"messages": [{"role": "user", "content": "Go"}], "prefill": "Sure, here is"})
    batched = hf_chat(tiny, items, max_tokens=5, batch_size=4)
    single = [hf_chat(tiny, [it], max_tokens=5)[0] for it in items]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


def test_stop_after_align_builds_the_aligned_base(tiny, data_root, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exp"
    cfg = _cfg(data_root, out, model=str(tiny), stop_after="align")
    res = run_experiment(cfg, log=lambda *_: None)
    assert res["stopped_after"] == "align"
    rows = [json.loads(x) for x in (out / "align.jsonl").read_text().splitlines()]
    assert res["align"]["n_align_refusal"] == 8 == sum(r["source"] == "refusal" for r in rows)
    assert all(r["response"] in align_refusals() for r in rows if r["source"] == "refusal")
    ft = {json.loads(x)["prompt"] for x in (out / "ft.jsonl").read_text().splitlines()}
    safe = {json.loads(x)["prompt"] for x in (out / "safe.jsonl").read_text().splitlines()}
    assert not {r["prompt"] for r in rows} & (ft | safe)
    m = json.loads((out / "aligned" / "seal_metrics.json").read_text())
    assert m["n_kept"] == len(rows) and m["selection"] == "all"
    assert AutoModelForCausalLM.from_pretrained(str(out / "aligned")).config.hidden_size == 64
    assert not (out / "selector").exists()
    # A rerun finds every step cached.
    t = json.loads((out / "timings.json").read_text())
    assert {"data", "align_data", "align"} <= set(t)
    logs: list[str] = []
    assert run_experiment(cfg, log=logs.append)["stopped_after"] == "align"
    assert not any("settings changed" in x for x in logs)
    assert all(f"[{s}]" not in x or "(cached)" in x for x in logs for s in ("data", "align"))
    # Other alignment settings redo the alignment steps only (not the fine-tuning data).
    aligned_at = (out / "aligned" / "seal_metrics.json").stat().st_mtime_ns
    ft_at = (out / "ft.jsonl").stat().st_mtime_ns
    logs.clear()
    res = run_experiment(_cfg(data_root, out, model=str(tiny), stop_after="align",
                              n_align_harmful=5), log=logs.append)
    assert res["align"]["n_align_refusal"] == 5
    assert any("[align_data] settings changed (n_align_harmful: 8 -> 5)" in x for x in logs), logs
    assert (out / "aligned" / "seal_metrics.json").stat().st_mtime_ns != aligned_at
    assert (out / "ft.jsonl").stat().st_mtime_ns == ft_at
    assert json.loads((out / "aligned" / "seal_metrics.json").read_text())["n_kept"] == \
        res["align"]["n_align"]


def test_step_configs_reach_every_later_step(tmp_path):
    from safeserve.models.seal.experiment_steps import step_configs

    m = tmp_path / "model"
    base = step_configs(_cfg(tmp_path, tmp_path / "o"), m)

    def changed(**kw) -> set[str]:
        new = step_configs(_cfg(tmp_path, tmp_path / "o", **kw), m)
        assert set(new) == set(base)
        return {k for k in base if new[k] != base[k]}

    evals = {k for k in base if k.startswith("eval:")}
    assert changed(keep=0.5) == {"sft_random", "sft_seal", "eval:random", "eval:seal"}
    assert changed(selector_epochs=5) == {"sft_seal", "eval:seal"}
    assert changed(selector_lr=1.0) == {"selector", "sft_seal", "eval:seal"}
    assert changed(seed=1) == set(base)
    assert changed(n_benign=7) == set(base)
    assert changed(align_lr=1.0) == set(base) - {"data", "align_data", "eval:base"}
    assert changed(sft_lr=1.0) == {"sft_all", "sft_random", "sft_seal"} | (evals - {"eval:base", "eval:aligned"})
    assert changed(threads=2, stop_after="data") == set()
    # transformers' and vLLM's greedy answers can differ: every generated step is redone
    assert changed(gen_backend="vllm") == set(base)


def test_step_record_redoes_changed_steps_and_refuses_unrecorded_outputs(tmp_path):
    from safeserve.models.seal.data import SealInputError
    from safeserve.models.seal.experiment_steps import STEPS_FILE, StepRecord

    logs, cleared = [], []
    rec = StepRecord(tmp_path, logs.append)
    rec.refuse_unrecorded()  # empty folder
    a, b = {"keep": 0.8, "data": {"seed": 0}}, {"keep": 0.5, "data": {"seed": 0}}
    assert not rec.reuse("sft_seal", a, lambda: cleared.append(1), complete=False)
    rec.finish("sft_seal")
    again = StepRecord(tmp_path, logs.append)  # read back from step_configs.json
    assert again.reuse("sft_seal", a, lambda: cleared.append(2), complete=True)
    assert not again.reuse("sft_seal", a, lambda: cleared.append(3), complete=False)  # outputs gone
    assert cleared == [1] and not logs
    assert not again.reuse("sft_seal", b, lambda: cleared.append(4), complete=True)
    assert cleared == [1, 4] and logs == ["[sft_seal] settings changed (keep: 0.8 -> 0.5): redoing it"]
    assert json.loads((tmp_path / STEPS_FILE).read_text())["sft_seal"] == {"config": b, "done": False}
    # Outputs of a run that recorded nothing: their settings are unknown.
    old = tmp_path / "old"
    (old / "selector").mkdir(parents=True)
    with pytest.raises(SealInputError, match="selector"):
        StepRecord(old, logs.append).refuse_unrecorded()


def test_stop_after_rejects_unknown_steps(tmp_path):
    with pytest.raises(ValueError):
        run_experiment(_cfg(tmp_path, tmp_path / "o", stop_after="eval", model=str(tmp_path)),
                       log=lambda *_: None)


def test_experiment_cli_has_the_alignment_options():
    import typer
    from typer.testing import CliRunner

    from safeserve.models.seal.cli import register

    app, train = typer.Typer(), typer.Typer()
    app.add_typer(train, name="train")
    register(train)
    result = CliRunner().invoke(app, ["train", "seal-experiment", "--help"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for opt in ("--no-align", "--align-epochs", "--align-lr", "--gen-backend", "--stop-after",
                "--selector-optim"):
        assert opt in result.output, opt
