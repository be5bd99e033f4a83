"""Offline replay of the decision rule over traced runs (`safeserve eval replay`): the rule's
arithmetic on hand-made traces, and the CLI. Its agreement with the real engine is tested
in test_default_model.py."""

from __future__ import annotations

import itertools
import json

import pytest

from safeserve.models.evaluation import replay as rp
from safeserve.models.evaluation.judge import FULL_COMPLIANCE, FULL_REFUSAL

NAMES = ("violence", "weapons", "unsafe")
BASE = rp.Rule(NAMES, (0.9, 0.9, 0.5), (0.9, 0.9, 0.5), tau=3)


def _row(prompt, steps, *, allow=(), query=None, kind="harmful", text_answered=True, group="direct"):
    return rp.TracedRow(kind=kind, group=group, dataset="t", allow=tuple(allow),
                        prompt=None if prompt is None else rp.np.array(prompt, dtype=float),
                        query=None if query is None else rp.np.array(query, dtype=float),
                        steps=rp.np.array(steps, dtype=float).reshape(len(steps), len(NAMES)),
                        refused_by_text=not text_answered, answered_by_text=text_answered)


LOW = [0.1, 0.1, 0.1]
VIOLENT = [0.95, 0.1, 0.6]


def test_prompt_and_query_verdicts_act_at_step_zero():
    assert rp.trigger_step(_row(VIOLENT, [LOW] * 5), BASE) == 0
    assert rp.trigger_step(_row(LOW, [LOW] * 5, query=VIOLENT), BASE) == 0
    assert rp.trigger_step(_row(LOW, [LOW] * 5), BASE) is None


def test_response_rule_needs_tau_consecutive_steps():
    steps = [LOW, VIOLENT, VIOLENT, LOW, VIOLENT, VIOLENT, VIOLENT, LOW]
    assert rp.trigger_step(_row(LOW, steps), BASE) == 7  # the third of the second run
    assert rp.trigger_step(_row(LOW, steps), rp.Rule(NAMES, BASE.prompt_thresholds, BASE.response_thresholds, 2)) == 3
    assert rp.trigger_step(_row(LOW, steps), rp.Rule(NAMES, BASE.prompt_thresholds, BASE.response_thresholds, 4)) is None


def test_allowed_categories_are_masked_and_unsafe_counts_only_when_nothing_is_allowed():
    # violence allowed: neither violence nor the overall output may violate
    assert rp.trigger_step(_row(VIOLENT, [VIOLENT] * 4, allow=["violence"]), BASE) is None
    # weapons allowed: violence still violates
    assert rp.trigger_step(_row(VIOLENT, [LOW], allow=["weapons"]), BASE) == 0
    # only the overall output is high: it acts for a request that allows nothing
    overall = [0.1, 0.1, 0.7]
    assert rp.trigger_step(_row(overall, [LOW]), BASE) == 0
    assert rp.trigger_step(_row(overall, [LOW], allow=["weapons"]), BASE) is None
    # with an allow-list, the overall output still acts above its shifted threshold (0.88)
    # while the top category (violence, 0.2) is not allowed; allowing it silences it
    high = [0.2, 0.1, 0.95]
    assert rp.trigger_step(_row(high, [LOW], allow=["weapons"]), BASE) == 0
    assert rp.trigger_step(_row(LOW, [high] * 3, allow=["weapons"]), BASE) == 3
    assert rp.trigger_step(_row(high, [high] * 3, allow=["violence"]), BASE) is None
    # a prefilled request to a format-7 head (query set) keeps per-token attribution
    fmt7 = rp.dataclasses.replace(BASE, per_request_attribution=True)
    assert rp.trigger_step(_row(LOW, [LOW], allow=["weapons"], query=high), fmt7) == 0
    assert rp.trigger_step(_row(LOW, [LOW], allow=["violence"], query=high), fmt7) is None


