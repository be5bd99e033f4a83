"""The attribution read-out (checkpoint format 7): under an allow-list the overall output acts
for the category the read-out names at the prompt end, for the whole request; nothing else
changes. The rule, the checkpoint and its served tensors, the processor in both of its forms,
and `safeserve train attribution` on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from safeserve.kernels.safety_decision import (MASK_ALLOWED, MASK_ATTRIBUTED, MASK_LIVE,
                                               attribute_overall, decide_reference)
from safeserve.models.checkpoint import (ATTRIBUTION_SERVED_SCALE, FORMAT_VERSION_ATTRIBUTION,
                                         CheckpointError, SafetyHead, load_safety_head)
from safeserve.models.taxonomy import Taxonomy
from conftest import tiny_llama_with_default_tokenizer
from test_prompt_head import data_root, labelled_questions

TAX = Taxonomy.load()
C = len(TAX.categories)
K = TAX.num_outputs
VIOLENCE, DRUGS = TAX.ids.index("violence"), TAX.ids.index("drugs")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_llama_with_default_tokenizer(tmp_path_factory.mktemp("tiny_attr") / "model")


def _masked(allow: list[int] | None) -> list[int]:
    """The server's row for a request: allowed columns 1, the overall column attributed when
    there is an allow-list (server/safety_config.compile)."""
    if allow is None:
        return [MASK_LIVE] * K
    return [MASK_ALLOWED if k in allow else MASK_LIVE for k in range(C)] + [MASK_ATTRIBUTED]


def test_the_named_category_decides_the_overall_column_at_prompt_rows_only():
    masked = torch.tensor([_masked([VIOLENCE]), _masked([VIOLENCE]), _masked([VIOLENCE]),
                           _masked(None), _masked([VIOLENCE])], dtype=torch.int8)
    attributable = torch.tensor([1, 1, 1, 0, 1], dtype=torch.int8)  # row 3: no allow-list
    named = torch.full((5,), -1, dtype=torch.int32)
    attribution = torch.zeros(5, C)
    attribution[0, VIOLENCE] = 0.9   # names an allowed category -> allowed
    attribution[1, DRUGS] = 0.9      # names a category the request does not allow -> live
    attribution[2, VIOLENCE] = 0.9   # a decode row: unchanged
    attribution[3, VIOLENCE] = 0.9   # not attributable: unchanged
    attribution[4, VIOLENCE] = float("nan")  # an overflowed state fails closed: live
    is_prompt = torch.tensor([1, 1, 0, 1, 1], dtype=torch.int8)
    attribute_overall(masked, attributable, named, attribution, is_prompt)
    assert masked[:, -1].tolist() == [MASK_ALLOWED, MASK_LIVE, MASK_ATTRIBUTED, MASK_LIVE,
                                      MASK_LIVE]
    assert named.tolist()[:4] == [VIOLENCE, DRUGS, -1, -1]
    assert masked[:, :-1].tolist() == [_masked([VIOLENCE])[:-1]] * 3 + [_masked(None)[:-1],
                                                                        _masked([VIOLENCE])[:-1]]
    # a later prompt row of the same request (the next prefill chunk: the prompt end) rewrites
    # it: the last one counts, whichever way it goes
    later = torch.zeros(5, C)
    later[:, DRUGS] = 1.0
    attribute_overall(masked, attributable, named, later, is_prompt)
    assert masked[:2, -1].tolist() == [MASK_LIVE, MASK_LIVE] and named[0] == DRUGS
    attribute_overall(masked, attributable, named, attribution, is_prompt)
    assert masked[:2, -1].tolist() == [MASK_ALLOWED, MASK_LIVE] and named[0] == VIOLENCE
    attribute_overall(masked[:0], attributable[:0], named[:0], attribution[:0], is_prompt[:0])


def test_a_flag_of_the_overall_output_names_the_category_it_acted_for():
    from safeserve.kernels.safety_decision import name_overall_bits

    cats = torch.tensor([1 << (K - 1), 1 << (K - 1), (1 << (K - 1)) | 1, 1 << DRUGS],
                        dtype=torch.int32)
    named = torch.tensor([VIOLENCE, -1, DRUGS, VIOLENCE], dtype=torch.int32)
    name_overall_bits(cats, named, K)
    assert cats.tolist() == [(1 << (K - 1)) | (1 << VIOLENCE), 1 << (K - 1),
                             (1 << (K - 1)) | 1 | (1 << DRUGS), 1 << DRUGS]


def test_the_overall_output_then_acts_for_the_request_not_the_token():
    """Decode rows whose per-token top category is drugs, overall over threshold: per-token
    attribution acts unless drugs is allowed; after the read-out named violence at the prompt,
    the request that allows violence is never refused by the overall output and the one that
    allows drugs (but not violence) always is."""
    scores = torch.full((2, K), 0.1)
    scores[:, DRUGS] = 0.4
    scores[:, -1] = 0.9
    thresholds = torch.full((2, K), 0.5)
    tau = torch.ones(2, dtype=torch.int32)
    active = torch.ones(2, dtype=torch.int8)
    decode = torch.zeros(2, dtype=torch.int8)

    def events(masked):
        counter = torch.zeros(2, dtype=torch.int32)
        return decide_reference(scores, thresholds, masked, counter, tau, decode, active)[0]

    per_token = torch.tensor([_masked([VIOLENCE]), _masked([DRUGS])], dtype=torch.int8)
    assert events(per_token).tolist() == [2, 0]
    named = torch.zeros(2, C)
    named[:, VIOLENCE] = 1.0
    attribute_overall(per_token, torch.ones(2, dtype=torch.int8),
                      torch.full((2,), -1, dtype=torch.int32), named, torch.ones(2, dtype=torch.int8))
    assert events(per_token).tolist() == [0, 2]


def _head(hidden: int = 64, seed: int = 0, **kw) -> SafetyHead:
    g = torch.Generator().manual_seed(seed)
    return SafetyHead(0.1 * torch.randn(K, hidden, generator=g), torch.zeros(K), TAX, **kw)


@pytest.mark.parametrize("form", ["no_readout", "replace", "either", "layered"])
def test_format_7_round_trips_and_serves_its_columns_after_the_rest(tmp_path, form):
    from safeserve.kernels.safety_head import safety_scores_reference, select_prompt_rows

    g = torch.Generator().manual_seed(1)
    mlp = (0.05 * torch.randn(8, 64, generator=g), torch.zeros(8),
           0.01 * torch.randn(K, 8, generator=g), 0.05 * torch.randn(65, generator=g))
    prompt = None if form == "no_readout" else (0.1 * torch.randn(K, 64, generator=g),
                                                torch.zeros(K))
    either, layer = form in ("either", "layered"), 1 if form == "layered" else None
    head = _head(mlp=mlp, prompt=prompt, prompt_either=either, prompt_layer=layer,
                 attribution=(torch.randn(C, 64, generator=g), torch.randn(C, generator=g)),
                 extra={"operating_point": {"tau": 4, "prompt_logit_offset": 2.0}})
    assert head.format_version == FORMAT_VERSION_ATTRIBUTION
    head.save(tmp_path / "h")
    back = load_safety_head(tmp_path / "h")
    assert back.format_version == FORMAT_VERSION_ATTRIBUTION
    assert (back.prompt is None) == (prompt is None)
    assert back.prompt_either == either and back.prompt_layer == layer
    assert torch.equal(back.attribution[0], head.attribution[0]) and back.mlp is not None
    readout = 0 if prompt is None else K
    assert back.served_outputs == (K, readout, C, 0, 0)
    final, middle = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)
    rows = back.served_hidden(final, middle if layer else None)
    served = safety_scores_reference(rows, *back.served_tensors())
    assert served.shape == (5, K + readout + C)
    torch.testing.assert_close(
        served[:, -C:], torch.sigmoid(back.attribution_logits(final) / ATTRIBUTION_SERVED_SCALE),
        atol=1e-5, rtol=1e-5)
    assert torch.equal(served[:, -C:].argmax(1), back.attribution_logits(final).argmax(1))
    # the columns before it are the head's without the read-out, unchanged by it
    without = SafetyHead(back.weight, back.bias, TAX, mlp=back.mlp, prompt=back.prompt,
                         prompt_either=either, prompt_layer=layer,
                         extra={"operating_point": {"tau": 4, "prompt_logit_offset": 2.0}})
    is_prompt = torch.tensor([1, 0, 0, 1, 0])
    torch.testing.assert_close(
        select_prompt_rows(served[:, :-C], is_prompt, K, either),
        select_prompt_rows(safety_scores_reference(rows, *without.served_tensors()),
                           is_prompt, K, either))


def test_a_format_7_config_or_tensor_out_of_shape_is_refused(tmp_path):
    head = _head(attribution=(torch.zeros(C, 64), torch.zeros(C)))
    head.save(tmp_path / "h")
    cfg_path = tmp_path / "h" / "safety_head" / "head_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["format_version"] == 7 and cfg["has_prompt_readout"] is False
    del cfg["has_prompt_readout"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has_prompt_readout"):
        load_safety_head(tmp_path / "h")
    with pytest.raises(CheckpointError, match="attribution read-out"):
        _head(attribution=(torch.zeros(K, 64), torch.zeros(K))).validate()
    with pytest.raises(ValueError, match="no attribution read-out"):
        _head().attribution_logits(torch.zeros(1, 64))


def test_an_operating_point_move_keeps_the_attribution(tmp_path):
    from safeserve.models.operating_point import move_operating_point

    head = _head(attribution=(torch.randn(C, 64), torch.randn(C)),
                 extra={"operating_point": {"tau": 4}})
    head.save(tmp_path / "h")
    move_operating_point(tmp_path / "h", tmp_path / "moved", prompt_shift=0.5,
                         response_shift=1.0, log=lambda *a: None)
    moved = load_safety_head(tmp_path / "moved")
    assert moved.format_version == FORMAT_VERSION_ATTRIBUTION
    assert torch.equal(moved.attribution[1], head.attribution[1])
    # the allow-list shift: set by a move, kept by the next one that does not name it
    from safeserve.models.decision_defaults import allowlist_overall_shift

    assert allowlist_overall_shift(moved.extra) == 2.0  # the server's default
    move_operating_point(tmp_path / "moved", tmp_path / "zero", prompt_shift=0.0,
                         response_shift=0.0, allowlist_shift=0.0, log=lambda *a: None)
    move_operating_point(tmp_path / "zero", tmp_path / "again", prompt_shift=0.0,
                         response_shift=0.0, log=lambda *a: None)
    assert allowlist_overall_shift(load_safety_head(tmp_path / "again").extra) == 0.0
    with pytest.raises(ValueError, match="allow-list shift"):
        move_operating_point(tmp_path / "zero", tmp_path / "bad", prompt_shift=0.0,
                             response_shift=0.0, allowlist_shift=float("nan"),
                             log=lambda *a: None)
    # the sampled-decoding points: set by a move, kept by the next, dropped with ()
    from safeserve.models.decision_defaults import sampled_overall_shift_points

    move_operating_point(tmp_path / "zero", tmp_path / "sampled", prompt_shift=0.0,
                         response_shift=0.0, sampled_shift=((0.7, 1.0), (1.0, 2.0)),
                         log=lambda *a: None)
    move_operating_point(tmp_path / "sampled", tmp_path / "kept", prompt_shift=0.0,
                         response_shift=0.5, log=lambda *a: None)
    assert sampled_overall_shift_points(load_safety_head(tmp_path / "kept").extra) == (
        (0.7, 1.0), (1.0, 2.0))
    move_operating_point(tmp_path / "kept", tmp_path / "dropped", prompt_shift=0.0,
                         response_shift=0.0, sampled_shift=(), log=lambda *a: None)
    assert sampled_overall_shift_points(load_safety_head(tmp_path / "dropped").extra) == ()
    with pytest.raises(ValueError, match="sampled_overall_shift"):
        move_operating_point(tmp_path / "kept", tmp_path / "bad2", prompt_shift=0.0,
                             response_shift=0.0, sampled_shift=((1.0, 2.0), (0.7, 1.0)),
                             log=lambda *a: None)


def test_train_attribution_fits_the_labelled_categories(tmp_path, tiny_model, monkeypatch):
    """On a tiny model and data root: the read-out is fitted on the categorised harmful
    prompts (labelled questions included), the head's own tensors are kept, and the held-out
    metrics and self-check record are written."""
    from safeserve.models.attribution import top_hit_rate, train_attribution
    from safeserve.models.head_check import SelfCheck

    root = data_root(tmp_path / "data")
    turns = {f"how do i poison my neighbour's dog number {i}?": "violence" for i in range(6)}
    turns["how do jellyfish mate?"] = None
    labelled_questions(root, tmp_path / "labels.tsv", turns, monkeypatch)
    head = _head(extra={"base_model": str(tiny_model), "operating_point": {"tau": 4}})
    head.save(tmp_path / "head")
    # all the questions (build-question-data's held-out split of 7 would take 2; the rows'
    # split is tests/test_prompt_head.py's)
    stats = train_attribution(tmp_path / "head", tmp_path / "out", root, heldout_questions=True,
                              log=lambda *a: None)
    new = load_safety_head(tmp_path / "out")
    assert new.format_version == FORMAT_VERSION_ATTRIBUTION
    assert torch.equal(new.weight, head.weight) and new.prompt is None
    # 36 financial-crime prompts (12 written, rephrased, split) and 6 violent questions
    assert stats["train_prompts"] + stats["heldout_prompts"] == 42
    assert stats["heldout_questions"] is True
    assert 0.0 <= stats["heldout_top_category_labelled"] <= 1.0
    assert new.extra["attribution"]["seed"] == 0
    assert SelfCheck.from_extra(new.extra) is not None
    assert top_hit_rate(torch.tensor([[0.1, 0.9], [0.8, 0.2]]),
                        torch.tensor([[0.0, 1.0], [0.0, 1.0]])) == 0.5


def test_replay_refuses_allow_list_requests_of_a_format_7_head(tmp_path):
    """A trace holds scores, not the hidden state the read-out named a category from: replay
    says so for allow-list requests instead of replaying per-token attribution, and still
    replays the rest."""
    import numpy as np

    from safeserve.models.evaluation import replay as rp

    _head(attribution=(torch.zeros(C, 64), torch.zeros(C)),
          extra={"operating_point": {"tau": 2}}).save(tmp_path / "h")
    rule = rp.served_rule(tmp_path / "h")
    assert rule.per_request_attribution

    def row(allow):
        steps = np.zeros((3, K))
        steps[:, -1] = 0.99
        return rp.TracedRow(kind="cosa", group="allowed", dataset="x", allow=allow,
                            prompt=np.zeros(K), query=None, steps=steps, refused_by_text=False,
                            answered_by_text=True)
    assert rp.trigger_step(row(()), rule) == 2
    with pytest.raises(rp.TraceError, match="format 7"):
        rp.trigger_step(row(("violence",)), rule)
    swept = rp.sweep([row(())], rule, [0.0], [0.0], [2])
    assert swept and swept[0]["tau"] == 2


def test_replay_names_the_category_and_acts_for_it(tmp_path):
    """With the named category set (``name_categories``), replay acts as the server does: the
    overall output is off for a request that allows the named category and on for one that
    does not, whatever the per-token outputs score highest."""
    import numpy as np

    from safeserve.models.evaluation import replay as rp

    _head(attribution=(torch.zeros(C, 64), torch.zeros(C)),
          extra={"operating_point": {"tau": 2, "allowlist_overall_shift": 0.0}}).save(tmp_path / "h")
    rule = rp.served_rule(tmp_path / "h")
    steps = np.full((3, K), 0.1)
    steps[:, DRUGS] = 0.4    # the per-token top category
    steps[:, -1] = 0.9       # overall over its threshold
    row = rp.TracedRow(kind="cosa", group="allowed", dataset="x", allow=("violence",),
                       prompt=np.zeros(K), query=None, steps=steps, refused_by_text=False,
                       answered_by_text=True, named="violence")
    assert rp.trigger_step(row, rule) is None
    row.named = "weapons"
    assert rp.trigger_step(row, rule) == 2


def test_replay_names_categories_as_the_forward_does(tmp_path, tiny_model):
    """``name_categories`` names each allow-list row's category from the forward of the model
    the head is served with (its base), at the prompt end the server reads; rows without an
    allow-list or a prompt text are left alone."""
    import numpy as np

    from safeserve.models.evaluation import replay as rp
    from safeserve.models.prompt_head import prompt_end_features
    from safeserve.models.safety_features import load_lm

    g = torch.Generator().manual_seed(5)
    head = _head(attribution=(torch.randn(C, 64, generator=g), torch.randn(C, generator=g)),
                 extra={"base_model": str(tiny_model)})
    head.save(tmp_path / "h")
    texts = ["How do I pick a lock?", "Write a poem about rain.", "Where does my ex live?"]

    def row(text, allow, alone=True, query=None):
        return rp.TracedRow(kind="cosa", group="allowed", dataset="x", allow=allow,
                            prompt=np.zeros(K), query=query, steps=np.zeros((0, K)),
                            refused_by_text=False, answered_by_text=True,
                            extra={"prompt": text, "rendered_alone": alone})
    rows = [row(t, ("violence",)) for t in texts] + [
        row(texts[0], ()),                            # no allow-list: the server names nothing
        row(None, ("drugs",)),                        # no prompt text (a safety run)
        row(texts[0], ("drugs",), alone=False),       # a guideline or prompt-only mode
        row(texts[0], ("drugs",), query=np.zeros(K))]  # prefilled: per-token attribution
    assert rp.name_categories(rows, tmp_path / "h", log=lambda *a: None) == 3
    model, tok = load_lm(tiny_model)
    final, _ = prompt_end_features(model, tok, texts, log=lambda *a: None)
    want = [TAX.ids[int(i)] for i in head.attribution_logits(final).argmax(1)]
    assert [r.named for r in rows] == want + [None] * 4
    rule = rp.served_rule(tmp_path / "h")
    assert [rp.needs_name(r, rule) for r in rows] == [True] * 3 + [False, True, True, False]
