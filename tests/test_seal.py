"""SEAL data selection: selector gradient, id-stable filtering, resume, servable fine-tune output.

Runs on a tiny random LlamaForCausalLM (hidden 64, 2 layers, head_dim 32) with the default
model's tokenizer; nothing reads ../shared. The two-process data-parallel check runs by default
(SAFESERVE_SKIP_DDP=1 skips it): it launches two CPU ranks with ``accelerate launch`` and takes
about a minute on a busy 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, tiny_llama_with_default_tokenizer
from safeserve.models.seal.data import load_dataset
from safeserve.models.seal.selector import Selector, selector_gradient
from safeserve.models.seal.select_train import SealTrainer, SelectConfig

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from safeserve.models.checkpoint import SafetyHead
    from safeserve.models.taxonomy import Taxonomy

    d = tiny_llama_with_default_tokenizer(tmp_path_factory.mktemp("tiny") / "model")
    tax = Taxonomy.load()
    SafetyHead(torch.randn(tax.num_outputs, 64), torch.zeros(tax.num_outputs), tax,
               extra={"purpose": "tests"}).save(d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("seal_data")
    lines = []
    for i in range(10):
        rec = {"prompt": f"Question {i}: what is {i} plus {i}?",
               "response": f"It is {2 * i}." + " Indeed" * (i % 3),
               "source": "harmful" if i % 4 == 0 else "benign"}
        if i == 3:
            rec["id"] = "custom-3"
        lines.append(json.dumps(rec))
    lines.insert(2, "{not json")                                             # line 2
    lines.insert(5, json.dumps({"prompt": "hi", "response": "  "}))          # line 5: empty
    lines.insert(7, json.dumps({"prompt": "long " * 400, "response": "x"}))  # line 7: too long
    lines.insert(8, "")                                                      # line 8: blank
    lines.append(json.dumps({"id": "custom-3", "prompt": "dup", "response": "dup"}))
    lines.append(json.dumps({"messages": [{"role": "user", "content": "Say hi"},
                                          {"role": "assistant", "content": "Hi there!"}]}))
    (d / "ft.jsonl").write_text("\n".join(lines) + "\n")
    safe = [{"prompt": f"Help me hurt someone {i}", "response": "I can't help with that."}
            for i in range(4)]
    (d / "safe.jsonl").write_text("\n".join(json.dumps(r) for r in safe) + "\n")
    return {"ft": d / "ft.jsonl", "safe": d / "safe.jsonl", "dir": d}


def _cfg(tiny, data, out, **kw) -> SelectConfig:
    base = dict(ft_data=str(data["ft"]), safe_data=str(data["safe"]), model=str(tiny),
                out=str(out), batch_size=4, max_length=128, gamma_init=0.5, epochs=1)
    base.update(kw)
    return SelectConfig(**base)


def _nll_by_hand(lm, tok, samples) -> torch.Tensor:
    """Per-sample NLL over response tokens with a plain full-logits forward, one row at a time."""
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.input_ids])
            logits = lm(input_ids=ids).logits[0, :-1].float()
            tgt = ids[0, 1:]
            lp = torch.log_softmax(logits, -1).gather(1, tgt[:, None])[:, 0]
            out.append(-lp[s.n_prompt - 1:].mean())
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------


def test_selector_gradient_is_the_softmax_penalty_gradient():
    torch.manual_seed(1)
    n, gamma = 9, 0.3
    omega = torch.randn(n)
    rows = torch.tensor([1, 4, 7])
    d = torch.rand(3) * 3
    # Autograd on the minibatch penalty term gamma * (N/b) sum_{j in B} sigma_j(omega) d_j.
    w = omega.clone().requires_grad_(True)
    (gamma * n / len(rows) * (torch.softmax(w, 0)[rows] * d).sum()).backward()
    assert torch.allclose(selector_gradient(omega, rows, d, gamma), w.grad, atol=1e-6)
    assert torch.count_nonzero(selector_gradient(omega, rows, d, 0.0)) == 0


def test_filtering_keeps_stable_ids(tiny, data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    ds = load_dataset(data["ft"], tok, max_length=128)
    assert dict(ds.dropped) == {"unparsable": 1, "empty": 1, "too_long": 1, "duplicate_id": 1}
    # Explicit id where given, else the file line number (dropped rows keep their numbers).
    assert ds.ids == ["0", "1", "3", "custom-3", "6", "9", "10", "11", "12", "13", "15"]
    by_id = {s.id: s for s in ds.samples}
    assert by_id["custom-3"].prompt_messages[0]["content"].startswith("Question 3")
    assert by_id["3"].prompt_messages[0]["content"].startswith("Question 2")
    assert by_id["9"].prompt_messages[0]["content"].startswith("Question 5")
    assert by_id["15"].response == "Hi there!"


def test_algorithm2_update_matches_hand_gradient(tiny, data, tmp_path):
    cfg = _cfg(tiny, data, tmp_path / "a2", batch_size=64, selector_optim="sgd",
               selector_lr=0.5, gamma_init=0.4)
    tr = SealTrainer(cfg, log=lambda *_: None)
    samples = tr.ft.samples
    # One step with all rows: the selector uses the losses of the model before its step,
    # which is the base model (LoRA B starts at zero).
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    d = _nll_by_hand(base, tr.tok, samples)
    tr.run()
    n = len(samples)
    sigma = torch.full((n,), 1.0 / n)
    w = n * sigma
    expected = 0.4 / n * (w * d - sigma * (w * d).sum())
    assert torch.allclose(tr.sel_opt.last_grad, expected, atol=1e-5)
    saved = Selector.load(tmp_path / "a2" / "selector.json")
    assert torch.allclose(saved.omega, -0.5 * expected, atol=1e-5)
    # High-loss rows are down-weighted.
    assert saved.ranking()[-1] == int(torch.argmax(d))


def test_algorithm1_update_matches_hand_gradient(tiny, data, tmp_path):
    cfg = _cfg(tiny, data, tmp_path / "a1", batch_size=64, selector_optim="sgd",
               selector_lr=0.5, gamma_init=0.4, algorithm=1, lr=1e-2, fresh_losses=True)
    tr = SealTrainer(cfg, log=lambda *_: None)
    tr.run()
    # fresh_losses: d_j = l_j(theta) - l_j(theta_aux) with both models after their step.
    main = tr.acc.unwrap_model(tr.model).lm
    aux = tr.acc.unwrap_model(tr.aux).lm
    d = _nll_by_hand(main, tr.tok, tr.ft.samples) - _nll_by_hand(aux, tr.tok, tr.ft.samples)
    assert d.abs().max() > 1e-4  # the two models did diverge
    n = len(d)
    expected = 0.4 / n * (d - (d.sum() / n))
    assert torch.allclose(tr.sel_opt.last_grad, expected, atol=1e-5)


def test_resume_gives_the_same_ranking(tiny, data, tmp_path):
    straight = SealTrainer(_cfg(tiny, data, tmp_path / "s", epochs=2, selector_lr=0.05),
                           log=lambda *_: None).run()
    SealTrainer(_cfg(tiny, data, tmp_path / "r", epochs=1, selector_lr=0.05),
                log=lambda *_: None).run()
    resumed = SealTrainer(_cfg(tiny, data, tmp_path / "r", epochs=2, selector_lr=0.05,
                               resume=str(tmp_path / "r" / "selector.json")),
                          log=lambda *_: None).run()
    assert resumed.ids == straight.ids
    assert torch.allclose(resumed.omega, straight.omega, atol=1e-6)
    assert resumed.ranking() == straight.ranking()
    assert straight.omega.std() > 0
    # Resuming a finished run changes nothing.
    again = SealTrainer(_cfg(tiny, data, tmp_path / "r", epochs=2, selector_lr=0.05,
                             resume=str(tmp_path / "r" / "selector.json")),
                        log=lambda *_: None).run()
    assert again.ranking() == straight.ranking()
    assert (tmp_path / "s" / "selector_hist.png").stat().st_size > 0
    # Its LoRA and optimizer state under another learning rate would not continue this run.
    from safeserve.models.seal.data import SealInputError

    with pytest.raises(SealInputError, match=r"lr 1e-05 -> 0.001"):
        SealTrainer(_cfg(tiny, data, tmp_path / "r", epochs=3, selector_lr=0.05, lr=1e-3,
                         resume=str(tmp_path / "r" / "selector.json")), log=lambda *_: None).run()


def test_finetune_writes_a_loadable_checkpoint_with_the_head(tiny, data, tmp_path):
    from transformers import AutoModelForCausalLM

    from safeserve.models.checkpoint import has_safety_head, load_safety_head
    from safeserve.models.seal.finetune import FinetuneConfig, run_finetune

    sel = SealTrainer(_cfg(tiny, data, tmp_path / "sel", selector_lr=0.05),
                      log=lambda *_: None).run()
    out = tmp_path / "ft"
    m = run_finetune(FinetuneConfig(ft_data=str(data["ft"]), model=str(tiny), out=str(out),
                                    selector=str(tmp_path / "sel" / "selector.json"), keep=0.5,
                                    batch_size=4, max_length=128), log=lambda *_: None)
    top = set(sel.top_ids(0.5))
    assert set(json.loads((out / "kept_ids.json").read_text())) == top
    assert m["n_kept"] == len(top) == round(0.5 * sel.n)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.hidden_size == 64
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert has_safety_head(out)
    load_safety_head(out).validate(64)
    metrics = json.loads((out / "seal_metrics.json").read_text())
    for when in ("before", "after"):
        assert 0.0 <= metrics["safety_head"][when]["auroc"] <= 1.0
    assert metrics["n_kept"] == len(top)


def test_random_baseline_keeps_data_order_and_empty_data_is_an_error():
    from safeserve.models.seal.data import SealInputError
    from safeserve.models.seal.finetune import FinetuneConfig, choose_rows
    from safeserve.models.seal.selector import keep_count

    ids = [f"r{i}" for i in range(1000)][::-1]
    cfg = FinetuneConfig(ft_data="ft.jsonl", model="m", out="o", keep=0.3, random_baseline=True)
    kept, name = choose_rows(cfg, ids)
    assert name == "random" and len(kept) == 300 and len(set(kept)) == 300
    pos = {s: i for i, s in enumerate(ids)}
    assert [pos[s] for s in kept] == sorted(pos[s] for s in kept)
    assert kept == choose_rows(cfg, ids)[0]  # seeded
    assert keep_count(0, 0.8) == 0 and keep_count(3, 0.01) == 1 and keep_count(4, 1.0) == 4
    with pytest.raises(SealInputError, match="no usable rows"):
        choose_rows(cfg, [])


def test_finetune_refuses_an_out_that_is_or_is_inside_the_model(tmp_path):
    """Refused before anything loads: saving there would overwrite the model being read."""
    from safeserve.models.seal.data import SealInputError
    from safeserve.models.seal.finetune import FinetuneConfig, check_out, run_finetune

    model = tmp_path / "model"
    for out in (model, model / "ft"):
        with pytest.raises(SealInputError, match="--out .* is --model .* or inside it"):
            run_finetune(FinetuneConfig(ft_data="missing.jsonl", model=str(model), out=str(out)))
    check_out(FinetuneConfig(ft_data="x", model=str(model), out=str(tmp_path / "ft")))
    assert not model.exists()


def _app():
    import typer

    from safeserve.models.seal.cli import register

    app, train = typer.Typer(), typer.Typer()
    app.add_typer(train, name="train")
    register(train)
    return app


def test_commands_are_registered():
    from typer.testing import CliRunner

    # and the flags other tests and the README use are there under those names
    for cmd, flags in (("seal-select", ("--resume", "--gamma-init", "--selector-optim")),
                       ("seal-finetune", ("--keep", "--selector", "--random-baseline")),
                       ("seal-experiment", ("--data-root", "--keep"))):
        result = CliRunner().invoke(_app(), ["train", cmd, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert all(flag in result.output for flag in flags), (cmd, result.output)


def test_bad_cli_input_is_one_line(tiny, data, tmp_path):
    from typer.testing import CliRunner

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "hi", "response": " "}) + "\n")
    not_selector = tmp_path / "sel.json"
    not_selector.write_text("{}")
    ft, safe, out = str(data["ft"]), str(data["safe"]), str(tmp_path / "o")
    select = ["train", "seal-select", "--ft-data", ft, "--safe-data", safe, "--out", out,
              "--model", str(tiny)]
    finetune = ["train", "seal-finetune", "--ft-data", ft, "--out", out, "--model", str(tiny)]
    cases = [
        (select + ["--dtype", "bf16"], 2, "bfloat16"),
        (select + ["--selector-optim", "foo"], 2, "adam, sgd"),
        (select + ["--resume", str(tmp_path / "missing.json")], 2, "does not exist"),
        # gamma 0 in every epoch: the selector would stay uniform (the file's order)
        (select + ["--epochs", "1"], 1, "gamma is 0 in every epoch"),
        (select + ["--gamma-step", "0"], 1, "gamma is 0 in every epoch"),
        (finetune + ["--keep", "1.5"], 2, "(0, 1]"),
        (finetune + ["--selector", str(tmp_path / "missing.json")], 2, "does not exist"),
        (finetune + ["--selector", str(not_selector)], 2, "not a readable SEAL selector"),
        (["train", "seal-finetune", "--ft-data", str(empty), "--out", out, "--model", str(tiny),
          "--keep", "1.0"], 1, "no usable rows"),
        (["train", "seal-select", "--ft-data", str(empty), "--safe-data", safe, "--out", out,
          "--model", str(tiny)], 1, "no usable rows"),  # checked before the model loads
        (["train", "seal-experiment", "--data-root", str(tmp_path), "--n-eval-benign", "0"], 2,
         "--n-eval-benign"),
        (["train", "seal-experiment", "--data-root", str(tmp_path), "--keep", "0"], 2, "(0, 1]"),
        (finetune + ["--batch-size", "0"], 2, "--batch-size"),  # was a ZeroDivisionError
        (finetune + ["--grad-accum", "0"], 2, "--grad-accum"),
        # the selector's schedule, checked before data generation and alignment
        (["train", "seal-experiment", "--data-root", str(tmp_path), "--out", out,
          "--selector-epochs", "1"], 1, "gamma is 0 in every epoch"),
    ]
    for args, code, message in cases:
        result = CliRunner().invoke(_app(), args, env={"COLUMNS": "200"})
        assert result.exit_code == code, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
        assert isinstance(result.exception, SystemExit), (args, result.exception)
    assert not (tmp_path / "o").exists()  # nothing started


def _run_checked(cmd: list[str], env: dict) -> None:
    """Run a child; on failure show its output (capture_output alone would hide why)."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (f"{' '.join(cmd[-12:])} exited {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}")


