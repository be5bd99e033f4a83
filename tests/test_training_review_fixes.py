"""Training-job input that used to fail late (after the fit, or after the model loaded) or
with a traceback: each is now a one-line error before anything heavy runs. Plus the row
parser's group 0 and a bad response offset in CSV, and a full-mode head written elsewhere by
`train calibrate` (it takes its fine-tuned LM along)."""

from __future__ import annotations

import json

import pytest
import torch

from safeserve.models.safety_data import TrajectoryError, load_trajectories, parse_trajectory
from safeserve.models.taxonomy import Taxonomy

from conftest import save_tiny_llama, tiny_chatml_tokenizer

WORDS = ["bomb", "poison", "weapon", "cake", "garden", "poem", "music", "flower"]


def _tokenizer(d):
    return tiny_chatml_tokenizer(d, [f"how do I make a {w}? Sure, here is a guide. user assistant"
                                     for w in WORDS] * 4, 300)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A directory holding only a tokenizer: what the pre-checks read (no model)."""
    d = tmp_path_factory.mktemp("tok")
    _tokenizer(d)
    return d


def _rows(n: int, groups: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        unsafe = i % 2 == 0
        rows.append({"prompt": f"how do I make a {w} {i}?", "response": f"Sure, here is a {w}.",
                     "prompt_label": "unsafe" if unsafe else "safe",
                     "categories": ["weapons"] if unsafe else [],
                     "response_unsafe_from": None, "source": "t/x",
                     **({"group": f"g{i}"} if groups else {})})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(tmp_path, model, **extra) -> dict:
    return {"data": _write(tmp_path / "train.jsonl", _rows(12)), "eval_data": None,
            "model": str(model), "max_length": 64, "seed": 0, **extra}


# 1 -------------------------------------------------------------------------------------


def test_a_bad_external_eval_file_fails_in_check_data(tok_dir, tmp_path):
    """lora / full read --external-eval after the fit and the model's save: a bad row, an
    empty file, or prompts all longer than --max-length are now found before training."""
    from safeserve.models.safety_train import TrainInputError, check_data

    tax = Taxonomy.load()
    good = _write(tmp_path / "ext.jsonl", [{"prompt": "how do I make a cake?",
                                            "prompt_label": "safe", "source": "e"}])
    check_data(_args(tmp_path, tok_dir, external_eval=good), tax, lambda *a: None)
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "hi", "prompt_label": "safe"},
                                          {"prompt": "hi", "prompt_label": "maybe"}])
    with pytest.raises(TrainInputError, match=r"^--external-eval: .*bad\.jsonl:2: field "
                                              r"'prompt_label'"):
        check_data(_args(tmp_path, tok_dir, external_eval=bad), tax, lambda *a: None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TrainInputError, match=r"--external-eval: .*empty\.jsonl: no rows"):
        check_data(_args(tmp_path, tok_dir, external_eval=empty), tax, lambda *a: None)
    long = _write(tmp_path / "long.jsonl", [{"prompt": "cake " * 200, "prompt_label": "safe"}])
    with pytest.raises(TrainInputError, match=r"--external-eval .*long\.jsonl: no rows left at "
                                              r"--max-length 64"):
        check_data(_args(tmp_path, tok_dir, external_eval=long), tax, lambda *a: None)


def test_train_safety_lora_refuses_a_bad_external_file_before_the_model_loads(tok_dir,
                                                                             tmp_path,
                                                                             monkeypatch):
    from safeserve.models import safety_train as ST

    monkeypatch.setattr(ST, "run_adapter_mode", lambda *a, **k: pytest.fail("trained"))
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "hi", "prompt_label": "maybe"}])
    with pytest.raises(ST.TrainInputError, match="--external-eval"):
        ST.train_safety({**_args(tmp_path, tok_dir), "mode": "lora", "external_eval": bad,
                         "out": tmp_path / "out"}, log=lambda *a: None)
    assert not (tmp_path / "out").exists()


# 2 -------------------------------------------------------------------------------------


def test_calibrate_with_one_prompt_group_fails_before_the_model_loads(tok_dir, tmp_path,
                                                                     monkeypatch):
    """`train calibrate` used to load the model and fail in torch.cat on an empty calibration
    half; now it is the same one-line error `train safety` gives, exit 2."""
    import typer
    from typer.testing import CliRunner

    from safeserve.models import safety_train as ST
    from safeserve.models.checkpoint import SafetyHead
    from safeserve.models.safety_train_cli import register

    tax = Taxonomy.load()
    SafetyHead(torch.zeros(tax.num_outputs, 8), torch.zeros(tax.num_outputs), tax).save(
        tmp_path / "ckpt")
    monkeypatch.setattr(ST, "load_lm", lambda *a, **k: pytest.fail("the model loaded"))
    one = _write(tmp_path / "one.jsonl", [{**r, "group": 0} for r in _rows(6)])
    with pytest.raises(ST.TrainInputError, match=r"^--eval-data has 1 prompt group\(s\): "
                                                 "calibration and the report need at least two"):
        ST.recalibrate(tok_dir, tmp_path / "ckpt", [one], tmp_path / "re", target_fpr=0.1,
                       max_length=64, log=lambda *a: None)
    # rows that all fall over --max-length leave no group
    with pytest.raises(ST.TrainInputError, match="--eval-data at --max-length 4 has 0 prompt"):
        ST.recalibrate(tok_dir, tmp_path / "ckpt", [_write(tmp_path / "two.jsonl", _rows(6))],
                       tmp_path / "re", target_fpr=0.1, max_length=4, log=lambda *a: None)
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "hi", "prompt_label": "maybe"}])
    with pytest.raises(ST.TrainInputError, match=r"^--eval-data: .*bad\.jsonl:1: field"):
        ST.recalibrate(tok_dir, tmp_path / "ckpt", [bad], tmp_path / "re", target_fpr=0.1,
                       max_length=64, log=lambda *a: None)
    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(app, ["calibrate", "--head", str(tmp_path / "ckpt"), "--model",
                                 str(tok_dir), "--eval-data", str(one), "--out",
                                 str(tmp_path / "re"), "--target-fpr", "0.1"])
    assert r.exit_code == 2, r.output
    assert "1 prompt group(s)" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "re").exists()


def test_finish_head_names_an_empty_calibration_half():
    from safeserve.models.safety_calibration import finish_head
    from safeserve.models.safety_features import Features

    tax = Taxonomy.load()
    k = tax.num_outputs
    feats = Features({-1: torch.zeros(2, 4)}, torch.zeros(2, k), torch.tensor([1, 2]),
                     torch.tensor([0, 0]), [{"group": "only", "benign": True}])
    with pytest.raises(ValueError, match="1 prompt group"):
        finish_head(torch.zeros(k, 4), torch.zeros(k), feats, tax,
                    {"tau": 3, "target_fpr": 0.1}, -1, lambda *a: None)


# 3, 4 ----------------------------------------------------------------------------------


def test_group_zero_is_a_group():
    row = {"prompt": "hi", "prompt_label": "safe"}
    assert parse_trajectory({**row, "group": 0}, "x:1").group == "0"
    assert parse_trajectory({**row, "group": None}, "x:1").group == ""
    assert parse_trajectory(row, "x:1").group == ""
    assert parse_trajectory({**row, "group": "g"}, "x:1").group == "g"


def test_a_bad_response_offset_in_csv_names_file_line_and_field(tmp_path):
    p = tmp_path / "rows.csv"
    p.write_text("prompt,response,prompt_label,categories,response_unsafe_from,group\n"
                 "make a bomb,Sure,unsafe,weapons,0,0\n"
                 "make a bomb,Sure,unsafe,weapons,abc,1\n")
    with pytest.raises(TrajectoryError,
                       match=r"rows\.csv:3: field 'response_unsafe_from': .*'abc'"):
        load_trajectories(p, Taxonomy.load())
    p.write_text("prompt,response,prompt_label,categories,response_unsafe_from,group\n"
                 "make a bomb,Sure,unsafe,weapons,0,0\n"
                 "bake a cake,ok,safe,,,1\n")
    rows = load_trajectories(p, Taxonomy.load())
    assert [r.response_unsafe_from for r in rows] == [0, None]
    assert [r.group for r in rows] == ["0", "1"]


# 5 -------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:calibration missed its target")  # a random head
def test_calibrate_copies_a_full_mode_heads_lm_to_another_out(tmp_path):
    """A full-mode head reads its own fine-tuned LM and has no adapter to carry: a head
    recalibrated into another directory takes the LM files along (else it would be served
    with the recorded base model); a full-mode head whose directory holds no LM is refused."""
    from safeserve.models.checkpoint import SafetyHead, load_safety_head
    from safeserve.models.head_check import served_model_for
    from safeserve.models.safety_train import TrainInputError, recalibrate

    ckpt = tmp_path / "full"
    tok = _tokenizer(ckpt)
    save_tiny_llama(ckpt, tok, hidden=32, layers=1, kv_heads=1, max_positions=128)
    tax = Taxonomy.load()
    extra = {"mode": "full", "base_model": str(tmp_path / "the-base-it-started-from")}
    SafetyHead(torch.randn(tax.num_outputs, 32) * 0.1, torch.zeros(tax.num_outputs), tax,
               extra=extra).save(ckpt)
    held = _write(tmp_path / "held.jsonl", _rows(16))
    quiet = lambda *a, **k: None  # noqa: E731
    recalibrate(ckpt, ckpt, [held], tmp_path / "re", target_fpr=0.3, max_length=64, log=quiet)
    out = tmp_path / "re"
    assert (out / "config.json").is_file() and (out / "safety_head").is_dir()
    assert served_model_for(out) == out  # the fine-tuned LM, not the recorded base
    assert load_safety_head(out).extra["mode"] == "full"
    # the head alone, moved away from its LM: refused before anything loads
    alone = tmp_path / "alone"
    SafetyHead(torch.zeros(tax.num_outputs, 32), torch.zeros(tax.num_outputs), tax,
               extra=extra).save(alone)
    with pytest.raises(TrainInputError, match="trained in full mode"):
        recalibrate(ckpt, alone, [held], tmp_path / "re2", target_fpr=0.3, max_length=64,
                    log=quiet)
    assert not (tmp_path / "re2").exists()
    # an operating-point move carries the LM the same way (the read-out jobs share it)
    from safeserve.models.operating_point import move_operating_point

    move_operating_point(out, tmp_path / "moved", prompt_shift=0.0, response_shift=1.0,
                         log=quiet)
    assert served_model_for(tmp_path / "moved") == tmp_path / "moved"
    with pytest.raises(ValueError, match="trained in full mode"):
        move_operating_point(alone, tmp_path / "moved2", prompt_shift=0.0, response_shift=1.0,
                             log=quiet)
    assert not (tmp_path / "moved2").exists()


# 6 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", ["", " , ", "a,b"])
def test_probe_layers_without_layers_is_a_bad_parameter(tmp_path, layers, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from safeserve.models import safety_train_cli as C

    monkeypatch.setattr(C, "head_features", lambda *a, **k: pytest.fail("features extracted"))
    app = typer.Typer()
    C.register(app)
    r = CliRunner().invoke(app, ["probe-layers", "--data", str(tmp_path / "x.jsonl"),
                                 "--model", str(tmp_path), "--layers", layers])
    assert r.exit_code == 2, r.output
    assert "--layers" in r.output and "Traceback" not in r.output, r.output
