"""The topic gate (checkpoint format 8): under a non-empty allow-list, a category the request
does not allow whose gate is open flags the prompt for that category; nothing else changes.
The rule, the checkpoint and its served columns, the processor in both of its forms, and
`safeserve train topic-gate` on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from safeserve.kernels.safety_decision import EVENT_TRIGGER, gate_topics
from safeserve.models.checkpoint import (ATTRIBUTION_SERVED_SCALE, FORMAT_VERSION_TOPIC,
                                         CheckpointError, load_safety_head)
from conftest import tiny_llama_with_default_tokenizer
from test_attribution import C, DRUGS, K, VIOLENCE, _head, _masked
from test_prompt_head import data_root, labelled_questions


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_llama_with_default_tokenizer(tmp_path_factory.mktemp("tiny_topic") / "model")


def _gate(masked_rows, gated, topic, is_prompt, event=None, cats=None, alert=None):
    n = len(masked_rows)
    event = torch.zeros(n, dtype=torch.int32) if event is None else event
    cats = torch.zeros(n, dtype=torch.int32) if cats is None else cats
    alert = torch.ones(n, dtype=torch.int32) if alert is None else alert
    gate_topics(event, cats, alert, torch.tensor(masked_rows, dtype=torch.int8),
                torch.tensor(gated, dtype=torch.int8), topic,
                torch.tensor(is_prompt, dtype=torch.int8))
    return event.tolist(), cats.tolist(), alert.tolist()


def test_a_prompt_about_a_category_the_request_does_not_allow_is_flagged_for_it():
    allow_violence = _masked([VIOLENCE])
    topic = torch.full((6, C), 0.2)
    topic[0, VIOLENCE] = 0.9               # open, but allowed: nothing
    topic[1, DRUGS] = 0.9                  # open, not allowed: flagged for drugs
    topic[2, DRUGS] = 0.9                  # a decode row: the gate reads prompt ends only
    topic[3, DRUGS] = 0.9                  # not gated (no allow-list, or a prefill): nothing
    topic[4, DRUGS] = float("nan")         # an overflowed state fails closed
    topic[5, DRUGS] = 0.5                  # open at exactly 0.5 (logit 0)
    event, cats, alert = _gate([allow_violence] * 6, [1, 1, 1, 0, 1, 1], topic,
                               [1, 1, 0, 1, 1, 1])
    bits = gate_topics(torch.zeros(6, dtype=torch.int32), torch.zeros(6, dtype=torch.int32), None,
                       torch.tensor([allow_violence] * 6, dtype=torch.int8),
                       torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.int8), topic,
                       torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.int8))
    assert bits.tolist() == [0, 1 << DRUGS, 0, 0, 1 << DRUGS, 1 << DRUGS]  # the gate's own
    assert event == [0, EVENT_TRIGGER, 0, 0, EVENT_TRIGGER, EVENT_TRIGGER]
    assert cats == [0, 1 << DRUGS, 0, 0, 1 << DRUGS, 1 << DRUGS]
    assert alert == [1, 0, 1, 1, 0, 0]     # a flagged verdict is never an alert
    # the decision's own bits are kept, and an earlier trigger stays one
    event, cats, _ = _gate([allow_violence], [1], topic[1:2], [1],
                           event=torch.tensor([EVENT_TRIGGER], dtype=torch.int32),
                           cats=torch.tensor([1 << (K - 1)], dtype=torch.int32))
    assert event == [EVENT_TRIGGER] and cats == [(1 << (K - 1)) | (1 << DRUGS)]
    _gate([], [], torch.zeros(0, C), [])  # an empty step is a no-op


def test_format_8_round_trips_and_serves_its_columns_last(tmp_path):
    from safeserve.kernels.safety_head import safety_scores_reference

    g = torch.Generator().manual_seed(2)
    attribution = (torch.randn(C, 64, generator=g), torch.randn(C, generator=g))
    topic = (torch.randn(C, 64, generator=g), torch.randn(C, generator=g))
    head = _head(attribution=attribution, topic=topic,
                 extra={"operating_point": {"tau": 4, "prompt_logit_offset": 2.0}})
    assert head.format_version == FORMAT_VERSION_TOPIC
    head.save(tmp_path / "h")
    back = load_safety_head(tmp_path / "h")
    assert back.format_version == FORMAT_VERSION_TOPIC
    assert torch.equal(back.topic[1], topic[1]) and torch.equal(back.attribution[0], attribution[0])
    assert back.served_outputs == (K, 0, C, C, 0)
    final = torch.randn(5, 64, generator=g)
    served = safety_scores_reference(final, *back.served_tensors())
    assert served.shape == (5, K + 2 * C)
    torch.testing.assert_close(
        served[:, -C:], torch.sigmoid(back.topic_logits(final) / ATTRIBUTION_SERVED_SCALE),
        atol=1e-5, rtol=1e-5)
    # open at served 0.5 exactly when the logit is >= 0
    assert torch.equal(served[:, -C:] >= 0.5, back.topic_logits(final) >= 0)
    # the columns before it are the format-7 head's, unchanged by the gate
    seven = _head(attribution=attribution,
                  extra={"operating_point": {"tau": 4, "prompt_logit_offset": 2.0}})
    torch.testing.assert_close(served[:, :-C], safety_scores_reference(final, *seven.served_tensors()))


def test_a_topic_gate_needs_an_attribution_read_out_and_its_tensors(tmp_path):
    with pytest.raises(CheckpointError, match="topic gate"):
        _head(topic=(torch.zeros(C, 64), torch.zeros(C))).validate()
    with pytest.raises(CheckpointError, match="topic gate"):
        _head(attribution=(torch.zeros(C, 64), torch.zeros(C)),
              topic=(torch.zeros(K, 64), torch.zeros(K))).validate()
    with pytest.raises(ValueError, match="no topic gate"):
        _head().topic_logits(torch.zeros(1, 64))
    _head(attribution=(torch.zeros(C, 64), torch.zeros(C)),
          topic=(torch.zeros(C, 64), torch.zeros(C))).save(tmp_path / "h")
    from safetensors.torch import load_file, save_file

    path = tmp_path / "h" / "safety_head" / "head.safetensors"
    tensors = load_file(str(path))
    del tensors["topic_bias"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="format 8 .* lacks"):
        load_safety_head(tmp_path / "h")


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-synced", "sync-free"])
def test_the_worker_flags_an_allow_listed_prompt_by_its_topic(sync_free):
    """Two requests allowing violence, the same harm scores (all under threshold) and one
    named category: the one whose topic gate opens for drugs is refused at the prompt, the
    flag naming drugs; the one whose gate opens for violence only is answered; a request with
    no allow-list is never gated. Reported scores stay the decision's K."""
    from safeserve.kernels.safety_decision import MASK_ATTRIBUTED
    from test_safety_processor import _args, _processor, _step

    proc, sent = _processor(sync_free=sync_free)
    proc.prompt_either, proc.n_attribution, proc.n_topic = True, 9, 9
    allow_violence = [1] + [0] * 8 + [MASK_ATTRIBUTED]
    outs = [[], [], []]
    proc._add(0, _args("about_violence", masked=allow_violence, alert_scale=1.0, alert_tau=0),
              outs[0])
    proc._add(1, _args("about_drugs", masked=allow_violence, alert_scale=1.0, alert_tau=0),
              outs[1])
    proc._add(2, _args("no_allow_list", alert_scale=1.0, alert_tau=0), outs[2])
    quiet = [0.1] * 10
    named = [0.9] + [0.1] * 8
    topic = {"violence": [0.9] + [0.1] * 8, "drugs": [0.9, 0.1, 0.8] + [0.1] * 6}
    _step(proc, [quiet + quiet + named + topic["violence"], quiet + quiet + named + topic["drugs"],
                 quiet + quiet + named + topic["drugs"]])
    by_rid = {r.rid: r for r in sent}
    assert by_rid["about_violence"].scores == pytest.approx(quiet)
    assert by_rid["about_violence"].event == 0 and by_rid["no_allow_list"].event == 0
    assert by_rid["about_drugs"].event == 2 and by_rid["about_drugs"].cats == 1 << 2
    # the report says the flag was the gate's (the tracker turns it into prompt.gated)
    assert [by_rid[r].gate for r in ("about_violence", "about_drugs", "no_allow_list")] == [0, 1 << 2, 0]
    sent.clear()
    outs[0].append(7)
    for _ in range(3):  # its tokens: the gate reads prompt ends only
        _step(proc, [quiet + quiet + named + topic["drugs"]])
        outs[0].append(8)
    assert [r.event for r in sent] == [0, 0, 0]


