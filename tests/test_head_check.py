"""The head's self-check record (models/head_check.py) and the server's startup plan
(server/head_check.py), without an engine; the served runs are in test_default_model.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from safeserve.models.checkpoint import SafetyHead, load_safety_head
from safeserve.models.head_check import (LOGIT_CLIP, RESPONSE_TOKENS, SELF_CHECK, SelfCheck,
                                         ServedResponse, compare, compute_record,
                                         tolerance_for)
from safeserve.models.taxonomy import Taxonomy
from safeserve.server.head_check import HeadCheckPlan

NAMES = ("a", "b")


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_record_round_trips_and_rejects_malformed_ones():
    rec = SelfCheck(("p1", "p2"), ((1, 2), (3,)), ((1.0, -2.0), (3.0, 4.0)), NAMES, "bfloat16")
    extra = {SELF_CHECK: rec.to_extra({"transformers": "x"})}
    assert SelfCheck.from_extra(json.loads(json.dumps(extra))) == rec
    assert SelfCheck.from_extra({}) is None
    ok = {"prompts": ["p"], "prompt_ids": [[1]], "prompt_logits": [[1.0]], "output_names": ["a"]}
    assert SelfCheck.from_extra({SELF_CHECK: ok}).dtype == "float32"
    bad = [{**ok, "output_names": ["a", "b"]}, {**ok, "prompt_ids": [[]]},
           {**ok, "prompts": [], "prompt_logits": [], "prompt_ids": []},
           {**ok, "prompt_logits": [["x"]]}, {**ok, "prompt_logits": [[float("nan")]]},
           {k: v for k, v in ok.items() if k != "prompt_ids"}]
    for raw in bad:
        with pytest.raises(ValueError, match=SELF_CHECK):
            SelfCheck.from_extra({SELF_CHECK: raw})


def test_compare_finds_the_worst_output_in_logits_and_clips_saturated_ones():
    rec = SelfCheck(("p1", "p2"), ((1,), (2,)), ((1.0, -2.0), (3.0, 30.0)), NAMES)
    same = [{"a": sig(1.0), "b": sig(-2.0)}, {"a": sig(3.0), "b": 1.0}]  # 30 logits: exactly 1
    ok = compare(rec, same, tolerance=0.01)
    assert ok.passed and ok.max_error < 1e-5 and ok.summary()["status"] == "passed"
    off = [{"a": sig(1.0), "b": sig(-2.0)}, {"a": sig(0.5), "b": sig(LOGIT_CLIP + 3)}]
    bad = compare(rec, off, tolerance=1.0)
    assert not bad.passed and bad.max_error == pytest.approx(2.5, abs=1e-4)
    assert (bad.worst_prompt, bad.worst_output) == ("p2", "a")
    assert "2.5 logits" in bad.explain() and "'a' on 'p2'" in bad.explain()
    # the head's prompt offset is applied as the server does, after a float32 sigmoid: a raw
    # logit of 30 is exactly 1 there and stays 1 whatever the offset
    lifted = [{"a": sig(2.5), "b": sig(-0.5)}, {"a": sig(4.5), "b": 1.0}]
    assert compare(rec, lifted, tolerance=0.01, prompt_offset=1.5).passed
    assert compare(rec, same, tolerance=0.01, prompt_offset=-25.0).max_error > 1.0


ANSWERED = SelfCheck(("p1", "p2"), ((1,), (2,)), ((1.0, -2.0), (3.0, 4.0)), NAMES, "float32",
                     ((7, 8, 9), (5, 6, 4)),
                     (((0.5, -1.0), (2.0, -3.0), (1.0, 1.0)), ((0.0, 0.0), (4.0, 30.0), (-1.0, 2.0))))
ANSWERED_PROMPTS = [{"a": sig(1.0), "b": sig(-2.0)}, {"a": sig(3.0), "b": sig(4.0)}]


def served(ids, rows):
    return ServedResponse(tuple(ids), tuple({"a": sig(a), "b": 1.0 if b >= 30 else sig(b)}
                                            for a, b in rows))


def test_record_with_answers_round_trips_and_rejects_mismatched_rows():
    extra = {SELF_CHECK: ANSWERED.to_extra({})}
    assert SelfCheck.from_extra(json.loads(json.dumps(extra))) == ANSWERED
    raw = ANSWERED.to_extra({})
    for bad in ({**raw, "response_ids": raw["response_ids"][:1]},
                {**raw, "response_logits": [r[:2] for r in raw["response_logits"]]},
                {**raw, "response_logits": [[[1.0]] * 3] * 2},
                {**raw, "response_logits": [[[float("nan"), 0.0]] * 3] * 2}):
        with pytest.raises(ValueError, match="response"):
            SelfCheck.from_extra({SELF_CHECK: bad})
    assert ANSWERED.subset([1]).response_ids == ((5, 6, 4),)
    moved = ANSWERED.shifted([0.5, 0.0], [-1.0, 2.0])
    assert moved.logits[0] == (1.5, -2.0) and moved.response_logits[0][1] == (1.0, -1.0)
    assert ANSWERED.shifted([0.5, 0.0]).response_logits == ANSWERED.response_logits


def test_compare_checks_generated_rows_up_to_the_first_divergent_token():
    same = [served(ids, rows) for ids, rows in zip(ANSWERED.response_ids,
                                                   ANSWERED.response_logits)]
    ok = compare(ANSWERED, ANSWERED_PROMPTS, 0.01, served_responses=same)
    assert ok.passed and (ok.response_rows, ok.response_rows_skipped) == (6, 0)
    assert ok.summary()["response_rows"] == 6
    # the second answer picks another token at position 1: its rows 1 and 2 read another
    # sequence and are skipped, even though row 2's scores are far off
    diverged = [same[0], served((5, 3, 4), [(0.0, 0.0), (9.0, 9.0), (9.0, 9.0)])]
    part = compare(ANSWERED, ANSWERED_PROMPTS, 0.01, served_responses=diverged)
    assert part.passed and (part.response_rows, part.response_rows_skipped) == (4, 2)
    # a wrong per-token row (the prompt verdicts all right) fails, and says where
    wrong = [served((7, 8, 9), [(0.5, -1.0), (2.0, -3.0), (1.0, -1.5)]), same[1]]
    bad = compare(ANSWERED, ANSWERED_PROMPTS, 0.1, served_responses=wrong)
    assert not bad.passed and bad.max_error == pytest.approx(2.5, abs=1e-4)
    assert (bad.worst_prompt, bad.worst_output, bad.worst_token) == ("p1", "b", 2)
    assert "per-token score at generated token 2" in bad.explain()
    # prompt verdicts only (no answers served, or none recorded): nothing else compared
    assert compare(ANSWERED, ANSWERED_PROMPTS, 0.01).response_rows == 0
    # an answer the server could not run (it would not fit --max-model-len) is empty: its
    # rows count as skipped, the other answers are still compared
    unrun = compare(ANSWERED, ANSWERED_PROMPTS, 0.01,
                    served_responses=[ServedResponse((), ()), same[1]])
    assert unrun.passed and (unrun.response_rows, unrun.response_rows_skipped) == (3, 3)


def test_plan_defaults_by_dtype_and_reports_heads_without_a_record():
    rec = SelfCheck(("p",), ((1,),), ((0.0,),), ("a",))
    assert HeadCheckPlan.build(rec, "error", None, "float32").tolerance == 0.1
    # a record taken in bfloat16 (a large LoRA run) gets half precision's tolerance
    bf16 = SelfCheck(("p",), ((1,),), ((0.0,),), ("a",), "bfloat16")
    assert HeadCheckPlan.build(bf16, "error", None, "float32").tolerance == 1.0
    assert tolerance_for("float32", None) == 0.1
    assert HeadCheckPlan.build(rec, "error", None, "bfloat16").tolerance == 1.0
    assert HeadCheckPlan.build(rec, "error", None, "auto").tolerance == 1.0
    assert HeadCheckPlan.build(rec, "warn", 0.3, "float32").tolerance == 0.3
    assert HeadCheckPlan.build(rec, "error", None, "float32").runs
    off = HeadCheckPlan.build(rec, "off", None, "float32")
    assert not off.runs and off.result == {"status": "off"}
    none = HeadCheckPlan.build(None, "error", None, "float32")
    assert not none.runs and none.result["status"] == "unverified"


def test_bundled_heads_carry_records_for_their_own_outputs():
    from safeserve.models.model_store import BUNDLED_HEADS

    for name, path in BUNDLED_HEADS.items():
        head = load_safety_head(path)
        rec = SelfCheck.from_extra(head.extra)
        assert rec is not None, name
        assert rec.output_names == head.taxonomy.output_names
        # both sides of the thresholds: benign prompts low, harmful ones high on some output
        assert max(rec.logits[0]) < 3 and max(rec.logits[-1]) > 8, name
        # and the greedy answers' first tokens with the per-token rows at each
        assert [len(r) for r in rec.response_logits] == [RESPONSE_TOKENS] * len(rec.prompts)


def test_record_follows_the_head_through_training_and_operating_point(tmp_path,
                                                                       base_model_dir):
    """A record is the training forward's prompt logits on the served model; writing a head
    again drops a copied one; a moved operating point shifts it by the bias moves, which is
    what the forward computes for the moved head."""
    from safeserve.models.operating_point import move_operating_point
    from safeserve.models.safety_features import load_lm
    from safeserve.models.head_writer import write_checkpoint

    tax = Taxonomy.load()
    g = torch.Generator().manual_seed(0)
    head = SafetyHead(0.05 * torch.randn(tax.num_outputs, 576, generator=g),
                      torch.zeros(tax.num_outputs), tax, extra={"base_model": str(base_model_dir)})
    stale = {SELF_CHECK: SelfCheck(("p",), ((1,),), ((0.0,) * tax.num_outputs,),
                                   tax.output_names).to_extra({})}
    write_checkpoint(head, {}, tmp_path / "a", {**head.extra, **stale}, log=lambda *a: None)
    assert SELF_CHECK not in load_safety_head(tmp_path / "a").extra  # dropped, not copied
    model, tok = load_lm(base_model_dir)
    write_checkpoint(head, {}, tmp_path / "a", head.extra, self_check_model=base_model_dir,
                     log=lambda *a: None, model=model, tok=tok)
    rec = SelfCheck.from_extra(load_safety_head(tmp_path / "a").extra)
    assert rec.prompt_ids[0][-1] != rec.prompt_ids[0][0] and len(rec.prompts) == 8
    move_operating_point(tmp_path / "a", tmp_path / "b", prompt_shift=-0.5, response_shift=1.0,
                         tau=4, log=lambda *a: None)
    moved = load_safety_head(tmp_path / "b")
    shifted = SelfCheck.from_extra(moved.extra)
    fresh = compute_record(model, tok, moved, prompts=rec.prompts[:3])
    for got, want, before in zip(shifted.logits, fresh.logits, rec.logits):
        assert got == pytest.approx(want, abs=1e-4)
        # raw logits: categories unchanged, the overall output's bias -1 (it fires at 0.5);
        # the +1.5 prompt offset is the server's, applied in the comparison
        assert got[:-1] == pytest.approx(before[:-1], abs=1e-5)
        assert got[-1] == pytest.approx(before[-1] - 1.0, abs=1e-5)
    # the greedy answers' rows move with the head's own biases (the response shift: the
    # overall output's bias -1); what the forward computes for the moved head
    assert len(rec.response_ids[0]) == RESPONSE_TOKENS == len(rec.response_logits[0])
    assert shifted.response_ids[:3] == fresh.response_ids
    for got, want in zip(shifted.response_logits, fresh.response_logits):
        for a, b in zip(got, want):
            assert a == pytest.approx(b, abs=1e-4)


def test_prompt_readout_serves_prompt_rows_and_moves_with_the_operating_point(tmp_path,
                                                                               base_model_dir):
    """Format 4: the stacked kernel weights give the read-out's logits at prompt rows and the
    head's (MLP included) elsewhere; a moved operating point moves the read-out's overall
    output with the head's, and its record stays what the forward computes."""
    from safeserve.kernels.safety_head import (head_logits, safety_scores_reference,
                                               select_prompt_rows)
    from safeserve.models.checkpoint import FORMAT_VERSION_PROMPT
    from safeserve.models.operating_point import move_operating_point
    from safeserve.models.safety_features import load_lm
    from safeserve.models.head_writer import write_checkpoint

    tax = Taxonomy.load()
    k, h = tax.num_outputs, 576
    g = torch.Generator().manual_seed(1)
    mlp = (0.05 * torch.randn(8, h, generator=g), torch.zeros(8),
           0.1 * torch.randn(k, 8, generator=g))
    head = SafetyHead(0.05 * torch.randn(k, h, generator=g), torch.zeros(k), tax,
                      extra={"base_model": str(base_model_dir)}, mlp=mlp,
                      prompt=(0.05 * torch.randn(k, h, generator=g), torch.randn(k, generator=g)))
    x = torch.randn(5, h, generator=g)
    is_prompt = torch.tensor([1, 0, 0, 1, 0])
    got = select_prompt_rows(torch.logit(safety_scores_reference(x, *head.served_tensors())),
                             is_prompt, k)
    want = torch.where(is_prompt.bool().unsqueeze(1), head_logits(x, *head.prompt),
                       head_logits(x, head.weight, head.bias, mlp))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    model, tok = load_lm(base_model_dir)
    write_checkpoint(head, {}, tmp_path / "a", head.extra, self_check_model=base_model_dir,
                     log=lambda *a: None, model=model, tok=tok)
    saved = load_safety_head(tmp_path / "a")
    assert saved.format_version == FORMAT_VERSION_PROMPT
    assert torch.equal(saved.prompt[0], head.prompt[0])
    move_operating_point(tmp_path / "a", tmp_path / "b", prompt_shift=0.0, response_shift=2.0,
                         tau=4, log=lambda *a: None)
    moved = load_safety_head(tmp_path / "b")
    assert moved.prompt[1][-1].item() == pytest.approx(head.prompt[1][-1].item() - 2.0)
    shifted = SelfCheck.from_extra(moved.extra)
    fresh = compute_record(model, tok, moved, prompts=shifted.prompts[:2])
    for a, b in zip(shifted.logits, fresh.logits):
        assert a == pytest.approx(b, abs=1e-4)
    # the generated rows are the head's own outputs with its MLP: a record compared against
    # the same head served without the MLP fails there, while its prompt verdicts (the
    # read-out's) agree exactly
    no_mlp = SafetyHead(moved.weight, moved.bias, moved.taxonomy, moved.layer, moved.extra,
                        None, moved.prompt, moved.prompt_either, moved.prompt_layer)
    bare = compute_record(model, tok, no_mlp, prompts=shifted.prompts[:2])
    for a, b in zip(bare.logits, fresh.logits):
        assert a == pytest.approx(b, abs=1e-5)
    names = moved.taxonomy.output_names
    prompts_seen = [dict(zip(names, r)) for r in bare.expected_scores(0.0)]
    answers = [ServedResponse(ids, tuple(dict(zip(names, torch.sigmoid(torch.tensor(row)).tolist()))
                                         for row in rows))
               for ids, rows in zip(bare.response_ids, bare.response_logits)]
    result = compare(fresh, prompts_seen, 0.1, 0.0, answers)
    assert result.response_rows == 2 * RESPONSE_TOKENS and not result.passed, result
    assert result.worst_token is not None