@pytest.mark.skipif(os.environ.get("SAFESERVE_SKIP_DDP") == "1",
                    reason="SAFESERVE_SKIP_DDP=1: skip the two-process gloo run (~40 s)")
def test_data_parallel_matches_single_process(tiny, data, tmp_path):
    args = ["train", "seal-select", "--ft-data", str(data["ft"]), "--safe-data",
            str(data["safe"]), "--model", str(tiny), "--batch-size", "4", "--gamma-init", "0.5",
            "--epochs", "2", "--selector-optim", "sgd", "--selector-lr", "50",
            "--max-length", "128"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "deploy" / "accelerate" / "multi_gpu.yaml"), "--num_processes", "2",
              # a free port, not accelerate's default 29500 (another run's, or a service's)
              "--main_process_port", str(free_port()), "-m", "safeserve.server.cli"]
    _run_checked(launch + args + ["--out", str(tmp_path / "ddp")], env)
    _run_checked([sys.executable, "-m", "safeserve.server.cli"] + args
                 + ["--out", str(tmp_path / "one")], env)
    ddp, one = (Selector.load(tmp_path / x / "selector.json") for x in ("ddp", "one"))
    assert ddp.config["world_size"] == 2 and one.config["world_size"] == 1
    # Same updates up to float summation order: two ranks add the per-row gradients in
    # another order than one process, and the selector lr (50) scales that rounding.
    assert torch.allclose(ddp.omega, one.omega, rtol=1e-3, atol=5e-3)
    assert ddp.ranking() == one.ranking()