def test_train_topic_gate_fits_categories_against_benign_prompts(tmp_path, tiny_model,
                                                                 monkeypatch):
    """On a tiny model and data root: the gate is fitted beside the head's own tensors and
    attribution read-out, its thresholds folded into the bias, held-out rates written."""
    from safeserve.models.head_check import SelfCheck
    from safeserve.models.topic_gate import gate_thresholds, train_topic_gate

    root = data_root(tmp_path / "data")
    turns = {f"how do i poison my neighbour's dog number {i}?": "violence" for i in range(6)}
    turns.update({f"how do jellyfish mate, part {i}?": None for i in range(4)})
    labelled_questions(root, tmp_path / "labels.tsv", turns, monkeypatch)
    head = _head(attribution=(torch.zeros(C, 64), torch.zeros(C)),
                 extra={"base_model": str(tiny_model), "operating_point": {"tau": 4}})
    head.save(tmp_path / "head")
    with pytest.raises(ValueError, match="target_fpr"):
        train_topic_gate(tmp_path / "head", tmp_path / "bad", root, target_fpr=0.0)
    _head(extra={"base_model": str(tiny_model)}).save(tmp_path / "plain")
    with pytest.raises(ValueError, match="attribution read-out"):
        train_topic_gate(tmp_path / "plain", tmp_path / "bad", root)
    stats = train_topic_gate(tmp_path / "head", tmp_path / "out", root, shift=0.5,
                             log=lambda *a: None)
    new = load_safety_head(tmp_path / "out")
    assert new.format_version == FORMAT_VERSION_TOPIC
    assert torch.equal(new.weight, head.weight) and torch.equal(new.attribution[0],
                                                                head.attribution[0])
    assert stats["shift_logits"] == 0.5 and len(stats["thresholds_logits"]) == C
    assert 0.0 <= stats["heldout_benign_open"] <= 1.0
    assert new.extra["topic_gate"]["seed"] == 0
    assert SelfCheck.from_extra(new.extra) is not None
    saved = json.loads((tmp_path / "out" / "safety_head" / "metrics.json").read_text())
    assert saved["topic_gate"]["target_fpr"] == 0.02
    benign = torch.tensor([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [3.0, 4.0], [4.0, 5.0]])
    assert gate_thresholds(benign, 0.25, 1.0).tolist() == [4.0, 5.0]
    # refitting a head whose gate was moved (format 9): the old gate's point does not carry
    # over to the new gate, which opens exactly at the thresholds it records
    new.extra = {**new.extra, "operating_point": {
        "tau": 4, "topic_gate_shift": -0.5, "gate_replaces_prompt_categories": True}}
    new.save(tmp_path / "moved")
    said = []
    train_topic_gate(tmp_path / "moved", tmp_path / "refit", root, shift=0.5, log=said.append)
    refit = load_safety_head(tmp_path / "refit")
    assert refit.format_version == FORMAT_VERSION_TOPIC
    assert not refit.gate_replaces_prompt_categories and refit.extra["operating_point"]["tau"] == 4
    assert torch.equal(refit._topic_bias(), refit.topic[1].float())
    assert any("reset" in m for m in said)


