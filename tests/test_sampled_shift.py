"""The response rule under sampled decoding: a head's (temperature, shift) points move the
overall output's response threshold by the request's temperature, and nothing else."""

from __future__ import annotations

import pytest

from safeserve.models.decision_defaults import overall_shift_at, sampled_overall_shift_points
from safeserve.models.taxonomy import Taxonomy
from safeserve.server.protocol import ChatCompletionRequest
from safeserve.server.prepare import sampling_temperature, shift_temperature
from safeserve.server.safety_config import SafetyPolicy, shift_probability

POINTS = ((0.7, 1.0), (1.0, 2.0))


@pytest.mark.parametrize("temperature,shift", [
    (0.0, 0.0), (0.35, 0.5), (0.7, 1.0), (0.85, 1.5), (1.0, 2.0), (1.5, 2.0), (2.0, 2.0)])
def test_the_shift_is_linear_between_points_and_flat_past_the_last(temperature, shift):
    assert overall_shift_at(POINTS, temperature) == pytest.approx(shift)
    assert overall_shift_at((), temperature) == 0.0


@pytest.mark.parametrize("bad", [
    [[0.0, 1.0]], [[2.5, 1.0]], [[1.0, 11.0]], [[1.0]], [["1", 1.0]], [[True, 1.0]],
    [[1.0, float("nan")]], [[1.0, 1.0], [0.7, 0.5]], [[0.7, 1.0], [0.7, 2.0]], 1.5, 0, "",
    {"1.0": 2.0}, [[1.0, -0.5]]])
def test_a_malformed_point_list_is_refused(bad):
    with pytest.raises(ValueError, match="sampled_overall_shift"):
        sampled_overall_shift_points({"operating_point": {"sampled_overall_shift": bad}})


def test_shifts_only_loosen():
    """A request's own threshold.unsafe replaces the shifted threshold and authorization
    compares it with the unshifted one: a tightening shift could be dropped that way."""
    from safeserve.models.decision_defaults import allowlist_overall_shift

    assert allowlist_overall_shift({}) == 2.0
    assert allowlist_overall_shift({"operating_point": {"allowlist_overall_shift": 0}}) == 0.0
    for bad in (-0.25, 11, True, "1", None):
        with pytest.raises(ValueError, match="allowlist_overall_shift"):
            allowlist_overall_shift({"operating_point": {"allowlist_overall_shift": bad}})


def test_points_are_read_from_the_operating_point():
    extra = {"operating_point": {"sampled_overall_shift": [[0.7, 1], [1.0, 2.5]]}}
    assert sampled_overall_shift_points(extra) == ((0.7, 1.0), (1.0, 2.5))
    assert sampled_overall_shift_points({}) == ()


def test_sampling_temperature_is_what_the_engine_samples_with():
    def body(**kw):
        return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)

    assert sampling_temperature(body()) == 1.0  # OpenAI's default
    assert sampling_temperature(body(temperature=0.0)) == 0.0
    assert sampling_temperature(body(temperature=0.7)) == 0.7
    assert sampling_temperature(body(temperature=0.7, top_p=0.0)) == 0.0  # greedy


@pytest.mark.parametrize("fields,temperature", [
    ({}, 1.0), ({"temperature": 0.7}, 0.7), ({"temperature": 0.7, "top_p": 1.0}, 0.7),
    ({"temperature": 0.7, "top_k": -1}, 0.7), ({"temperature": 0.7, "top_k": 0}, 0.7),
    ({"temperature": 0.7, "min_p": 0.0}, 0.7),
    # greedy outright, or a truncated distribution: not what the shift was calibrated on
    ({"temperature": 2.0, "top_k": 1}, 0.0), ({"min_p": 1.0}, 0.0), ({"top_p": 1e-9}, 0.0),
    ({"temperature": 1e-6}, 0.0), ({"temperature": 1.0, "top_p": 0.9}, 0.0),
    ({"temperature": 1.0, "top_k": 40}, 0.0), ({"temperature": 1.0, "min_p": 0.05}, 0.0)])