def test_alert_band_shortens_the_run_after_a_near_prompt_or_query():
    near = [0.85, 0.1, 0.1]  # below the 0.9 prompt threshold, within 1 logit (0.768)
    steps = [LOW, VIOLENT, VIOLENT, LOW]
    banded = rp.Rule(NAMES, BASE.prompt_thresholds, BASE.response_thresholds, 3,
                     alert_margin=1.0, alert_tau=2)
    assert rp.trigger_step(_row(near, steps), BASE) is None
    assert rp.trigger_step(_row(near, steps), banded) == 3  # steps count from 1
    assert rp.trigger_step(_row(LOW, steps, query=near), banded) == 3  # the prefill's query
    assert rp.trigger_step(_row(LOW, steps), banded) is None  # far from the threshold
    # a request's own tau below the band's: the smaller one
    assert rp.trigger_step(_row(near, steps), rp.dataclasses.replace(banded, tau=1)) == 2
    # the band follows the request's masking: an allowed category never alerts
    assert rp.trigger_step(_row(near, [LOW, [0.1, 0.95, 0.1], [0.1, 0.95, 0.1]], allow=["violence"]),
                           banded) is None
    swept = rp.sweep([_row(near, steps)], BASE, [0.0], [0.0], [3], [0.0, 1.0], [2, 3])
    assert [(r["alert_margin"], r["alert_tau"], r["asr"]["direct"]["rate"]) for r in swept] == \
        [(0.0, None, 1.0), (1.0, 2, 0.0), (1.0, 3, 1.0)]


def test_logit_shifts_move_each_phase_separately():
    rule = rp.Rule.shifted(NAMES, BASE.response_thresholds, prompt_shift=1.0, response_shift=-1.0)
    assert rule.prompt_thresholds[0] == pytest.approx(9 * rp.math.e / (1 + 9 * rp.math.e))  # odds 9 -> 9e
    assert rule.response_thresholds[0] < 0.9 < rule.prompt_thresholds[0]
    assert rp.trigger_step(_row(VIOLENT, [LOW] * 3), rule) is None  # 0.95 < 0.96 at the prompt
    mild = [0.8, 0.1, 0.1]
    assert rp.trigger_step(_row(LOW, [mild] * 3), rule) == 3  # 0.8 >= 0.768 while generating


def test_the_overall_response_shift_moves_only_the_overall_output_on_generated_tokens():
    """A head's sampled-decoding shift, replayed: the overall output needs more evidence
    while generating; its prompt verdict and the categories are as before."""
    rule = rp.dataclasses.replace(BASE, overall_response_shift=1.0)  # 0.5 -> 0.731
    overall_only = [0.1, 0.1, 0.7]
    assert rp.trigger_step(_row(LOW, [overall_only] * 3), BASE) == 3
    assert rp.trigger_step(_row(LOW, [overall_only] * 3), rule) is None
    assert rp.trigger_step(_row(LOW, [[0.1, 0.1, 0.75]] * 3), rule) == 3
    assert rp.trigger_step(_row(overall_only, [LOW] * 3), rule) == 0  # the prompt verdict
    assert rp.trigger_step(_row(LOW, [[0.95, 0.1, 0.1]] * 3), rule) == 3  # a category
    # under an allow-list the two shifts add (0.5 -> allow-list +2 -> +1 more: 0.953)
    listed = _row(LOW, [[0.1, 0.5, 0.94]] * 3, allow=["violence"])  # acting for weapons
    assert rp.trigger_step(listed, rp.dataclasses.replace(BASE, allowlist_overall_shift=2.0)) == 3
    assert rp.trigger_step(listed, rp.dataclasses.replace(
        BASE, allowlist_overall_shift=2.0, overall_response_shift=1.0)) is None
    swept = rp.sweep([_row(LOW, [overall_only] * 3)], BASE, [0], [0], [3],
                     overall_shifts=[0, 1])
    assert [r["overall_response_shift"] for r in swept] == [0, 1]
    assert [r["asr"]["direct"]["rate"] for r in swept] == [0.0, 1.0]
    assert "overall response shift" in rp.results_table(swept)[0]


def test_score_outcomes_and_pareto():
    rows = [
        _row(VIOLENT, [LOW] * 3),  # caught at the prompt
        _row(LOW, [LOW] * 3),  # answered: an attack success
        _row(LOW, [LOW] * 3, text_answered=False),  # the model declined by itself
        _row(LOW, [VIOLENT] * 3, kind="benign"),  # over-refused by the response rule
        _row(LOW, [LOW] * 3, kind="benign"),
        _row(LOW, [LOW] * 3, kind="benign", text_answered=False),  # the LM refused a safe prompt
    ]
    out = rp.score(rows, BASE)
    assert out["asr"]["direct"] == {"rate": pytest.approx(1 / 3), "n": 3}
    assert out["over_refusal"] == {"rate": pytest.approx(2 / 3), "n": 3}
    results = rp.sweep(rows, BASE, [0.0, 5.0], [0.0, 5.0], [3])
    assert len(results) == 4
    front = rp.pareto(results)
    # loosening the response rule frees the benign row; loosening the prompt loses the catch
    assert [(r["prompt_shift"], r["response_shift"]) for r in front] == [(0.0, 5.0)]
    assert rp.results_table(front)[2].startswith("| +0 | +5 | 3 |")