def test_replay_applies_the_gate_it_names_from_the_forward(tmp_path):
    """`eval replay` names a format-8 head's gated categories with the attribution (from the
    transformers forward, ``name_categories``): a row whose gate opened for a category it does
    not allow is acted on at the prompt, one whose gate opened for an allowed one is not."""
    import numpy as np

    from safeserve.models.evaluation import replay as rp

    _head(attribution=(torch.zeros(C, 64), torch.zeros(C)),
          topic=(torch.zeros(C, 64), torch.zeros(C)),
          extra={"operating_point": {"tau": 2}}).save(tmp_path / "h")
    rule = rp.served_rule(tmp_path / "h")

    def row(gated):
        return rp.TracedRow(kind="cosa", group="disallowed", dataset="x", allow=("violence",),
                            prompt=np.zeros(K), query=None, steps=np.zeros((3, K)),
                            refused_by_text=False, answered_by_text=True, named="violence",
                            gated=gated)
    assert rp.trigger_step(row(("drugs",)), rule) == 0
    assert rp.trigger_step(row(("violence",)), rule) is None
    assert rp.trigger_step(row(()), rule) is None


# --------------------------------------------------------------------------------------
# Format 9: the gate's operating point (its shift, and whether it replaces the per-category
# outputs at gated prompts)
# --------------------------------------------------------------------------------------