@pytest.mark.parametrize("mode", ["warn", "error"])
def test_a_failed_check_stops_the_server_or_is_served_and_shown(mode, monkeypatch, caplog):
    """`error` (the default) raises HeadCheckFailed (launch turns it into exit 1; the served
    mismatch is test_default_model.py's); `warn` logs it and keeps the result /v1/models
    shows. A check that could not run at all is served in warn mode with its reason."""
    import asyncio

    from safeserve.models.head_check import CheckResult
    from safeserve.server import head_check as server_check

    failed = CheckResult(max_error=7.5, tolerance=0.1, worst_prompt="p", worst_output="unsafe",
                         expected=0.9, served=0.1, prompts=3)

    async def check(engine, svc, plan):
        plan.result = failed.summary()
        return failed

    monkeypatch.setattr(server_check, "check", check)
    plan = HeadCheckPlan(record=None, mode=mode, tolerance=0.1)
    if mode == "error":
        with pytest.raises(server_check.HeadCheckFailed, match="7.5 logits"):
            asyncio.run(server_check.run_head_check(None, None, plan))
        return
    with caplog.at_level("ERROR"):
        assert asyncio.run(server_check.run_head_check(None, None, plan)) is failed
    assert "self-check FAILED, serving anyway" in caplog.text
    assert plan.result["status"] == "failed" and plan.result["max_logit_error"] == 7.5

    async def broken(engine, svc, plan):
        raise RuntimeError("no engine")

    monkeypatch.setattr(server_check, "check", broken)
    assert asyncio.run(server_check.run_head_check(None, None, plan)) is None
    assert plan.result == {"status": "error", "reason": "no engine"}