def test_the_shift_is_looked_up_only_for_whole_distribution_sampling(fields, temperature):
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)
    assert shift_temperature(body) == temperature


def test_compile_moves_only_the_overall_response_threshold():
    policy = SafetyPolicy(Taxonomy.load(), sampled_overall_shift=POINTS)
    plain = policy.presets["default"]
    greedy = policy.compile(plain, "r", [], 0, temperature=0.0)
    sampled = policy.compile(plain, "r", [], 0, temperature=1.0)
    assert greedy.prompt_thresholds is None  # one table for both phases
    assert sampled.thresholds[:-1] == greedy.thresholds[:-1]  # categories untouched
    assert sampled.thresholds[-1] == pytest.approx(shift_probability(greedy.thresholds[-1], 2.0))
    assert sampled.prompt_thresholds == greedy.thresholds  # the prompt verdict is not sampled
    assert policy.sampled_shift_of(plain, 0.85) == pytest.approx(1.5)

    # an allow-list's shift and the sampled one add up on generated tokens
    listed = plain.model_copy(update={"allow": ("violence",)})
    a0 = policy.compile(listed, "r", [], 0, temperature=0.0)
    a1 = policy.compile(listed, "r", [], 0, temperature=1.0)
    assert a1.thresholds[-1] == pytest.approx(shift_probability(a0.thresholds[-1], 2.0))
    assert a1.prompt_thresholds[-1] == pytest.approx(a0.thresholds[-1])

    # a request that sets the overall threshold itself gets exactly it
    for threshold in ({"unsafe": 0.6}, 0.6):
        own = plain.model_copy(update={"threshold": threshold})
        assert policy.sampled_shift_of(own, 1.0) == 0.0
        assert policy.compile(own, "r", [], 0, temperature=1.0).thresholds[-1] == 0.6
    # a per-category threshold leaves the overall output to the head: still shifted
    cat = plain.model_copy(update={"threshold": {"violence": 0.9}})
    assert policy.sampled_shift_of(cat, 1.0) == pytest.approx(2.0)


def test_a_policy_without_points_samples_like_greedy():
    policy = SafetyPolicy(Taxonomy.load())
    plain = policy.presets["default"]
    sampled = policy.compile(plain, "r", [], 0, temperature=1.0)
    assert sampled.thresholds == policy.compile(plain, "r", [], 0).thresholds
    assert policy.sampled_shift_of(plain, 1.0) == 0.0
    # the overall output at the policy's own threshold (0.5: no shift moved it), no second
    # (sampled) threshold riding beside it
    assert sampled.thresholds[-1] == pytest.approx(0.5)
    assert getattr(sampled, "sampled_overall", None) is None


def test_with_a_clear_margin_the_shift_waits_for_a_clear_prompt():
    """A head whose sampled shift applies to clear prompts only: the compiled response
    thresholds stand, the shifted overall threshold rides beside them for the kernel to use
    once the prompt verdict is clear (margin as e^m), and a prefilled request gets none."""
    import math

    policy = SafetyPolicy(Taxonomy.load(), sampled_overall_shift=POINTS, sampled_clear_margin=1.0)
    plain = policy.presets["default"]
    greedy = policy.compile(plain, "r", [], 0)
    sampled = policy.compile(plain, "r", [], 0, temperature=1.0)
    assert sampled.thresholds == greedy.thresholds and sampled.prompt_thresholds is None
    assert sampled.sampled_overall == pytest.approx(shift_probability(greedy.thresholds[-1], 2.0))
    assert sampled.clear_scale == pytest.approx(math.e)
    assert greedy.sampled_overall is None and greedy.clear_scale == 1.0
    prefilled = policy.compile(plain, "r", [], 0, temperature=1.0, prefilled=True)
    assert prefilled.sampled_overall is None and prefilled.thresholds == greedy.thresholds
    # the wire carries it to the worker
    from safeserve.server import safety_wire as W

    back = W.RowSafetyArgs.from_extra_args(sampled.to_extra_args())
    assert back.sampled_overall == sampled.sampled_overall and back.clear_scale == sampled.clear_scale