def test_gated_prompt_rows_leave_their_categories_to_the_gate():
    from safeserve.kernels.safety_decision import (MASK_ALLOWED, MASK_ATTRIBUTED, MASK_LIVE,
                                                   mask_gated_prompt_categories)

    table = torch.tensor([_masked([VIOLENCE])] * 4 + [[MASK_LIVE] * K], dtype=torch.int8)
    before = table.clone()
    # rows: gated prompt, gated decode, ungated prompt, gated prompt; row 4 is not in the step
    out = mask_gated_prompt_categories(table, torch.tensor([1, 1, 0, 1, 1], dtype=torch.int8),
                                       torch.tensor([1, 0, 1, 1], dtype=torch.int8))
    assert torch.equal(table, before)  # the request's own masks are untouched
    assert out[0, :-1].tolist() == [MASK_ALLOWED] * C and out[3, :-1].tolist() == [MASK_ALLOWED] * C
    assert out[0, -1] == MASK_ATTRIBUTED  # the overall output still acts for its category
    assert torch.equal(out[1:3], table[1:3]) and torch.equal(out[4], table[4])
    empty = mask_gated_prompt_categories(table, torch.zeros(5, dtype=torch.int8),
                                         torch.zeros(0, dtype=torch.int8))
    assert torch.equal(empty, table)


def _gate_head(point: dict):
    g = torch.Generator().manual_seed(5)
    mlp = (0.05 * torch.randn(8, 64, generator=g), torch.zeros(8),
           0.01 * torch.randn(K, 8, generator=g), 0.05 * torch.randn(65, generator=g))
    return _head(attribution=(torch.randn(C, 64, generator=g), torch.randn(C, generator=g)),
                 topic=(torch.randn(C, 64, generator=g), torch.randn(C, generator=g)),
                 mlp=mlp, extra={"operating_point": {"tau": 4, **point}})


