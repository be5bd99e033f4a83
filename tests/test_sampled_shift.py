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
    {"1.0": 2.0}])
def test_a_malformed_point_list_is_refused(bad):
    with pytest.raises(ValueError, match="sampled_overall_shift"):
        sampled_overall_shift_points({"operating_point": {"sampled_overall_shift": bad}})


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
    assert (policy.compile(plain, "r", [], 0, temperature=1.0).thresholds
            == policy.compile(plain, "r", [], 0).thresholds)