@pytest.mark.parametrize("bad", [-1, 11, "1", True])
def test_a_bad_clear_margin_is_refused(bad):
    from safeserve.models.decision_defaults import sampled_clear_margin

    with pytest.raises(ValueError, match="sampled_shift_clear_margin"):
        sampled_clear_margin({"operating_point": {"sampled_shift_clear_margin": bad}})
    assert sampled_clear_margin({}) is None


def test_replay_compiles_the_clear_tables_the_server_compiles():
    from safeserve.models.evaluation import replay as rp

    tax = Taxonomy.load()
    policy = SafetyPolicy(tax, sampled_overall_shift=POINTS, sampled_clear_margin=1.0)
    args = policy.compile(policy.presets["default"], "r", [], 0, temperature=0.85)
    base = [c.threshold for c in tax.categories] + [0.5]
    rule = rp.Rule(tax.output_names, tuple(base), tuple(base),
                   overall_response_shift=policy.sampled_shift_of(policy.presets["default"], 0.85),
                   sampled_clear_margin=1.0)
    k = len(tax.output_names)
    rows = [rp.TracedRow(kind="benign", group="direct", dataset="t", allow=(), prompt=None,
                         query=query, steps=rp.np.zeros((0, k)), refused_by_text=False,
                         answered_by_text=True) for query in (None, rp.np.zeros(k))]
    t = rp._tables(rows, rule)
    import torch

    f32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731
    assert t["thresholds"][0].tolist() == torch.tensor(args.thresholds, dtype=torch.float32).tolist()
    assert t["sampled_overall"][0].item() == f32(args.sampled_overall)
    assert t["sampled_overall"][1].item() == f32(args.thresholds[-1])  # prefilled: no shift
    assert t["clear_scale"][0].item() == f32(args.clear_scale)


def test_replay_applies_the_shift_only_after_a_clear_prompt():
    from safeserve.models.evaluation import replay as rp

    names = ("violence", "unsafe")
    rule = rp.Rule(names, (0.9, 0.5), (0.9, 0.5), tau=2, overall_response_shift=1.0,
                   sampled_clear_margin=1.0)

    def row(prompt, query=None):
        return rp.TracedRow(kind="benign", group="direct", dataset="t", allow=(),
                            prompt=rp.np.array(prompt, dtype=float),
                            query=None if query is None else rp.np.array(query, dtype=float),
                            steps=rp.np.array([[0.1, 0.6]] * 3), refused_by_text=False,
                            answered_by_text=True)

    # the overall output at 0.6: over 0.5, under 0.5 moved +1 logit (0.731)
    assert rp.trigger_step(row([0.1, 0.1]), rule) is None  # clear prompt: shifted
    assert rp.trigger_step(row([0.1, 0.4]), rule) == 2  # 0.4 is within 1 logit of 0.5
    assert rp.trigger_step(row([0.1, 0.1], query=[0.1, 0.1]), rule) == 2  # prefilled


def test_a_clear_margin_must_cover_the_alert_band_and_only_loosen():
    from safeserve.models.decision_defaults import check_sampled_clear_margin

    def point(**kw):
        return {"operating_point": {"alert_margin": 0.5, "alert_tau": 2,
                                    "sampled_overall_shift": [[1.0, 1.5]], **kw}}

    check_sampled_clear_margin(point(sampled_shift_clear_margin=1.0))
    check_sampled_clear_margin(point())  # no margin: nothing to check
    with pytest.raises(ValueError, match="at least the alert band's margin"):
        check_sampled_clear_margin(point(sampled_shift_clear_margin=0.25))
    with pytest.raises(ValueError, match=r"shift in \[0, 10\]"):
        check_sampled_clear_margin(point(sampled_shift_clear_margin=1.0,
                                         sampled_overall_shift=[[1.0, -1.0]]))