def test_format_9_moves_the_gate_in_what_it_serves_and_what_replay_names(tmp_path):
    from safeserve.kernels.safety_head import safety_scores_reference
    from safeserve.models.checkpoint import FORMAT_VERSION_TOPIC_POINT

    plain = _gate_head({})
    moved = _gate_head({"topic_gate_shift": -0.5, "gate_replaces_prompt_categories": True})
    assert plain.format_version == FORMAT_VERSION_TOPIC
    assert moved.format_version == FORMAT_VERSION_TOPIC_POINT
    moved.save(tmp_path / "h")
    back = load_safety_head(tmp_path / "h")
    assert back.format_version == FORMAT_VERSION_TOPIC_POINT and back.gate_replaces_prompt_categories
    # everything else the head carries comes back (format 9 once loaded without its MLP)
    assert back.mlp_units == 8 and all(torch.equal(a, b) for a, b in zip(back.mlp, moved.mlp))
    assert torch.equal(back.attribution[0], moved.attribution[0])
    final = torch.randn(7, 64, generator=torch.Generator().manual_seed(6))
    # 0.5 logits more sensitive: the tensors are the trained ones, the point moves the bias
    assert torch.equal(back.topic[1], plain.topic[1])
    torch.testing.assert_close(back.topic_logits(final), plain.topic_logits(final) + 0.5)
    served = safety_scores_reference(final, *back.served_tensors())
    assert torch.equal(served[:, -C:] >= 0.5, back.topic_logits(final) >= 0)
    for bad in ({"topic_gate_shift": "far"}, {"gate_replaces_prompt_categories": 1},
                {"topic_gate_shift": 99.0}):
        with pytest.raises(CheckpointError, match="operating_point"):
            _gate_head(bad).validate()
    with pytest.raises(CheckpointError, match="does not have"):
        _head(extra={"operating_point": {"topic_gate_shift": 1.0}}).validate()


def test_moving_a_gated_heads_operating_point_keeps_and_moves_its_gate(tmp_path):
    """`train operating-point` on a format-8 head: the gate survives a move of the other
    thresholds, its shift adds up over moves, and the replacement flag is kept unless set."""
    from safeserve.models.operating_point import move_operating_point

    quiet = lambda *a: None  # noqa: E731
    _gate_head({}).save(tmp_path / "a")
    move_operating_point(tmp_path / "a", tmp_path / "b", prompt_shift=0.0, response_shift=0.5,
                         log=quiet)
    b = load_safety_head(tmp_path / "b")
    assert b.topic is not None and b.format_version == FORMAT_VERSION_TOPIC
    move_operating_point(tmp_path / "b", tmp_path / "c", prompt_shift=0.0, response_shift=0.0,
                         gate_shift=-0.25, gate_replaces=True, log=quiet)
    move_operating_point(tmp_path / "c", tmp_path / "d", prompt_shift=0.0, response_shift=0.0,
                         gate_shift=-0.25, log=quiet)
    d = load_safety_head(tmp_path / "d")
    assert d.gate_replaces_prompt_categories and d.mlp_units == b.mlp_units == 8
    assert d.extra["operating_point"]["topic_gate_shift"] == pytest.approx(-0.5)
    final = torch.randn(3, 64)
    torch.testing.assert_close(d.topic_logits(final), b.topic_logits(final) + 0.5)
    _head().save(tmp_path / "plain")
    with pytest.raises(ValueError, match="no topic gate"):
        move_operating_point(tmp_path / "plain", tmp_path / "e", prompt_shift=0.0,
                             response_shift=0.0, gate_shift=1.0, log=quiet)


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-synced", "sync-free"])
def test_a_gate_that_replaces_the_categories_judges_gated_prompts_alone(sync_free):
    """The harm head's drugs output is over its threshold at three prompts, the gate closed.
    With the gate replacing the per-category outputs, the request that allows violence is
    answered (the gate judges its categories); the same scores flag a request without an
    allow-list, and the allow-listed request's own tokens are still judged by every output.
    The overall output still acts at a gated prompt."""
    from safeserve.kernels.safety_decision import MASK_ATTRIBUTED
    from test_safety_processor import _args, _processor, _step

    proc, sent = _processor(sync_free=sync_free)
    proc.prompt_either, proc.n_attribution, proc.n_topic = True, 9, 9
    proc.gate_replaces = True
    allow_violence = [1] + [0] * 8 + [MASK_ATTRIBUTED]
    outs = [[], [], []]
    kw = dict(alert_scale=1.0, alert_tau=0)
    proc._add(0, _args("allow_listed", masked=allow_violence, **kw), outs[0])
    proc._add(1, _args("no_allow_list", **kw), outs[1])
    proc._add(2, _args("overall", masked=allow_violence, **kw), outs[2])
    drugs = [0.1, 0.1, 0.9] + [0.1] * 7
    overall = [0.1] * 9 + [0.9]
    named_drugs = [0.1, 0.1, 0.9] + [0.1] * 6
    closed = [0.1] * 9
    _step(proc, [drugs + drugs + named_drugs + closed, drugs + drugs + named_drugs + closed,
                 overall + overall + named_drugs + closed])
    by_rid = {r.rid: r for r in sent}
    assert by_rid["allow_listed"].event == 0
    assert by_rid["allow_listed"].scores == pytest.approx(drugs)  # reported: the head's
    assert by_rid["no_allow_list"].event == 2 and by_rid["no_allow_list"].cats & (1 << 2)
    assert by_rid["overall"].event == 2  # named drugs, not allowed: the overall output acts
    sent.clear()
    outs[0].append(7)
    for _ in range(3):  # its tokens: drugs over threshold three times running triggers
        _step(proc, [drugs + drugs + named_drugs + closed])
        outs[0].append(8)
    assert [r.event for r in sent] == [1, 1, 2]