def _result_row(i, *, harmful, verdict, trace, prompt_flagged=False, action="annotate", names=NAMES):
    return {"id": f"t:{i}", "dataset": "t", "harmful": harmful, "attack": "direct", "template": None,
            "prompt": f"prompt {i}",
            "verdict": verdict, "error": None,
            "safety": {"action": action, "score_names": list(names), "config": {"allow": [], "tau": 3},
                       "prompt": {"flagged": prompt_flagged, "scores": dict(zip(names, trace[0]["scores"]))},
                       "query": None, "trace": trace}}


def _trace(points, events):
    return [{"token_index": i, "scores": s, "event": e} for i, (s, e) in enumerate(zip(points, events))]


def test_loader_checks_and_agreement(tmp_path):
    rows = [
        _result_row(0, harmful=True, verdict=FULL_COMPLIANCE, prompt_flagged=True,
                    trace=_trace([VIOLENT, LOW], [2, 0])),
        _result_row(1, harmful=False, verdict=FULL_COMPLIANCE,
                    trace=_trace([LOW, VIOLENT, VIOLENT, VIOLENT], [0, 1, 1, 2])),
        _result_row(2, harmful=False, verdict=FULL_REFUSAL, trace=_trace([LOW, LOW], [0, 0])),
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded = rp.load_safety_run(run, NAMES)
    assert [r.extra["server_trigger"] for r in loaded] == [0, 3, None]
    assert rp.agreement(loaded, BASE) == (3, 3)
    assert rp.agreement(loaded, rp.Rule.shifted(NAMES, BASE.response_thresholds, response_shift=3)) == (2, 3)
    # a request that ran with a threshold_shift (echoed) is replayed with its response shift
    mid = [0.5, 0.1, 0.2]  # under every threshold, over violence's moved by -3 logits (0.31)
    shifted = _result_row(3, harmful=True, verdict=FULL_COMPLIANCE,
                          trace=_trace([LOW, mid, mid, mid], [0, 1, 1, 2]))
    shifted["safety"]["config"]["threshold_shift"] = -3
    (run / "results.jsonl").write_text(json.dumps(shifted) + "\n")
    assert rp.agreement(rp.load_safety_run(run, NAMES), BASE) == (1, 1)

    acted = dict(rows[0], safety=dict(rows[0]["safety"], action="refuse"))
    (run / "results.jsonl").write_text(json.dumps(acted) + "\n")
    with pytest.raises(rp.TraceError, match="annotate-only"):
        rp.load_safety_run(run, NAMES)
    untraced = dict(rows[0], safety=dict(rows[0]["safety"], trace=None))
    (run / "results.jsonl").write_text(json.dumps(untraced) + "\n")
    with pytest.raises(rp.TraceError, match="no score trace"):
        rp.load_safety_run(run, NAMES)
    (run / "results.jsonl").write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(rp.TraceError, match="score names"):
        rp.load_safety_run(run, ("violence",))
    gappy = dict(rows[0], safety=dict(rows[0]["safety"], telemetry_complete=False))
    (run / "results.jsonl").write_text(json.dumps(gappy) + "\n")
    with pytest.raises(rp.TraceError, match="incomplete"):
        rp.load_safety_run(run, NAMES)
    own = dict(rows[0], safety=dict(rows[0]["safety"],
                                    config=dict(rows[0]["safety"]["config"],
                                                threshold={"violence": 0.2})))
    (run / "results.jsonl").write_text(json.dumps(own) + "\n")
    with pytest.raises(rp.TraceError, match="its own `threshold`"):
        rp.load_safety_run(run, NAMES)


def test_replay_cli_on_the_default_checkpoint(tmp_path):
    import typer
    from typer.testing import CliRunner

    from safeserve.models.checkpoint import load_safety_head
    from safeserve.models.evaluation.cli import register
    from safeserve.models.model_store import DEFAULT_HEAD_DIR

    eval_app = typer.Typer()
    register(eval_app)

    head = load_safety_head(DEFAULT_HEAD_DIR)
    names = tuple(head.taxonomy.ids) + ("unsafe",)
    low = [0.01] * len(names)
    high = list(low)
    high[0] = 0.99999
    rows = [_result_row(0, harmful=True, verdict=FULL_COMPLIANCE, names=names,
                        trace=_trace([low, high, high, high], [0, 1, 1, 2]))]
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text(json.dumps(rows[0]) + "\n")
    out = tmp_path / "sweep.json"
    result = CliRunner().invoke(eval_app, ["replay", str(run), "--head", str(DEFAULT_HEAD_DIR),
                                           "--tau", "3,4", "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    assert "on 1 of 1" in result.output and "note:" not in result.output
    scored = json.loads(out.read_text())
    assert [r["asr"]["direct"]["rate"] for r in scored] == [0.0, 1.0]  # tau 4 lets it through
    # a request served with a shift the sweep does not apply: said so
    shifted_run = tmp_path / "shifted"
    shifted_run.mkdir()
    shifted = dict(rows[0], safety=dict(rows[0]["safety"], config=dict(
        rows[0]["safety"]["config"], threshold_shift=-1.0)))
    (shifted_run / "results.jsonl").write_text(json.dumps(shifted) + "\n")
    noted = CliRunner().invoke(eval_app, ["replay", str(shifted_run), "--head",
                                          str(DEFAULT_HEAD_DIR)])
    assert noted.exit_code == 0, noted.output
    assert "note: 1 of 1 requests were served with a threshold_shift" in noted.output
    bad = CliRunner().invoke(eval_app, ["replay", str(run), "--head", str(DEFAULT_HEAD_DIR), "--tau", "x"])
    assert bad.exit_code != 0
    # a development run minus the requests of the test run: nothing is left here
    empty = CliRunner().invoke(eval_app, ["replay", str(run), "--head", str(DEFAULT_HEAD_DIR),
                                          "--exclude", str(run)])
    assert empty.exit_code != 0 and "no traced requests" in empty.output
    # the same id and attack with another prompt (a second set loaded under the same name) stays
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.jsonl").write_text(json.dumps({**rows[0], "prompt": "another prompt"}) + "\n")
    kept = CliRunner().invoke(eval_app, ["replay", str(other), "--head", str(DEFAULT_HEAD_DIR),
                                         "--exclude", str(run)])
    assert kept.exit_code == 0 and "on 1 of 1" in kept.output, kept.output


def test_shift_head_moves_prompt_and_response_operating_points_separately():
    """`train operating-point`: the served thresholds move by the response shift, the prompt
    offset by the difference, so prompt-row logits (offset applied, as the server does) move
    by exactly the prompt shift and generated-token logits by exactly the response shift; the
    weights are untouched, the overall output keeps firing at 0.5, moves add up."""
    import torch

    from safeserve.kernels.safety_head import head_logits, offset_prompt_rows
    from safeserve.models.checkpoint import SafetyHead
    from safeserve.models.decision_defaults import alert_band, prompt_logit_offset
    from safeserve.models.operating_point import shift_head
    from safeserve.models.taxonomy import Taxonomy

    tax = Taxonomy.load()
    k, h = tax.num_outputs, 6
    g = torch.Generator().manual_seed(0)
    mlp = (torch.randn(4, h, generator=g), torch.randn(4, generator=g), torch.randn(k, 4, generator=g))
    head = SafetyHead(torch.randn(k, h, generator=g), torch.randn(k, generator=g), tax, mlp=mlp)
    x = 0.2 * torch.randn(5, h, generator=g)  # moderate logits: float32 sigmoids stay exact enough
    new = shift_head(head, prompt_shift=-0.5, response_shift=2.0, tau=4)
    assert new.extra["operating_point"]["tau"] == 4 and new.mlp is head.mlp
    assert torch.equal(new.weight, head.weight) and prompt_logit_offset(new.extra) == 2.5

    def margin(hd, at_prompt: bool):  # served logit minus the served threshold's, per output
        thr = torch.tensor([cat.threshold for cat in hd.taxonomy.categories] + [0.5])
        s = torch.sigmoid(head_logits(x, hd.weight, hd.bias, hd.mlp))
        s = offset_prompt_rows(s, torch.full((5,), int(at_prompt)), prompt_logit_offset(hd.extra))
        return torch.log(s / (1 - s)) - torch.log(thr / (1 - thr))

    torch.testing.assert_close(margin(new, True), margin(head, True) + 0.5, atol=1e-3, rtol=0)
    torch.testing.assert_close(margin(new, False), margin(head, False) - 2.0, atol=1e-3, rtol=0)
    again = shift_head(new, prompt_shift=1.0, response_shift=-1.0, tau=3)
    assert prompt_logit_offset(again.extra) == pytest.approx(0.5)
    torch.testing.assert_close(margin(again, True), margin(head, True) - 0.5, atol=1e-3, rtol=0)
    torch.testing.assert_close(margin(again, False), margin(head, False) - 1.0, atol=1e-3, rtol=0)
    banded = shift_head(head, prompt_shift=0.0, response_shift=0.0, tau=4, alert_margin=0.5,
                        alert_tau=2)

    assert alert_band(banded.extra) == (0.5, 2) and alert_band(new.extra) == (0.0, None)
    with pytest.raises(ValueError, match="alert"):
        shift_head(head, prompt_shift=0.0, response_shift=0.0, tau=4, alert_margin=0.5)
    # moving a banded head again keeps its band unless told otherwise
    assert alert_band(shift_head(banded, prompt_shift=0.0, response_shift=1.0, tau=4).extra) == (0.5, 2)
    assert alert_band(shift_head(banded, prompt_shift=0.0, response_shift=1.0, tau=4,
                                 alert_tau=3).extra) == (0.5, 3)
    assert alert_band(shift_head(banded, prompt_shift=0.0, response_shift=1.0, tau=4,
                                 alert_margin=0.0).extra) == (0.0, None)
    # a new margin keeps the band's tau; a tau without any band is refused, not dropped
    assert alert_band(shift_head(banded, prompt_shift=0.0, response_shift=0.0,
                                 alert_margin=1.0).extra) == (1.0, 2)
    with pytest.raises(ValueError, match="without an alert band"):
        shift_head(head, prompt_shift=0.0, response_shift=0.0, alert_tau=2)
    with pytest.raises(ValueError, match="alert_margin 0"):
        shift_head(banded, prompt_shift=0.0, response_shift=0.0, alert_margin=0.0, alert_tau=2)
    # without --tau the head's own tau is kept (what `eval replay` scored), else 3
    assert shift_head(new, prompt_shift=0.0, response_shift=0.0).extra["operating_point"]["tau"] == 4
    assert shift_head(head, prompt_shift=0.0, response_shift=0.0).extra["operating_point"]["tau"] == 3


def test_cosa_rows_load_and_can_be_held_out(tmp_path):
    def cosa_row(i, config):
        row = _result_row(i, harmful=True, verdict=FULL_COMPLIANCE, trace=_trace([LOW, LOW], [0, 0]))
        for name in ("attack", "template", "harmful", "verdict"):
            row.pop(name)
        row["safety"]["config"]["allow"] = ["violence"]
        return dict(row, config=config, expect="answer", h=1.0, situation=1)

    run = tmp_path / "cosa"
    run.mkdir()
    (run / "results.jsonl").write_text(json.dumps(cosa_row(0, "violence")) + "\n"
                                       + json.dumps(cosa_row(1, "violence")) + "\n")
    rows = rp.load_cosa_run(run, NAMES)
    assert [r.group for r in rows] == ["allowed", "allowed"] and rows[0].allow == ("violence",)
    # a CoSA run passed to --exclude names its requests by config, not by attack
    held = rp.run_requests(run)
    assert held == {("t:0", "cosa:violence", "prompt 0"), ("t:1", "cosa:violence", "prompt 1")}
    assert all(r.extra["key"] in held for r in rows)


def test_replay_compares_in_float32_as_the_kernel_does():
    """The decision kernel holds scores and thresholds in float32 (a trace's scores are
    float32 values): a score equal to a threshold's float32 rounding is at the threshold, even
    where the threshold itself (0.9) is a hair above it."""
    at = float(rp.np.float32(0.9))
    assert at < 0.9
    assert rp.trigger_step(_row([at, 0.1, 0.1], [LOW]), BASE) == 0
    assert rp.trigger_step(_row(LOW, [[0.1, at, 0.1]] * 3), BASE) == 3
    # the overall output acts for the top category; with every category unscored (NaN) there
    # is none to act for, and NaN itself never violates
    assert rp.trigger_step(_row([float("nan"), float("nan"), 0.99], [LOW], allow=["weapons"]), BASE) is None
    assert rp.trigger_step(_row([float("nan"), 0.1, 0.1], [LOW]), BASE) is None


def test_replay_builds_the_tables_the_server_compiles():
    """Per request, replay's thresholds, masks, tau and alert band are what
    ``SafetyPolicy.compile`` gives the decision kernel for the same config."""
    import torch

    from safeserve.models.taxonomy import Taxonomy
    from safeserve.server.safety_config import SafetyConfig, SafetyPolicy

    tax = Taxonomy.load()
    names = tax.output_names
    policy = SafetyPolicy(tax, overall_threshold=0.7, default_tau=4, allowlist_overall_shift=1.5,
                          alert_margin=0.75, alert_tau=2,
                          sampled_overall_shift=((0.7, 1.0), (1.0, 2.0)))
    base = [c.threshold for c in tax.categories] + [0.7]
    k = len(names)
    configs = (SafetyConfig(), SafetyConfig(allow=(tax.ids[1],)),
               SafetyConfig(allow=(tax.ids[0], tax.ids[2]), threshold_shift=-1.25),
               SafetyConfig(threshold_shift=-0.5, tau=2))
    # (a sampled request: the shift it echoes, replayed, gives the kernel's float32 exactly)
    for cfg, temperature in itertools.product(configs, (0.0, 0.3, 0.77, 1.0)):
        args = policy.compile(cfg, "r", [], 0, temperature=temperature)
        rule = rp.Rule.shifted(names, base, response_shift=cfg.threshold_shift or 0.0,
                               tau=policy.tau_of(cfg), allowlist_overall_shift=1.5,
                               alert_margin=0.75, alert_tau=2)
        rule = rp.dataclasses.replace(
            rule, overall_response_shift=policy.sampled_shift_of(cfg, temperature))
        row = rp.TracedRow(kind="benign", group="g", dataset="t", allow=cfg.allow,
                           prompt=None, query=None, steps=rp.np.zeros((0, k)),
                           refused_by_text=False, answered_by_text=True)
        t = rp._tables([row], rule)
        assert t["thresholds"][0].tolist() == torch.tensor(args.thresholds, dtype=torch.float32).tolist()
        prompt = args.prompt_thresholds or args.thresholds
        assert t["prompt_thresholds"][0].tolist() == torch.tensor(prompt, dtype=torch.float32).tolist()
        assert t["masked"][0].tolist() == list(args.masked)
        assert int(t["tau"][0]) == args.tau and int(t["alert_tau"][0]) == args.alert_tau
        assert float(t["alert_scale"][0]) == pytest.approx(args.alert_scale)


def test_batched_replay_matches_a_written_out_rule():
    """A run's rows go through each step together (rows of any length, leaving once they
    trigger): each row's trigger step is the one written out here for requests without an
    allow-list or band: 0 if a verdict reaches a threshold, else the first step that ends
    ``tau`` consecutive steps each with some score at or over its threshold."""
    rng = rp.np.random.default_rng(0)
    thresholds = (0.75, 0.5, 0.625)  # exact in float32, as the scores are (multiples of 1/8)

    def expected(row, rule):
        if any((v >= rp.np.array(rule.prompt_thresholds)).any()
               for v in (row.prompt, row.query) if v is not None):
            return 0
        run = 0
        for i, s in enumerate(row.steps, start=1):
            run = run + 1 if (s >= rp.np.array(rule.response_thresholds)).any() else 0
            if run >= rule.tau:
                return i
        return None

    for tau in (1, 2, 3):
        rule = rp.Rule(NAMES, thresholds, thresholds, tau)
        rows = []
        for _ in range(60):
            def scores(*shape, hot=0.3):
                return rng.integers(0, 8, size=shape) / 8 * (rng.random(shape) < hot) + 0.0

            rows.append(_row(None if rng.random() < 0.2 else scores(3, hot=0.1),
                             scores(int(rng.integers(0, 12)), 3), query=scores(3, hot=0.1)
                             if rng.random() < 0.3 else None))
        steps = rp._trigger_steps(rows, rule)
        assert steps == [expected(r, rule) for r in rows] == [rp.trigger_step(r, rule) for r in rows]
        assert len(set(steps)) > 3  # the cases cover prompt, decode and no trigger