def test_replay_leaves_a_gated_prompts_categories_to_the_gate(tmp_path):
    import numpy as np

    from safeserve.models.evaluation import replay as rp

    _gate_head({"gate_replaces_prompt_categories": True}).save(tmp_path / "h")
    _gate_head({}).save(tmp_path / "h8")
    rule, rule8 = rp.served_rule(tmp_path / "h"), rp.served_rule(tmp_path / "h8")
    assert rule.gate_replaces_prompt_categories and not rule8.gate_replaces_prompt_categories
    prompt = np.zeros(K)
    prompt[DRUGS] = 1.0  # the drugs output at the prompt, over any threshold

    def row(allow):
        return rp.TracedRow(kind="cosa", group="allowed", dataset="x", allow=allow,
                            prompt=prompt, query=None, steps=np.zeros((3, K)),
                            refused_by_text=False, answered_by_text=True,
                            named="violence" if allow else None)
    assert rp.trigger_step(row(("violence",)), rule) is None
    assert rp.trigger_step(row(("violence",)), rule8) == 0
    assert rp.trigger_step(row(()), rule) == 0  # no allow-list: not gated, judged as before


def test_prompt_thresholds_say_which_outputs_the_prompt_verdict_compared():
    """Under a head whose gate judges an allow-listed prompt's categories (format 9), the
    echoed prompt thresholds are None for the per-category outputs (not compared there) and
    the overall output's stays; without an allow-list, for a prefilled request (its query
    verdict reads every output) or under a head whose gate does not replace them, all are
    numbers."""
    from safeserve.models.taxonomy import Taxonomy
    from safeserve.server.safety_config import SafetyPolicy

    tax = Taxonomy.load()
    replacing = SafetyPolicy(tax, gate_replaces_prompt_categories=True)
    beside = SafetyPolicy(tax)

    def echo(policy, body, prefilled=False):
        args = policy.compile(policy.resolve(None, body)[1], "r", [], 0)
        args.prefilled = prefilled
        return policy.prompt_thresholds_echo(args)

    allowed = echo(replacing, {"allow": ["violence"]})
    assert [n for n, t in allowed.items() if t is None] == list(tax.ids)
    assert 0 < allowed["unsafe"] < 1
    for got in (echo(replacing, None), echo(replacing, {"allow": []}),
                echo(replacing, {"allow": ["violence"]}, prefilled=True),
                echo(beside, {"allow": ["violence"]})):
        assert all(t is not None for t in got.values()), got
