"""The worker's logits processor: token forcing, the strategy's state through the persistent
batch, telemetry. Every test that builds a processor (marked @both_forms) runs twice: in the
host-synced form the CPU serves with (work skipped on steps it can prove idle) and in the
sync-free form a GPU runs (fixed work every step, no host sync), here on CPU; both must
behave alike."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from safeserve.server.safety_processor import SafetyLogitsProcessor


def test_forced_rows_keep_only_their_token_and_others_are_untouched(processor_form):
    sync_free = processor_form
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    forced = torch.tensor([-1, 3, -1, 0, 49, -1])
    out = SafetyLogitsProcessor._force(logits.clone(), forced, sync_free=sync_free)
    for i, tok in enumerate(forced.tolist()):
        if tok < 0:
            assert torch.equal(out[i], logits[i])
        else:
            assert out[i, tok] == 0.0 and torch.isfinite(out[i]).sum() == 1
            assert int(out[i].argmax()) == tok


def test_no_forced_row_leaves_the_logits_as_they_were():
    logits = torch.randn(4, 32)
    for sync_free in (False, True):
        out = SafetyLogitsProcessor._force(logits.clone(), torch.full((4,), -1), sync_free=sync_free)
        assert torch.equal(out, logits)


# The form _processor() builds, set by the processor_form fixture (None outside it: a test
# that builds a processor must request it, by @both_forms, to run in both forms).
_SYNC_FREE = [None]


@pytest.fixture(params=[False, True], ids=["host-synced", "sync-free"])
def processor_form(request):
    _SYNC_FREE[0] = request.param
    yield request.param
    _SYNC_FREE[0] = None


both_forms = pytest.mark.usefixtures("processor_form")


def _processor(capacity: int = 4, prompt_offset: float = 0.0, head: str = "default",
               sync_free: bool | None = None):
    """The real processor over a bundled head's width (10 outputs), on CPU, with its
    telemetry captured instead of sent, and the given prompt offset instead of the head's.
    Its form is ``sync_free``'s, else the ``processor_form`` fixture's (@both_forms)."""
    from types import SimpleNamespace

    from safeserve.models.model_store import BUNDLED_HEADS

    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=capacity),
                          model_config=SimpleNamespace(model=str(BUNDLED_HEADS[head])))
    if sync_free is None:
        assert _SYNC_FREE[0] is not None, "a test that builds a processor is marked @both_forms"
        sync_free = _SYNC_FREE[0]
    proc = SafetyLogitsProcessor(cfg, torch.device("cpu"), False)
    proc.sync_free = sync_free
    proc.prompt_offset = prompt_offset
    # the steps below hand [N, K] or [N, 2K] scores (formats 7, 8 and 11: their own tests)
    proc.n_attribution = proc.n_topic = proc.n_veto = 0
    sent = []
    proc.telemetry = SimpleNamespace(sock=object(), send=lambda records, _s: sent.extend(records))
    return proc, sent


def _args(rid: str, **kw):
    import math

    from safeserve.server import safety_wire as W

    base = dict(rid=rid, thresholds=[0.5] * 10, masked=[0] * 10, tau=3, action=W.ACTION_REFUSE,
                refusal_ids=[5, 6], eos_id=0, alert_scale=math.e, alert_tau=1)
    return W.RowSafetyArgs(**{**base, **kw})


def _step(proc, rows_scores, vocab: int = 16):
    from safeserve.server.safety_model import STEP_SIGNAL

    STEP_SIGNAL.scores = torch.tensor(rows_scores, dtype=torch.float32)
    return proc.apply(torch.zeros(len(rows_scores), vocab))


@both_forms
def test_alert_band_state_follows_its_row_through_the_persistent_batch():
    proc, sent = _processor()
    outs = [[], [], []]
    proc._add(0, _args("near"), outs[0])  # prompt 0.3: 0.85 logits short of 0.5, band 1 logit
    proc._add(1, _args("far"), outs[1])  # prompt 0.1: 2.2 logits short
    proc._add(2, _args("query", query_alert=True), outs[2])  # prefill's query was near
    _step(proc, [[0.3] * 10, [0.1] * 10, [0.01] * 10])
    assert proc.alert[:3].tolist() == [1, 0, 1]
    assert [(r.rid, r.index, r.alert) for r in sent] == [("near", 0, 1), ("far", 0, 0), ("query", 0, 1)]
    for o in outs:
        o.append(7)
    # one violating step: the alerted rows act (alert tau 1), the other only counts (tau 3)
    logits = _step(proc, [[0.6] * 10] * 3)
    assert [int(row.argmax()) for row in logits] == [5, 0, 5]
    assert torch.isfinite(logits[1]).all() and proc.phase[:3].tolist() == [1, 0, 1]
    # moves, swaps and a preemption carry the state with the request
    proc._swap(0, 1)
    assert proc.rids[:2] == ["far", "near"] and proc.alert[:2].tolist() == [0, 1]
    proc._park(1)
    proc._clear(1)
    assert proc.alert[1] == 0
    proc._add(3, _args("near"), outs[0])  # resumed: the parked snapshot, not a fresh row
    assert proc.alert[3] == 1 and proc.alert_tau[3] == 1 and proc.phase[3] == 1
    proc._move(3, 1)
    assert proc.rids[1] == "near" and proc.alert[1] == 1 and proc.alert[3] == 0


@both_forms
def test_a_clear_prompts_answer_is_judged_at_the_sampled_overall_threshold():
    """Sampled decoding with a clear margin: a prompt verdict clear by the margin makes the
    row clear (reported in bit 1 of the flags column), and its generated tokens compare the
    overall output against the sampled threshold; a near prompt's do not; the state follows
    its request through moves and a preemption."""
    import math

    proc, sent = _processor()
    outs = [[], [], []]
    sampled = dict(sampled_overall=0.75, clear_scale=math.e, alert_scale=1.0, alert_tau=0, tau=2)
    proc._add(0, _args("clear", **sampled), outs[0])  # prompt 0.1: 2.2 logits short of 0.5
    proc._add(1, _args("near", **sampled), outs[1])  # prompt 0.3: 0.85 short, margin 1
    proc._add(2, _args("greedy", alert_scale=1.0, alert_tau=0, tau=2), outs[2])  # no sampled
    _step(proc, [[0.1] * 10, [0.3] * 10, [0.1] * 10])
    assert proc.clear[:3].tolist() == [1, 0, 1]
    assert [(r.rid, r.clear, r.alert) for r in sent] == [("clear", 1, 0), ("near", 0, 0),
                                                          ("greedy", 1, 0)]
    for o in outs:
        o.append(7)
    # the overall output at 0.6 for two steps: over 0.5, under the clear row's 0.75
    row = [0.1] * 9 + [0.6]
    _step(proc, [row] * 3)
    for o in outs:  # the next token (a step at the same length is a repeat)
        o.append(8)
    logits = _step(proc, [row] * 3)
    assert [int(r.argmax()) for r in logits] == [0, 5, 5]  # tau 2: the others refuse
    assert proc.clear[:3].tolist() == [1, 0, 0]  # a request that acted is clear no more
    proc._swap(0, 1)
    assert proc.clear[:2].tolist() == [0, 1] and proc.sampled_overall[1] == 0.75
    proc._park(1)
    proc._clear(1)
    assert proc.clear[1] == 0
    proc._add(3, _args("clear", **sampled), outs[0])  # resumed: its parked snapshot
    assert proc.clear[3] == 1 and proc.sampled_overall[3] == 0.75
    # the row without a sampled threshold compares its own: clear changes nothing there
    assert proc.sampled_overall[2] == 0.5


@both_forms
def test_a_flagged_prompt_is_not_an_alert():
    proc, sent = _processor()
    proc._add(0, _args("flagged", query_alert=True), [])  # own verdict fires; query was near
    proc._add(1, _args("query-flagged", query_flagged=True, query_cats=1), [])  # row itself near
    proc._add(2, _args("no-band", alert_scale=1.0, alert_tau=0), [])  # no band: never alerted
    _step(proc, [[0.9] * 10, [0.3] * 10, [0.4999] * 10])
    assert proc.alert[:3].tolist() == [0, 0, 0]
    assert [r.alert for r in sent] == [0, 0, 0]


@both_forms
def test_prompt_offset_moves_prompt_rows_only_and_is_what_is_reported():
    """The head's prompt offset (logits) applies to the rows reading a prompt end, before the
    decision and in the telemetry; generated-token rows in the same step are untouched."""
    import math

    proc, sent = _processor(prompt_offset=2.0)
    outs = [[], []]
    proc._add(0, _args("prompt", alert_scale=1.0, alert_tau=0), outs[0])
    proc._add(1, _args("decoding", alert_scale=1.0, alert_tau=0), outs[1])
    outs[1].append(7)  # added before, it has sampled a token since (the list is vLLM's, live)
    _step(proc, [[0.3] * 10, [0.3] * 10])  # logit(0.3) + 2 = 1.15: over 0.5 at the prompt only
    lifted = 1 / (1 + math.exp(-(math.log(0.3 / 0.7) + 2.0)))
    by_rid = {r.rid: r for r in sent}
    assert by_rid["prompt"].scores == pytest.approx([lifted] * 10, abs=1e-6)
    assert by_rid["decoding"].scores == pytest.approx([0.3] * 10, abs=1e-7)
    assert by_rid["prompt"].event == 2 and by_rid["decoding"].event == 0
    assert proc.phase[:2].tolist() == [1, 0]  # the prompt row starts its refusal


@both_forms
def test_a_prompt_readout_judges_prompt_rows_and_the_head_the_rest():
    """Format 4: the step's scores are [N, 2K]; prompt rows are judged (and reported) by the
    read-out's half, generated-token rows by the head's, also on a decode-only step."""
    proc, sent = _processor()
    proc.prompt_either = False  # as a format-4 head's processor: the read-out alone
    outs = [[], [], []]
    proc._add(0, _args("prompt", alert_scale=1.0, alert_tau=0), outs[0])
    proc._add(1, _args("decoding", alert_scale=1.0, alert_tau=0), outs[1])
    proc._add(2, _args("head_only", alert_scale=1.0, alert_tau=0), outs[2])
    outs[1].append(7)
    head_half, readout_half = [0.1] * 10, [0.9] * 10
    _step(proc, [head_half + readout_half, readout_half + head_half, readout_half + head_half])
    by_rid = {r.rid: r for r in sent}
    assert by_rid["prompt"].scores == pytest.approx(readout_half)
    assert by_rid["decoding"].scores == pytest.approx(readout_half)  # its head half is 0.9
    assert by_rid["head_only"].scores == pytest.approx(head_half)  # the head's 0.9 is not read
    assert by_rid["prompt"].event == 2 and by_rid["decoding"].event != 2
    assert by_rid["head_only"].event != 2
    sent.clear()
    for i, out in enumerate(outs):
        out.append(7 + i)
    _step(proc, [head_half + readout_half] * 3)  # decode only
    assert [r.scores for r in sent] == [pytest.approx(head_half)] * 3


@both_forms
def test_the_attribution_columns_name_the_category_the_overall_output_acts_for():
    """Format 7: the step's scores end with C attribution columns. At the prompt row of a
    request with an allow-list the named category decides, for the whole request, whether the
    overall output may act: requests allowing violence, the same over-threshold overall score,
    one named violence (never refused by it, prompt or tokens), one named drugs (refused at the
    prompt, the flag naming drugs). Reported scores are the decision's K, never the extra
    columns. A prefilled request's prompt end is the attacker's text: it keeps per-token
    attribution (here the top per-token category, drugs, is not allowed: refused)."""
    from safeserve.kernels.safety_decision import MASK_ATTRIBUTED

    proc, sent = _processor()
    proc.prompt_either, proc.n_attribution = True, 9
    allow_violence = [1] + [0] * 8 + [MASK_ATTRIBUTED]
    outs = [[], [], []]
    proc._add(0, _args("named_violence", masked=allow_violence, alert_scale=1.0, alert_tau=0),
              outs[0])
    proc._add(1, _args("named_drugs", masked=allow_violence, alert_scale=1.0, alert_tau=0),
              outs[1])
    proc._add(2, _args("prefilled", masked=allow_violence, alert_scale=1.0, alert_tau=0,
                       prefilled=True), outs[2])
    quiet = [0.1] * 9 + [0.9]  # categories under threshold, overall over
    top_drugs = [0.1, 0.1, 0.3] + [0.1] * 6 + [0.9]
    named = {"violence": [0.9] + [0.1] * 8, "drugs": [0.1, 0.1, 0.9] + [0.1] * 6}
    _step(proc, [quiet + quiet + named["violence"], quiet + quiet + named["drugs"],
                 top_drugs + top_drugs + named["violence"]])
    by_rid = {r.rid: r for r in sent}
    assert by_rid["named_violence"].scores == pytest.approx(quiet)
    assert by_rid["named_violence"].event == 0 and by_rid["named_drugs"].event == 2
    assert by_rid["named_drugs"].cats == (1 << 9) | (1 << 2)  # unsafe, for drugs
    assert by_rid["prefilled"].event == 2
    sent.clear()
    outs[0].append(7)
    for _ in range(3):  # its tokens: the overall output stays allowed, whatever they name
        _step(proc, [quiet + quiet + named["drugs"]])
        outs[0].append(8)
    assert [r.event for r in sent] == [0, 0, 0]


@both_forms
def test_the_prompt_end_names_the_category_not_an_earlier_prefill_chunk():
    """vLLM samples a row for every prefill chunk (output length 0): each is a prompt row, and
    the last one, the prompt end, names the category, whichever way the earlier ones went."""
    from safeserve.kernels.safety_decision import MASK_ATTRIBUTED

    proc, sent = _processor()
    proc.prompt_either, proc.n_attribution = True, 9
    allow_violence = [1] + [0] * 8 + [MASK_ATTRIBUTED]
    quiet = [0.1] * 9 + [0.1]
    hot = [0.1] * 9 + [0.9]
    named = {"violence": [0.9] + [0.1] * 8, "drugs": [0.1, 0.1, 0.9] + [0.1] * 6}
    for first, last, want in (("violence", "drugs", 2), ("drugs", "violence", 0)):
        sent.clear()
        out = []
        proc._add(0, _args(f"{first}-{last}", masked=allow_violence, alert_scale=1.0,
                           alert_tau=0), out)
        _step(proc, [quiet + quiet + named[first]])   # an earlier chunk, nothing over
        _step(proc, [hot + hot + named[last]])        # the prompt end
        assert [r.event for r in sent] == [0, want], (first, last)
        assert int(proc.named[0]) == (2 if last == "drugs" else 0)
        assert int(proc.masked[0, -1]) == (0 if last == "drugs" else 1)  # live / allowed
        if not want:
            out.append(7)
            sent.clear()
            _step(proc, [hot + hot + named[first]])   # a token: the prompt end's name holds
            assert sent[0].event == 0


@both_forms
def test_a_prompt_readout_beside_the_heads_verdict_flags_when_either_does():
    """Format 5 (the bundled `guarded` head; the default's format 6 too): prompt rows are
    judged by the larger of the two halves per output (either verdict flags), generated-token
    rows by the head's half alone."""
    proc, sent = _processor(head="guarded")
    assert proc.prompt_either and _processor()[0].prompt_either
    outs = [[], [], []]
    for i, rid in enumerate(("head_flags", "readout_flags", "decoding")):
        proc._add(i, _args(rid, alert_scale=1.0, alert_tau=0), outs[i])
    outs[2].append(7)
    low, high = [0.1] * 10, [0.9] * 10
    mixed = [0.1, 0.9] * 5
    _step(proc, [high + low, low + mixed, low + high])
    by_rid = {r.rid: r for r in sent}
    assert by_rid["head_flags"].scores == pytest.approx(high)
    assert by_rid["readout_flags"].scores == pytest.approx(mixed)
    assert by_rid["decoding"].scores == pytest.approx(low)  # its read-out half is not read
    assert [by_rid[r].event for r in ("head_flags", "readout_flags")] == [2, 2]
    assert by_rid["decoding"].event != 2


@both_forms
def test_a_request_without_an_allow_list_is_judged_by_the_readout_and_the_own_overall():
    """Format 10: at the prompt row of a request without an allow-list, the own per-category
    outputs are not read (own "overall") and the read-out's scores move by its shift; an
    allow-listed request's prompt row and every generated-token row are judged as before."""
    proc, sent = _processor(head="guarded")
    proc.no_allowlist_rule = (True, -1.0)  # own overall only, read-out 1 logit more sensitive
    outs = [[], [], [], []]
    allow_violence = [1] + [0] * 8 + [0]
    proc._add(0, _args("plain_own_category", alert_scale=1.0, alert_tau=0), outs[0])
    proc._add(1, _args("allowlisted", masked=allow_violence, alert_scale=1.0, alert_tau=0),
              outs[1])
    proc._add(2, _args("plain_own_overall", alert_scale=1.0, alert_tau=0), outs[2])
    proc._add(3, _args("decoding", alert_scale=1.0, alert_tau=0), outs[3])
    outs[3].append(7)
    low = [0.1] * 10
    drugs_high = [0.1, 0.1, 0.99] + [0.1] * 7
    overall_high = [0.1] * 9 + [0.99]
    _step(proc, [drugs_high + low, drugs_high + low, overall_high + low, drugs_high + low])
    by_rid = {r.rid: r for r in sent}
    lifted = 0.1 * math.e / (1 - 0.1 + 0.1 * math.e)  # sigmoid(logit(0.1) + 1)
    assert by_rid["plain_own_category"].scores == pytest.approx([lifted] * 10, abs=1e-6)
    assert by_rid["plain_own_category"].event == 0  # its own drugs output is not read
    assert by_rid["allowlisted"].scores == pytest.approx(drugs_high)  # max of both, unshifted
    assert by_rid["allowlisted"].event == 2
    assert by_rid["plain_own_overall"].scores == pytest.approx([lifted] * 9 + [0.99], abs=1e-6)
    assert by_rid["plain_own_overall"].event == 2
    assert by_rid["decoding"].scores == pytest.approx(drugs_high)  # generated: the head's
    # the head's own rule, from its checkpoint: a format-9 head has none
    assert _processor(head="guarded")[0].no_allowlist_rule is None


def test_offset_prompt_rows_matches_the_logit_shift_and_keeps_saturated_scores():
    from safeserve.kernels.safety_head import offset_prompt_rows

    s = torch.tensor([[0.0, 1e-6, 0.3, 0.9999, 1.0], [0.0, 1e-6, 0.3, 0.9999, 1.0]])
    for offset in (-3.0, 0.5, 4.0):
        out = offset_prompt_rows(s, torch.tensor([1, 0]), offset)
        assert torch.equal(out[1], s[1]) and out[0, 0] == 0.0 and out[0, 4] == 1.0
        want = torch.sigmoid(torch.logit(s[0, 1:4].double()) + offset).float()
        torch.testing.assert_close(out[0, 1:4], want, rtol=1e-5, atol=0)
    assert offset_prompt_rows(s, torch.tensor([1, 1]), 0.0) is s


def test_tracker_keeps_only_the_last_prefill_chunks_verdict():
    """A chunked prefill reports the prompt row once per chunk; the worker re-decides each
    time, so a trigger at an earlier chunk (a mid-prompt position) must not stick."""
    from safeserve.server import safety_wire as W
    from safeserve.server.safety_tracker import RequestTracker

    names = tuple(f"c{i}" for i in range(10))
    args = _args("r", alert_scale=1.0, alert_tau=0)
    tracker = RequestTracker("r", names, args, "refuse", {}, trace=False)
    tracker.add(W.StepRecord("r", 0, [0.9] * 10, 2, 1, W.PHASE_REFUSING, 5, 1))  # chunk 1
    assert tracker.report().action == "refuse"
    tracker.add(W.StepRecord("r", 0, [0.1] * 10, 0, 0, W.PHASE_WATCH, -1, 0))  # last chunk
    tracker.add(W.StepRecord("r", 1, [0.1] * 10, 0, 0, W.PHASE_WATCH, -1, 0))
    report = tracker.report()
    assert report.action == "none" and not report.prompt.flagged


def test_response_max_scores_are_observed_only_for_responses_with_a_scored_token():
    """A response stopped at its prompt (or cancelled first) has no response maximum: the
    histogram must not get its zeros."""
    from prometheus_client import REGISTRY

    from safeserve.server import safety_wire as W
    from safeserve.server.safety_tracker import RequestTracker

    names = ("violence",) + tuple(f"c{i}" for i in range(9))

    def observed() -> float:
        return REGISTRY.get_sample_value("safeserve_safety_response_max_score_count",
                                         {"category": "violence"}) or 0.0

    args = _args("r", alert_scale=1.0, alert_tau=0)
    stopped = RequestTracker("r", names, args, "refuse", {}, trace=False)
    stopped.add(W.StepRecord("r", 0, [0.9] * 10, 2, 1, W.PHASE_REFUSING, 5, 1))
    before = observed()
    stopped.record_metrics("stop")
    assert observed() == before
    answered = RequestTracker("r", names, args, "refuse", {}, trace=False)
    answered.add(W.StepRecord("r", 0, [0.1] * 10, 0, 0, W.PHASE_WATCH, -1, 0))
    answered.add(W.StepRecord("r", 1, [0.2] * 10, 0, 0, W.PHASE_WATCH, -1, 0))
    answered.record_metrics("stop")
    assert observed() == before + 1


def _explaining_processor(capacity: int = 4):
    """A processor over a 16-token toy vocabulary: 8 is '.', 9 is a bare newline, 10 a word;
    the refusal is [5, 8] ('Sorry' '.'), so its own last token ends a sentence."""
    proc, sent = _processor(capacity)
    proc.sentence_end = torch.zeros(16, dtype=torch.bool)
    proc.sentence_end[[8, 9]] = True
    proc.has_word = torch.zeros(16, dtype=torch.bool)
    proc.has_word[[5, 10]] = True
    return proc, sent


@both_forms
def test_the_explanation_after_a_refusal_ends_after_its_sentence_budget():
    from safeserve.server import safety_wire as W

    proc, sent = _explaining_processor()
    budgets = {"none": 0, "one": 1, "open": -1, "turns-unsafe": 1}
    outs = {rid: [] for rid in budgets}
    for i, (rid, budget) in enumerate(budgets.items()):
        proc._add(i, _args(rid, refusal_ids=[5, 8], alert_scale=1.0, alert_tau=0,
                           tau=1 if rid == "turns-unsafe" else 3, explain_sentences=budget),
                  outs[rid])
    flagged, benign = [0.9] * 10, [0.1] * 10

    def step(rows_scores, written=None):
        """One engine step; each row's sampled (or forced) token is appended as vLLM does."""
        logits = _step(proc, rows_scores)
        for i, rid in enumerate(budgets):
            forced = int(logits[i].argmax()) if not torch.isfinite(logits[i]).all() else None
            outs[rid].append(forced if forced is not None else (written or {}).get(rid, 10))
        return logits

    step([flagged] * 4)  # prompt verdict: all refuse; '5' forced
    step([benign] * 4)  # '8' forced: the refusal is in
    assert outs["one"] == [5, 8] and proc.phase[:4].tolist() == [W.PHASE_REFUSED] * 4
    # first step after the refusal: the refusal's own '.' ends nothing; budget 0 ends here
    logits = step([benign] * 4, written={"one": 9, "turns-unsafe": 10})
    assert not torch.isfinite(logits[0]).all() and int(logits[0].argmax()) == 0
    assert proc.phase[0] == W.PHASE_CLOSED
    assert torch.isfinite(logits[1]).all() and proc.phase[1] == W.PHASE_REFUSED
    # a bare newline with no word before it is not a sentence; a word then '.' is
    step([benign] * 4, written={"one": 10, "open": 8, "turns-unsafe": 8})
    assert proc.phase[1:4].tolist() == [W.PHASE_REFUSED] * 3
    # "turns-unsafe" reads its '.' (budget spent) in the step its signal fires: a bounded
    # explanation that reads over a threshold is retracted (withheld), not closed as spent
    logits = step([benign, benign, benign, flagged], written={"one": 8})
    assert not torch.isfinite(logits[3]).all() and int(logits[3].argmax()) == 0
    assert proc.phase[3] == W.PHASE_RETRACTED
    assert proc.phase[1] == W.PHASE_REFUSED  # 'one' read 'word', wrote '.'
    logits = step([benign] * 4)
    assert not torch.isfinite(logits[1]).all() and int(logits[1].argmax()) == 0
    assert proc.phase[1] == W.PHASE_CLOSED
    # ended rows go on forcing end-of-sequence (a request with ignore_eos gets nothing more)
    assert not torch.isfinite(logits[0]).all() and not torch.isfinite(logits[3]).all()
    assert proc.phase[2] == W.PHASE_REFUSED and torch.isfinite(logits[2]).all()  # no limit
    by_rid = {r.rid: r for r in sent if r.index == len(outs[r.rid]) - 1}
    assert by_rid["one"].phase == W.PHASE_CLOSED and by_rid["one"].forced == 0
    assert by_rid["one"].acted == 0  # closing is not a safety action


@both_forms
def test_the_sentence_budget_counts_tokens_under_async_scheduling_placeholders():
    """Under async scheduling (GPU builds) an output list ends in a -1 placeholder for the
    token still in flight. The budget counts the last known token instead, one step late:
    the refusal's own '.' is never counted, the model's 'word' '.' ends the one sentence."""
    from safeserve.server import safety_wire as W

    proc, _ = _explaining_processor()
    out: list[int] = []
    proc._add(0, _args("one", refusal_ids=[5, 8], alert_scale=1.0, alert_tau=0,
                       explain_sentences=1), out)
    model_writes = iter([10, 8, 10, 10, 10])
    phases, pending = [], None
    for step in range(7):
        logits = _step(proc, [[0.9] * 10] if step == 0 else [[0.1] * 10])
        forced = not torch.isfinite(logits[0]).all()
        token = int(logits[0].argmax()) if forced else next(model_writes)
        if pending is not None:
            out[-1] = pending  # the previous step's token lands
        pending = token
        out.append(-1)  # this step's token is in flight
        phases.append(int(proc.phase[0]))
    # refusal 5, 8 forced at steps 0-1; the model writes 10 (step 2), 8 (step 3): the '.' is
    # known at step 5, the budget is spent there and end-of-sequence forced
    assert out[:4] == [5, 8, 10, 8]
    assert phases[:5] == [W.PHASE_REFUSING, W.PHASE_REFUSED, W.PHASE_REFUSED,
                          W.PHASE_REFUSED, W.PHASE_REFUSED]
    assert phases[5] == W.PHASE_CLOSED and out[5] == 0


@both_forms
def test_refusal_separator_is_skipped_only_when_the_refusal_is_the_whole_answer():
    """refusal_ids = [sep, 5, 6] with refusal_sep 1: a prompt verdict on a plain request forces
    5, 6; on a prefilled request (text before it: the prefill) and mid-answer, sep, 5, 6."""
    proc, _ = _processor()
    outs = {"plain": [], "prefilled": [], "mid": []}
    for i, rid in enumerate(outs):
        proc._add(i, _args(rid, refusal_ids=[9, 5, 6], refusal_sep=1, tau=1,
                           prefilled=rid == "prefilled", alert_scale=1.0, alert_tau=0), outs[rid])
    outs["mid"] += [3, 3]  # two tokens into its answer
    forced = {rid: [] for rid in outs}
    for _ in range(3):
        logits = _step(proc, [[0.9] * 10] * 3)
        for i, rid in enumerate(outs):
            if not torch.isfinite(logits[i]).all():
                forced[rid].append(int(logits[i].argmax()))
            outs[rid].append(int(logits[i].argmax()))
    assert forced["plain"] == [5, 6]  # the step reading the refusal's end judges nothing
    assert forced["prefilled"] == [9, 5, 6] and forced["mid"] == [9, 5, 6]


def test_vocab_masks_read_sentence_ends_and_letters_off_the_real_tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    from safeserve.server.safety_processor import vocab_masks

    ends, letters = vocab_masks(base_model_dir, torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(str(base_model_dir))

    def one(text):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (text, ids)
        return ids[0]

    for text in (".", "!", "?", "\n", ").", "\n\n"):
        assert ends[one(text)], text
    for text in (" the", ",", " and", "1"):
        assert not ends[one(text)], text
    assert letters[one(" the")] and not letters[one(".")] and not letters[one("1")]
    assert vocab_masks(None, torch.device("cpu")) == (None, None)


@both_forms
def test_a_refusals_explanation_is_judged_afresh_with_the_requests_run():
    """The refusal's own steps (forcing it, and the step reading its end) are not judged; then
    the explanation needs the request's tau (2) violating steps in a row to stop. The tracker
    withholds that run and reports where it started."""
    from safeserve.server import safety_wire as W
    from safeserve.server.safety_tracker import RequestTracker

    proc, sent = _explaining_processor()
    args = _args("r", refusal_ids=[5, 8], alert_scale=1.0, alert_tau=0, tau=2)
    outs: list[int] = []
    proc._add(0, args, outs)
    flagged = [0.9] * 10

    def step():
        logits = _step(proc, [flagged])
        tok = int(logits[0].argmax()) if not torch.isfinite(logits[0]).all() else 10
        outs.append(tok)
        return tok

    # prompt verdict (refuse: '5'); '8' forced; the step reading the refusal's end: all fire,
    # none is judged
    assert [step(), step(), step()] == [5, 8, 10] and [r.event for r in sent[1:]] == [0, 0]
    assert proc.phase[0] == W.PHASE_REFUSED and proc.counter[0] == 0
    assert step() == 10 and proc.phase[0] == W.PHASE_REFUSED  # one violating step: counting
    assert step() == 0 and proc.phase[0] == W.PHASE_DONE  # two: stop
    tracker = RequestTracker("r", tuple(f"c{i}" for i in range(10)), args, "refuse", {}, False)
    for rec in sent:
        tracker.add(rec)
    report = tracker.report()
    assert report.action == "stop" and report.prompt.flagged
    # steps 3 and 4 fired, reading output tokens 2 and 3: those are the run, withheld
    assert report.response.flagged and report.response.token_index == 2
    assert tracker.cut == [(2, 4)] and tracker.stop_forced
    assert tracker.refusal_ending("stop") == "stopped"


@both_forms
def test_a_repeated_step_forces_the_same_token_and_counts_nothing_twice():
    """vLLM may run the processor on a step whose sampled token it then discards (a chunked
    prefill of a resumed request): the output list does not grow, and the strategy must force
    the same refusal token again and not count the same sentence end twice."""
    from safeserve.server import safety_wire as W

    proc, _ = _explaining_processor()
    outs: list[int] = []
    proc._add(0, _args("r", refusal_ids=[5, 6, 8], alert_scale=1.0, alert_tau=0,
                       explain_sentences=2), outs)
    flagged, benign = [0.9] * 10, [0.1] * 10

    def forced_token(scores):
        logits = _step(proc, [scores])
        return int(logits[0].argmax()) if not torch.isfinite(logits[0]).all() else None

    assert forced_token(flagged) == 5
    outs.append(5)
    assert forced_token(benign) == 6 and forced_token(benign) == 6  # discarded, repeated
    outs.append(6)
    assert forced_token(benign) == 8
    outs.append(8)
    assert forced_token(benign) is None  # reads the refusal's end
    for token in (10, 8):  # one sentence, a token per step; the step reading '.' repeats
        outs.append(token)
        assert forced_token(benign) is None and forced_token(benign) is None
    assert proc.explain_left[0] == 1  # counted once
    outs.append(10)
    assert forced_token(benign) is None
    outs.append(8)  # the second
    assert forced_token(benign) == 0 and proc.phase[0] == W.PHASE_CLOSED
    # parked and resumed (preemption) the row stays closed and keeps forcing end-of-sequence
    proc._park(0)
    proc._clear(0)
    proc._add(1, _args("r"), outs)
    logits = _step(proc, [benign, benign])
    assert proc.phase[1] == W.PHASE_CLOSED and int(logits[1].argmax()) == 0
    assert not torch.isfinite(logits[1]).all()


@both_forms
def test_an_explanation_without_a_sentence_end_ends_at_its_token_cap():
    from safeserve.server import safety_wire as W
    from safeserve.server.safety_processor import EXPLAIN_TOKENS_PER_SENTENCE

    proc, _ = _explaining_processor()
    outs: list[int] = []
    proc._add(0, _args("r", refusal_ids=[5, 8], alert_scale=1.0, alert_tau=0,
                       explain_sentences=1), outs)
    forced = []
    for _ in range(2 + EXPLAIN_TOKENS_PER_SENTENCE + 3):
        logits = _step(proc, [[0.9] * 10] if not outs else [[0.1] * 10])
        tok = int(logits[0].argmax()) if not torch.isfinite(logits[0]).all() else None
        forced.append(tok)
        outs.append(tok if tok is not None else 10)  # words, never a sentence end
    # the refusal, then exactly the cap's worth of model tokens, then end-of-sequence
    assert forced[:2] == [5, 8] and forced[2:2 + EXPLAIN_TOKENS_PER_SENTENCE] == [None] * EXPLAIN_TOKENS_PER_SENTENCE
    assert forced[2 + EXPLAIN_TOKENS_PER_SENTENCE] == 0 and proc.phase[0] == W.PHASE_CLOSED


@both_forms
def test_a_bounded_explanation_is_retracted_at_its_first_step_over_a_threshold():
    """Budget 1, tau 3: one violating step in the explanation ends it (end-of-sequence, then
    forced at every later step) and the tracker withholds everything after the refusal; an
    unbounded explanation only counts that step toward its run."""
    from safeserve.server import safety_wire as W
    from safeserve.server.safety_tracker import RequestTracker

    proc, sent = _explaining_processor()
    budgets = {"bounded": 1, "open": -1}
    args = {rid: _args(rid, refusal_ids=[5, 8], alert_scale=1.0, alert_tau=0, tau=3,
                       explain_sentences=b) for rid, b in budgets.items()}
    outs = {rid: [] for rid in budgets}
    for i, rid in enumerate(budgets):
        proc._add(i, args[rid], outs[rid])
    flagged, benign = [0.9] * 10, [0.1] * 10
    for scores in (flagged, benign, benign, benign, flagged, benign):
        logits = _step(proc, [scores] * 2)
        for i, rid in enumerate(budgets):
            ended = not torch.isfinite(logits[i]).all()
            outs[rid].append(int(logits[i].argmax()) if ended else 10)
    # prompt: refuse ('5', '8' forced); the step reading '8' judges nothing; two benign
    # explanation tokens; the fifth step reads a violating one: the bounded row ends there
    assert outs["bounded"] == [5, 8, 10, 10, 0, 0]
    assert proc.phase[0] == W.PHASE_RETRACTED
    assert outs["open"] == [5, 8, 10, 10, 10, 10] and proc.phase[1] == W.PHASE_REFUSED
    assert proc.counter[1] == 0  # its run was one step, broken by the benign one
    tracker = RequestTracker("bounded", tuple(f"c{i}" for i in range(10)), args["bounded"],
                             "refuse", {}, False)
    for rec in sent:
        if rec.rid == "bounded" and rec.index < 5:
            tracker.add(rec)
            if rec.index == 3:  # explanation under way: nothing past the refusal released
                assert tracker.explanation_hold(4, finished=False) == 2
    assert tracker.explanation_retracted and tracker.refusal_end == 2
    assert tracker.explanation_hold(5, finished=False) == 5  # ended: nothing left to judge
    assert [tracker.withheld(j) for j in range(5)] == [False, False, True, True, True]
    report = tracker.report()
    assert report.action == "refuse" and report.response.explanation_withheld
    # flagged where it read over the threshold (step 4 read output token 3), whatever tau
    assert report.response.flagged and report.response.token_index == 3
    assert tracker.refusal_ending("stop") == "withheld"


def test_a_refusal_forced_at_an_earlier_prefill_chunk_holds_nothing():
    """A chunked prefill re-reports index 0; a refusal token forced at an earlier chunk's
    verdict was never kept, so the answer streams as usual."""
    from safeserve.server import safety_wire as W
    from safeserve.server.safety_tracker import RequestTracker

    args = _args("r", refusal_ids=[5, 8], explain_sentences=1)
    tracker = RequestTracker("r", tuple(f"c{i}" for i in range(10)), args, "refuse", {}, False)
    tracker.add(W.StepRecord("r", 0, [0.9] * 10, 2, 1, W.PHASE_REFUSING, 5, 1))  # chunk 1
    tracker.add(W.StepRecord("r", 0, [0.1] * 10, 0, 0, W.PHASE_WATCH, -1, 0))  # last chunk
    for i in range(1, 6):
        tracker.add(W.StepRecord("r", i, [0.1] * 10, 0, 0, W.PHASE_WATCH, -1, 0))
    assert not tracker.acted and tracker.refusal_end is None
    assert tracker.explanation_hold(6, finished=False) == 6


def test_an_explanation_cut_by_max_tokens_is_withheld_as_unjudged():
    """No step read the last token of an explanation that ran into max_tokens: withheld."""
    from safeserve.server import safety_wire as W
    from safeserve.server.safety_tracker import RequestTracker

    def tracker_after(n_explained: int) -> RequestTracker:
        args = _args("r", refusal_ids=[5, 8], explain_sentences=1)
        t = RequestTracker("r", tuple(f"c{i}" for i in range(10)), args, "refuse", {}, False)
        t.add(W.StepRecord("r", 0, [0.9] * 10, 2, 1, W.PHASE_REFUSING, 5, 1))
        t.add(W.StepRecord("r", 1, [0.1] * 10, 0, 0, W.PHASE_REFUSED, 8, 0))
        for i in range(2, 2 + n_explained):
            t.add(W.StepRecord("r", i, [0.1] * 10, 0, 0, W.PHASE_REFUSED, -1, 0))
        return t

    cut = tracker_after(3)
    cut.finish("length", 5)
    assert cut.explanation_retracted and cut.withheld(2) and not cut.withheld(1)
    assert cut.refusal_ending("length") == "withheld"
    report = cut.report().response  # withheld, but no score flagged the response
    assert report.explanation_withheld and not report.flagged and report.token_index is None
    ended = tracker_after(3)
    ended.finish("stop", 5)  # the model ended it: its last token was read
    assert not ended.explanation_retracted and not ended.withheld(4)
    bare = tracker_after(0)
    bare.finish("length", 2)  # max_tokens right after the refusal: nothing to withhold
    assert not bare.explanation_retracted


def test_a_piece_spanning_the_refusals_end_is_split_there():
    """When the refusal's last token and the explanation's first arrive in one engine output,
    the piece is split at the refusal's end, so a withheld explanation leaves the refusal
    whole."""
    from safeserve.server import safety_wire as W
    from safeserve.server.completions import ChoiceState
    from safeserve.server.safety_tracker import RequestTracker

    args = _args("r", refusal_ids=[5, 8], explain_sentences=1)
    tracker = RequestTracker("r", tuple(f"c{i}" for i in range(10)), args, "refuse", {}, False)
    tracker.add(W.StepRecord("r", 0, [0.9] * 10, 2, 1, W.PHASE_REFUSED, 5, 1))
    tracker.add(W.StepRecord("r", 1, [0.1] * 10, 0, 0, W.PHASE_REFUSED, 8, 0))
    tracker.add(W.StepRecord("r", 2, [0.1] * 10, 0, 0, W.PHASE_REFUSED, -1, 0))
    words = {5: "Sorry", 8: ".", 10: " Because"}
    c = ChoiceState(0, "r", tracker=tracker)
    c.n_tokens = 1
    c.add_piece("Sorry", 1, [5])
    c.n_tokens = 3
    c.add_piece(". Because", 2, [8, 10], lambda ids, **kw: "".join(words[i] for i in ids))
    assert c.pieces == [(0, 1, "Sorry"), (1, 2, "."), (2, 3, " Because")]
    tracker.add(W.StepRecord("r", 3, [0.9] * 10, 1, 1, W.PHASE_RETRACTED, 0, 0))
    assert c.visible(c.pieces) == "Sorry."
    # a tokenizer that decodes a fragment without its leading space (SentencePiece): the
    # engine's text is split where the decoded tail matches its end
    c2 = ChoiceState(0, "r", tracker=tracker)
    c2.n_tokens = 1
    c2.add_piece("Sorry", 1, [5])
    c2.n_tokens = 3
    c2.add_piece(". Because", 2, [8, 10], lambda ids, **kw: "".join(words[i] for i in ids).lstrip())
    assert c2.pieces[1:] == [(1, 2, ". "), (2, 3, "Because")]
    assert c2.visible(c2.pieces) == "Sorry. "


@both_forms
def test_verdict_only_rows_are_parked_only_mid_answer():
    """Helper requests read for their prompt verdict (moderations, a prefilled query) are
    dropped on removal mid-prompt (a resume runs their prompt row again) and at their end,
    so a burst of them cannot push a preempted request's state out. Mid-answer (the
    self-check's answers) vLLM resumes them past their prompt row: they are parked, and
    resumed from it."""
    proc, _ = _processor()
    params = SimpleNamespace(extra_args=None, max_tokens=2, stop_token_ids=[], eos_token_id=0)
    outs = {"chat": [], "modr-1": [], "modr-2": [4, 4], "check": [4]}
    proc._add(0, _args("chat"), outs["chat"])
    proc._add(1, _args("modr-1", verdict_only=True), outs["modr-1"])
    proc._add(2, _args("modr-2", verdict_only=True), outs["modr-2"], params)  # at its end
    proc._add(3, _args("check", verdict_only=True), outs["check"], params)  # mid-answer
    proc.phase[3] = 1
    proc.update_state(SimpleNamespace(removed=[0, 1, 2, 3], added=[], moved=[]))
    assert list(proc.parked) == ["chat", "check"]
    assert not proc.verdict_only  # nothing left behind either
    proc._add(0, _args("check", verdict_only=True), outs["check"], params)  # resumed
    assert proc.phase[0] == 1 and proc.verdict_only == {"check"}


@both_forms
def test_requests_the_http_side_ended_lose_their_parked_state():
    """A removal the worker cannot tell from a preemption (a stop string, an abort) parks the
    request; the next request brings the ids the HTTP side has finished with, and their
    parked state is dropped, so it cannot push out a preempted request's."""
    from safeserve.server.safety_tracker import TelemetryHub

    proc, _ = _processor()
    for i, rid in enumerate(("stopped", "preempted")):
        proc._add(i, _args(rid), [4, 4])
    proc.update_state(SimpleNamespace(removed=[0, 1], added=[], moved=[]))
    assert list(proc.parked) == ["stopped", "preempted"]
    hub, tracker = TelemetryHub(), _bare_tracker()
    tracker.rid = "stopped"
    hub.register(tracker)
    hub.release("stopped")
    hub.release("never-registered")  # not this hub's: nothing to tell
    ended = hub.take_ended()
    assert ended == ["stopped"] and hub.take_ended() == []  # handed out once
    proc._add(0, _args("next", ended=ended), [])
    assert list(proc.parked) == ["preempted"]


def test_ended_ids_carried_by_a_request_the_worker_never_took_go_to_the_next_one():
    """A request refused by the engine's queue (or aborted while waiting) never reaches the
    worker, so the ended ids it carried would be lost and their parked state kept for good."""
    from safeserve.server import safety_wire as W
    from safeserve.server.safety_tracker import RequestTracker, TelemetryHub

    hub = TelemetryHub()
    for rid in ("a", "b"):
        hub.register(RequestTracker(rid, ("c0",), _args(rid), "refuse", {}, False))
        hub.release(rid)
    rejected = RequestTracker("rejected", ("c0",), _args("rejected", ended=hub.take_ended()),
                              "refuse", {}, False)
    hub.register(rejected)
    hub.release("rejected")  # no record ever arrived
    assert hub.take_ended() == ["a", "b", "rejected"]
    served = RequestTracker("served", ("c0",), _args("served", ended=["x"]), "refuse", {}, False)
    hub.register(served)
    served.add(W.StepRecord("served", 0, [0.1], 0, 0, 0, -1, 0))  # the worker took it
    hub.release("served")
    assert hub.take_ended() == ["served"]


def _tracker_with_cut(cut: tuple[int, int], forced: dict[int, int] | None = None):
    from safeserve.server import safety_wire as W
    from safeserve.server.safety_tracker import RequestTracker

    tracker = RequestTracker("r", tuple(f"c{i}" for i in range(10)), _args("r"), "refuse", {},
                             False)
    for j in range(6):
        tracker.add(W.StepRecord("r", j, [0.1] * 10, 0, 0, 0, (forced or {}).get(j, -1), 0))
    tracker.cut.append(cut)
    return tracker


def test_a_piece_merged_across_a_withheld_run_keeps_only_its_clean_tokens():
    """vLLM merges outputs while the HTTP side waits: one piece may hold tokens on both sides
    of a withheld run's edge. Only its clean tokens are shown, text and logprobs alike."""
    from safeserve.server.completions import ChoiceState, token_logprob

    words = {1: "A", 2: " b", 3: " c", 4: " d", 5: " e"}
    decode = lambda ids, **kw: "".join(words[i] for i in ids)  # noqa: E731
    c = ChoiceState(0, "r", tracker=_tracker_with_cut((2, 4)))
    c.n_tokens = 5
    c.add_piece("A b c d e", 5, [1, 2, 3, 4, 5], decode)
    lp = SimpleNamespace
    maps = [{t: lp(logprob=-0.1 * t, rank=1, decoded_token=words[t])} for t in (1, 2, 3, 4)]
    c.add_logprobs([1, 2, 3, 4, 5], maps, top=1)  # the fifth map is missing: no entry for it
    assert c.visible(c.pieces) == "A b e"
    assert [e.token for e in c.visible_logprobs(c.pieces).content] == ["A", " b"]
    # without the ids to decode the kept part, the piece is withheld whole (fail closed)
    c2 = ChoiceState(0, "r", tracker=_tracker_with_cut((2, 4)))
    c2.n_tokens = 5
    c2.add_piece("A b c d e", 5, [], None)
    assert c2.visible(c2.pieces) == ""
    # a forced token keeps its own logprob, not the alternatives the model would have taken
    c3 = ChoiceState(0, "r", tracker=_tracker_with_cut((9, 9), forced={0: 1}))
    c3.n_tokens = 2
    c3.add_piece("A b", 2, [1, 2], decode)
    c3.add_logprobs([1, 2], [{1: lp(logprob=-5.0, rank=3, decoded_token="A"),
                              7: lp(logprob=-0.1, rank=1, decoded_token="Sure")},
                             {2: lp(logprob=-0.2, rank=1, decoded_token=" b")}], top=2)
    first, second = c3.visible_logprobs(c3.pieces).content
    assert first.token == "A" and first.logprob == -5.0 and first.top_logprobs == []
    assert [t.token for t in second.top_logprobs] == [" b"]
    # -inf and NaN become -9999 (JSON has neither); a missing decoded token is decoded
    e = token_logprob(4, {4: lp(logprob=float("nan"), rank=1, decoded_token=None)}, 1, decode)
    assert e.token == " d" and e.logprob == -9999.0 and e.top_logprobs[0].token == " d"


@both_forms
def test_a_row_refilled_in_the_same_step_parks_the_request_it_removed():
    """vLLM leaves a removed index out of ``removed`` when an added request (or a row moved by
    its condense) fills it in the same step: the request that sat there must still be parked,
    so that, preempted, it resumes mid-refusal instead of starting over."""
    proc, _ = _processor()
    outs = {"a": [], "b": [], "c": []}
    for i, rid in enumerate(("a", "b")):
        proc._add(i, _args(rid), outs[rid])
    _step(proc, [[0.9] * 10, [0.1] * 10])  # a's prompt is flagged: it is refusing
    assert proc.phase[0] == 1
    outs["a"].append(5)
    # a preempted, c added into its slot: `removed` is empty
    proc.update_state(SimpleNamespace(removed=[], added=[(0, SimpleNamespace(
        extra_args=_args("c").to_extra_args()), [], outs["c"])], moved=[]))
    assert proc.rids[0] == "c" and proc.phase[0] == 0 and "a" in proc.parked
    # b preempted, c condensed into its slot by a move
    from vllm.v1.sample.logits_processor import MoveDirectionality
    proc.update_state(SimpleNamespace(removed=[], added=[],
                                      moved=[(0, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert proc.rids[1] == "c" and "b" in proc.parked
    proc._add(2, _args("a"), outs["a"])  # a resumes where it was
    assert proc.phase[2] == 1


@both_forms
def test_a_request_removed_at_one_of_its_ends_is_not_parked():
    """Finished requests never come back: removed at max_tokens or on a stop token they are
    not parked, so the bounded store keeps room for preempted ones. A request removed
    mid-answer is parked."""
    proc, _ = _processor(capacity=8)
    outs = {"length": [], "eos": [], "stop": [], "preempted": [], "eos_async": [],
            "in_flight": [], "length_async": [], "helper": []}
    for i, rid in enumerate(outs):
        proc._add(i, _args(rid), outs[rid], SimpleNamespace(
            extra_args=None, max_tokens=1 if rid == "helper" else 3, stop_token_ids=[11],
            eos_token_id=0))
    outs["length"] += [4, 4, 4]
    outs["eos"] += [4, 0]
    outs["stop"] += [11]
    outs["preempted"] += [4, 4]
    outs["eos_async"] += [4, 0, -1]  # async scheduling: a placeholder after the real end
    outs["in_flight"] += [4, -1]  # one real token and one in flight, of three: still live
    # at its limit with the last token in flight: vLLM schedules it no more (async), it ends
    outs["length_async"] += [4, 4, -1]
    outs["helper"] += [-1]  # a one-token helper request (max_tokens 1), likewise
    proc.update_state(SimpleNamespace(removed=list(range(8)), added=[], moved=[]))
    assert list(proc.parked) == ["preempted", "in_flight"]


@both_forms
def test_a_resumed_request_whose_parked_state_was_evicted_ends_fail_closed(monkeypatch):
    """A preempted request's state is parked (bounded, oldest out). Resumed after its state
    was pushed out, it cannot know whether it was mid-refusal: it is ended, not left to
    generate unwatched. A new request (no output yet) starts normally."""
    from safeserve.server import safety_processor as P
    from safeserve.server import safety_wire as W

    monkeypatch.setattr(P, "MAX_PARKED", 2)
    proc, _ = _processor()
    outs = {"a": [], "new": []}
    proc._add(0, _args("a"), outs["a"])
    _step(proc, [[0.9] * 10])  # a's prompt is flagged: it is refusing
    outs["a"].append(5)
    proc.update_state(SimpleNamespace(removed=[0], added=[], moved=[]))  # a preempted
    for rid in ("x", "y"):  # two more parked requests push a's state out
        proc._add(1, _args(rid), [])
        proc.update_state(SimpleNamespace(removed=[1], added=[], moved=[]))
    assert "a" not in proc.parked
    proc._add(0, _args("a"), outs["a"])
    proc._add(1, _args("new"), outs["new"])
    assert proc.phase[0] == W.PHASE_DONE and proc.phase[1] == W.PHASE_WATCH
    logits = _step(proc, [[0.1] * 10, [0.1] * 10])
    assert logits[0].argmax().item() == 0  # end-of-sequence (eos_id 0) forced
    assert torch.isfinite(logits[1]).all()  # the new one samples freely


def _bare_tracker(**kw):
    from safeserve.server.safety_tracker import RequestTracker

    return RequestTracker("r", tuple(f"c{i}" for i in range(10)), _args("r", **kw), "refuse",
                          {}, False)


def _rec(j, event=0, phase=0, forced=-1, acted=0, alert=0):
    from safeserve.server import safety_wire as W

    return W.StepRecord("r", j, [0.1] * 10, event, 0, phase, forced, acted, alert)


def test_withhold_answer_cuts_the_answer_before_an_action_and_holds_a_stream_until_then():
    from safeserve.server import safety_wire as W
    from safeserve.server.safety_tracker import RequestTracker

    t = RequestTracker("r", tuple(f"c{i}" for i in range(10)), _args("r", tau=2), "refuse",
                       {}, False, withhold_answer=True)
    for j in range(4):
        t.add(_rec(j))
    assert t.answer_hold(4, finished=False) == 0  # nothing before an action or the end
    t.add(_rec(4, event=1))
    t.add(_rec(5, event=2, phase=W.PHASE_REFUSING, forced=7, acted=1))  # tau 2: acts at 5
    assert t.cut == [(0, 5)] and all(t.withheld(j) for j in range(5))
    assert t.answer_hold(5, finished=False) == 0  # its step may be one past the end
    assert t.answer_hold(6, finished=False) == 6  # the output reached the forced token
    report = t.report()
    assert report.response.answer_withheld and report.response.token_index == 3
    # without withhold_answer the same records withhold the violating run only
    plain = RequestTracker("r", tuple(f"c{i}" for i in range(10)), _args("r", tau=2), "refuse",
                           {}, False)
    for rec in [_rec(j) for j in range(4)] + [_rec(4, event=1), _rec(
            5, event=2, phase=W.PHASE_REFUSING, forced=7, acted=1)]:
        plain.add(rec)
    assert plain.cut == [(3, 5)] and not plain.report().response.answer_withheld
    assert plain.answer_hold(4, finished=False) == 4
    # a clean answer is released whole at its end
    clean = RequestTracker("r", tuple(f"c{i}" for i in range(10)), _args("r"), "refuse", {},
                           False, withhold_answer=True)
    for j in range(3):
        clean.add(_rec(j))
    clean.finish("stop", 3)
    assert clean.answer_hold(3, finished=True) == 3 and not clean.cut


def test_withhold_answer_keeps_the_refusal_and_leaves_annotate_and_host_stops_alone():
    """A later action (a trigger in an unbounded explanation) withholds its run, not the
    refusal before it; annotate withholds nothing and holds no stream; a stop the server made
    itself (structured output) is not undone by finish()."""
    from safeserve.server import safety_wire as W
    from safeserve.server.safety_tracker import TO_THE_END, RequestTracker

    names = tuple(f"c{i}" for i in range(10))
    t = RequestTracker("r", names, _args("r", tau=1), "refuse", {}, False, withhold_answer=True)
    t.add(_rec(0))
    t.add(_rec(1))
    t.add(_rec(2, event=2, phase=W.PHASE_REFUSING, forced=5, acted=1))  # first action
    t.add(_rec(3, phase=W.PHASE_REFUSED, forced=6))  # the refusal's last token
    for j in range(4, 8):
        t.add(_rec(j))  # the explanation
    t.add(_rec(8, event=2, phase=W.PHASE_DONE, forced=0, acted=1))  # a second action
    assert t.cut == [(0, 2), (7, 8)] and not t.withheld(2) and not t.withheld(5)
    ann = RequestTracker("r", names, _args("r", tau=1, action=W.ACTION_ANNOTATE), "annotate",
                         {}, False, withhold_answer=True)
    ann.add(_rec(0))
    assert ann.answer_hold(3, finished=False) == 3
    ann.add(_rec(1))
    ann.add(_rec(2, event=2))
    assert not ann.cut and not ann.report().response.answer_withheld
    # a stream's first token waits for the prompt verdict to be final (a chunk's may change)
    t = RequestTracker("r", names, _args("r"), "refuse", {}, False, withhold_answer=True)
    t.add(_rec(0, event=2, phase=W.PHASE_REFUSING, forced=5, acted=1))  # an earlier chunk's
    assert t.answer_hold(1, finished=False) == 0
    t.add(_rec(1, phase=W.PHASE_REFUSING, forced=6))
    assert t.answer_hold(2, finished=False) == 2
    # structured output: the host stop at step 3, finished before step 3's token arrived
    hs = RequestTracker("r", names, _args("r", tau=1, action=W.ACTION_ANNOTATE), "stop", {},
                        False, host_stop=True)
    for j in range(5):
        hs.add(_rec(j))
    hs.add(_rec(5, event=2))  # telemetry ahead of the outputs: 3 tokens have arrived
    assert hs.host_stopped
    hs.finish("stop", 3)
    assert hs.stop_forced and hs.cut == [(4, TO_THE_END)]
    assert hs.report().action == "stop"


def test_a_tracker_without_a_trace_keeps_no_records_and_decides_the_same():
    """Per-step records (~700 bytes each) are kept only for a trace; without one, a status
    byte per step answers holdback, withholding, forced tokens and the report the same way,
    over random record sequences (repeated indices, violating runs, triggers, forced steps)."""
    import random

    from safeserve.server import safety_wire as W
    from safeserve.server.safety_tracker import RequestTracker

    rng = random.Random(5)
    for case in range(200):
        action = rng.choice([W.ACTION_REFUSE, W.ACTION_STOP, W.ACTION_ANNOTATE])
        kept, lean = (RequestTracker("r", tuple(f"c{i}" for i in range(10)),
                                     _args("r", action=action), "refuse", {}, trace)
                      for trace in (True, False))
        j, n = 0, rng.randint(1, 40)
        while j < n:
            event = rng.choice([0, 0, 1, 1, 2])
            forced = rng.choice([-1, -1, -1, 0, 7])
            rec = W.StepRecord("r", j, [rng.random() for _ in range(10)], event,
                               rng.randrange(1, 1 << 10), rng.choice([0, W.PHASE_REFUSING]),
                               forced, int(event == 2 and rng.random() < 0.7))
            kept.add(rec)
            lean.add(rec)
            j += 0 if rng.random() < 0.15 else 1  # sometimes a repeated index
            assert kept.releasable(j, False) == lean.releasable(j, False)
        assert [kept.withheld(i) for i in range(n + 1)] == [lean.withheld(i) for i in range(n + 1)]
        assert [kept.forced_at(i) for i in range(n + 1)] == [lean.forced_at(i) for i in range(n + 1)]
        assert [kept.has_step(i) for i in range(n + 2)] == [i < n for i in range(n + 2)]
        full, short = kept.report(), lean.report()
        assert full.trace is not None and len(full.trace) == n and short.trace is None
        assert full.model_copy(update={"trace": None}) == short, case
        assert lean.steps == {} and len(kept.steps) == n


def test_holdback_releases_a_violating_run_that_ended_short_of_tau():
    """One violating step, then clean ones: the run never reached tau, so its token goes
    out with the next clean verdict (it used to stall the stream to the end)."""
    from safeserve.kernels.safety_decision import EVENT_VIOLATION

    t = _bare_tracker()  # tau 3
    t.add(_rec(0))
    t.add(_rec(1))
    t.add(_rec(2, event=EVENT_VIOLATION))  # reads token 1
    assert t.releasable(3, False) == 1  # token 1: its run is open
    t.add(_rec(3, event=EVENT_VIOLATION))
    assert t.releasable(4, False) == 1
    for j in range(4, 30):
        t.add(_rec(j))
    assert t.releasable(30, False) == 29  # all but the last token, whose verdict is pending
    assert not any(t.withheld(j) for j in range(30))


def test_holdback_never_releases_a_violating_run_that_reaches_tau():
    """tau 3: tokens read as violating at steps 3 and 4 stay back while their run is open;
    step 5 completes the run and acts, and those three tokens are withheld for good. What
    a client sees after each step is a prefix of the clean tokens, never a flagged one."""
    from safeserve.kernels.safety_decision import EVENT_TRIGGER, EVENT_VIOLATION
    from safeserve.server import safety_wire as W

    t = _bare_tracker()  # tau 3
    released = []

    def visible(n_tokens):
        upto = t.releasable(n_tokens, False)
        return [j for j in range(upto) if not t.withheld(j)]

    for j in range(3):
        t.add(_rec(j))
    released.append(visible(3))
    t.add(_rec(3, event=EVENT_VIOLATION))  # reads token 2
    released.append(visible(4))
    t.add(_rec(4, event=EVENT_VIOLATION))  # reads token 3
    released.append(visible(5))
    # reads token 4: the run reaches tau; the refusal is forced from token 5 on
    t.add(_rec(5, event=EVENT_TRIGGER, acted=1, phase=W.PHASE_REFUSING, forced=7))
    released.append(visible(6))
    t.add(_rec(6, phase=W.PHASE_REFUSING, forced=8))
    released.append(visible(7))
    assert released == [[0, 1], [0, 1], [0, 1], [0, 1, 5], [0, 1, 5, 6]]
    assert [t.withheld(j) for j in range(7)] == [False, False, True, True, True, False, False]
    report = t.report()
    assert report.response.flagged and report.response.token_index == 2
    # Several tokens settled by one step (a piece of many tokens): the same answer.
    assert t.releasable(7, True) == 7 and [j for j in range(7) if not t.withheld(j)] == [0, 1, 5, 6]


def test_holdback_in_the_alert_band_withholds_the_shorter_run():
    """A prompt in the alert band: the run that acts is alert_tau long, and exactly its
    tokens are withheld."""
    from safeserve.kernels.safety_decision import EVENT_TRIGGER, EVENT_VIOLATION
    from safeserve.server import safety_wire as W

    t = _bare_tracker(tau=4, alert_tau=2)
    t.add(_rec(0, alert=1))
    t.add(_rec(1))
    t.add(_rec(2, event=EVENT_VIOLATION))  # reads token 1
    assert t.releasable(3, False) == 1
    t.add(_rec(3, event=EVENT_TRIGGER, acted=1, phase=W.PHASE_REFUSING, forced=7))
    assert t.releasable(4, False) == 4
    assert [t.withheld(j) for j in range(4)] == [False, True, True, False]


def test_a_stop_forced_at_an_earlier_prefill_chunk_is_forgotten():
    """A mid-prompt chunk's row may fire and force end-of-sequence (a stop config); the last
    chunk's verdict is what counts, and a clean one leaves a normal answer, not a
    content_filter ending."""
    from safeserve.kernels.safety_decision import EVENT_TRIGGER
    from safeserve.server import safety_wire as W

    t = _bare_tracker(action=W.ACTION_STOP)
    t.add(_rec(0, event=EVENT_TRIGGER, phase=W.PHASE_DONE, forced=0, acted=1))
    assert t.stop_forced
    t.add(_rec(0))  # the last chunk: clean
    assert not t.stop_forced and not t.acted


def test_an_explanation_ended_by_a_stop_string_is_withheld_as_unjudged():
    from safeserve.server import safety_wire as W

    t = _bare_tracker(explain_sentences=1)
    t.add(_rec(0, event=2, phase=W.PHASE_REFUSING, forced=5, acted=1))
    t.add(_rec(1, phase=W.PHASE_REFUSED, forced=6))
    t.add(_rec(2, phase=W.PHASE_REFUSED))  # the explanation's first token, sampled
    t.finish("stop", 3)  # EOS: its token is no text, nothing unjudged
    assert not t.withheld(2)
    t.finish("stop", 3, stop_string=True)  # a stop string ended it on an unread token
    assert t.withheld(2) and not t.withheld(1)


def test_missing_telemetry_fails_closed(monkeypatch):
    """The wait for a step that never reports times out: the tracker marks itself
    incomplete, withholds every token no step has judged, and says so in its report."""
    import asyncio

    from safeserve.server import safety_tracker

    monkeypatch.setattr(safety_tracker, "TELEMETRY_WAIT_S", 0.05)
    t = _bare_tracker()

    async def run():
        for j in range(3):
            t.add(_rec(j))
        await t.wait_for(2)  # reported: no wait
        assert not t.incomplete
        await t.wait_for(3)  # never reported: times out
    asyncio.run(run())
    assert t.incomplete
    assert [t.withheld(j) for j in range(5)] == [False, False, True, True, True]
    assert t.report().telemetry_complete is False


def test_with_telemetry_missing_a_violating_run_at_the_end_is_withheld(monkeypatch):
    """Telemetry stalled once (incomplete), and a violating run is under way when the request
    finishes: the step that would have acted may be the one missing, so the run's tokens are
    not released (they were: each had its next step's record), and the finishing step still
    gets a wait of its own for that record."""
    import asyncio

    from safeserve.kernels.safety_decision import EVENT_TRIGGER, EVENT_VIOLATION
    from safeserve.server import safety_tracker
    from safeserve.server import safety_wire as W

    monkeypatch.setattr(safety_tracker, "TELEMETRY_WAIT_S", 0.2)
    t = _bare_tracker(action=W.ACTION_STOP)  # tau 3

    async def run():
        t.add(_rec(0))
        await t.wait_for(1)  # a stall: times out, incomplete from here on
        assert t.incomplete
        for j in range(1, 12):
            t.add(_rec(j))
        t.add(_rec(12, event=EVENT_VIOLATION))  # reads token 11
        t.add(_rec(13, event=EVENT_VIOLATION))  # reads token 12
        # step 14 acts (forces end-of-sequence); its record is late
        late = asyncio.get_running_loop().call_later(
            0.05, t.add, _rec(14, event=EVENT_TRIGGER, phase=W.PHASE_DONE, forced=0, acted=1))
        await t.wait_for(14)  # an ordinary wait: returns at once, incomplete
        assert not t.has_step(14)
        assert [t.withheld(j) for j in (10, 11, 12)] == [False, True, True]  # fail closed
        await t.wait_for(14, last=True)  # the finishing step's own wait
        late.cancel()
    asyncio.run(run())
    t.finish("stop", 15)
    assert t.stop_forced and t.report().action == "stop"
    assert [t.withheld(j) for j in range(10, 15)] == [False, True, True, True, False]


def test_a_flagged_prompt_verdict_is_no_alert_for_the_tracker_either():
    from safeserve.kernels.safety_decision import EVENT_TRIGGER

    t = _bare_tracker(tau=4, alert_tau=2)
    t.add(_rec(0, event=EVENT_TRIGGER, acted=1, alert=1))
    assert not t.alerted and t.run_length == 4


@both_forms
def test_a_request_removed_and_re_added_in_one_step_keeps_its_state():
    """Every refilled row is parked before any add: a request that lands on another freed
    row in the same step finds its snapshot, not a fresh state."""
    proc, _ = _processor()
    outs = {"a": [], "b": [], "c": []}
    proc._add(0, _args("a"), outs["a"])
    proc._add(1, _args("b"), outs["b"])
    _step(proc, [[0.9] * 10, [0.1] * 10])  # a refuses
    outs["a"].append(5)
    add = lambda i, rid: (i, SimpleNamespace(extra_args=_args(rid).to_extra_args()), [], outs[rid])  # noqa: E731
    proc.update_state(SimpleNamespace(removed=[], added=[add(1, "a"), add(0, "c")], moved=[]))
    assert proc.rids[:2] == ["c", "a"] and proc.phase[1] == 1 and proc.phase[0] == 0
    assert "b" in proc.parked


def test_stop_strings_are_held_back_and_cut_by_the_server():
    """With safety on, vLLM keeps stop strings in its text; the choice holds back what could
    begin one (as vLLM would) and cuts the matched one at the end, also when a piece rebuilt
    from its token ids runs past it."""
    from safeserve.server.completions import ChoiceState

    c = ChoiceState(0, "r", stop_hold=2)
    assert c.outgoing("abcE", False) == "ab"
    c.stop_reason = "END"
    assert c.outgoing("ND", True) == "c"
    c = ChoiceState(0, "r", stop_hold=2, stop_reason="END")
    assert c.outgoing("xENDyz", True) == "x"
    c = ChoiceState(0, "r", stop_hold=2)  # ended by EOS: all of it
    assert c.outgoing("ab", False) == "" and c.outgoing("c", True) == "abc"
    assert ChoiceState(0, "r").outgoing("abc", False) == "abc"  # not ours: untouched


@both_forms
def test_a_resumed_requests_discarded_prefill_chunks_decide_nothing():
    """A preempted request is re-prefilled in chunks; vLLM samples a row per chunk and discards
    its token, so the row comes back at the same output length. Those rows (hidden states
    inside the prompt) must not add up to a run: only the last chunk's decision stands, in the
    worker and in the tracker."""
    from safeserve.kernels.safety_decision import EVENT_TRIGGER, EVENT_VIOLATION

    proc, sent = _processor()
    out = []
    proc._add(0, _args("r"), out)  # tau 3, thresholds 0.5
    out += [7, 7, 7]  # three tokens into its answer
    _step(proc, [[0.1] * 10])  # out_len 3: a clean step (the state before the preemption)
    out.append(7)  # out_len 4, then preempted and re-prefilled in four chunks
    for _ in range(3):
        logits = _step(proc, [[0.6] * 10])
    assert proc.counter[0] == 1  # each chunk started again from the same state
    logits = _step(proc, [[0.1] * 10])  # the last chunk: clean, its token is kept
    assert proc.counter[0] == 0 and proc.phase[0] == 0 and torch.isfinite(logits[0]).all()
    # a run that really spans steps still counts
    for k in range(3):
        out.append(7)
        logits = _step(proc, [[0.6] * 10])
    assert int(logits[0].argmax()) == 5 and proc.phase[0] == 1
    # the tracker undoes the records of the discarded steps likewise
    t = _bare_tracker()
    for j in range(4):
        t.add(_rec(j))
    t.add(_rec(4, event=EVENT_VIOLATION))
    t.add(_rec(4, event=EVENT_TRIGGER, acted=1, phase=1, forced=5))
    assert t.acted and t.cut
    t.add(_rec(4))  # the last chunk: clean
    assert not t.acted and not t.cut and t.refusal_end is None
    assert [r.index for r in sent].count(4) == 4


def test_gpu_telemetry_is_sent_after_its_copy_lands_and_in_step_order():
    """On CUDA a step queues its copy and an event instead of waiting for the GPU; the sender
    thread waits for the event, and records still leave in step order (a later step's
    records, even ready ones, wait behind it)."""
    import threading
    import time

    from safeserve.server import safety_wire as W
    from safeserve.server.worker_telemetry import StepTelemetry

    tel = StepTelemetry()
    sent = []
    tel.sock = object()
    tel._push = lambda records, _s: sent.append([(r.rid, r.index, r.forced) for r in records])

    class Ready:  # stands in for torch.cuda.Event
        def __init__(self):
            self.landed = threading.Event()

        def synchronize(self):
            self.landed.wait(10)

    first = Ready()
    host = torch.tensor([[0.1] * 10 + [0, 0, 0, 5, 1, 0], [0.2] * 10 + [0, 0, 0, -1, 0, 0]],
                        dtype=torch.float64)
    tel.send_later(first, host, [(1, "a", 3)], 10, 0.0)  # row 0 belongs to no request
    tel.send([W.StepRecord("b", 1, [0.1] * 10, 0, 0, 0, -1, 0)], 0.0)
    time.sleep(0.2)
    assert sent == []  # both wait for the first step's copy
    first.landed.set()
    deadline = time.time() + 10
    while len(sent) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert sent == [[("a", 3, -1)], [("b", 1, -1)]]


def test_a_record_arriving_after_finish_does_not_undo_its_decision():
    """A repeated index's record still in flight when the request ends (a resumed request's
    kept chunk after a discarded one) must not restore the state from before finish()."""
    from safeserve.server import safety_wire as W

    t = _bare_tracker(explain_sentences=1)
    t.add(_rec(0, event=2, phase=W.PHASE_REFUSING, forced=5, acted=1))
    t.add(_rec(1, phase=W.PHASE_REFUSED, forced=6))
    t.add(_rec(2, phase=W.PHASE_REFUSED))
    t.finish("length", 3)
    assert t.withheld(2)
    t.add(_rec(2, phase=W.PHASE_REFUSED))  # the same index again, late
    assert t.withheld(2) and t.explanation_retracted


@both_forms
def test_a_resumed_requests_chunk_records_wait_until_its_kept_chunk_is_known():
    """A preempted request comes back with output and is re-prefilled in chunks; every chunk's
    row shows the same output length and vLLM keeps only the last one's token. The HTTP side
    must never see a discarded chunk's record (it could settle a held-back token on it before
    the kept one arrives): records wait until the output grows (the last step was kept: sent,
    before the next step's) or the request leaves the batch without growing (dropped)."""
    from safeserve.kernels.safety_decision import EVENT_TRIGGER

    proc, sent = _processor()
    out = []
    bu = lambda removed=(), added=(): SimpleNamespace(removed=list(removed), added=list(added), moved=[])  # noqa: E731
    add = lambda i, rid, o: (i, SimpleNamespace(extra_args=_args(rid).to_extra_args()), [], o)  # noqa: E731
    proc.update_state(bu(added=[add(0, "r", out)]))
    _step(proc, [[0.1] * 10])  # prompt row
    out += [7, 7]
    _step(proc, [[0.1] * 10])  # index 2
    proc.update_state(bu(removed=[0]))  # preempted with two tokens
    assert "r" in proc.parked and [r.index for r in sent if r.index >= 0] == [0, 2]
    out.append(7)  # the token of the step above
    proc.update_state(bu(added=[add(1, "r", out)]))  # resumed at output length 3
    _step(proc, [[0.0] * 10, [0.9] * 10])  # a chunk inside the prompt: would refuse
    _step(proc, [[0.0] * 10, [0.1] * 10])  # the last chunk: clean
    assert [r.index for r in sent if r.index >= 0] == [0, 2]  # neither is out yet
    out.append(8)  # vLLM kept the last chunk's token
    proc.update_state(None)
    assert [r.index for r in sent if r.index >= 0] == [0, 2, 3] and sent[-1].event != EVENT_TRIGGER
    _step(proc, [[0.0] * 10, [0.1] * 10])  # index 4: sent at once now
    assert [r.index for r in sent if r.index >= 0] == [0, 2, 3, 4]
    out.append(9)

    # preempted again in the middle of its re-prefill: the pending chunk record is dropped
    proc.update_state(bu(removed=[1]))
    proc.update_state(bu(added=[add(0, "r", out)]))  # back at length 5
    _step(proc, [[0.9] * 10])
    proc.update_state(bu(removed=[0]))  # out of the batch again, the output did not grow
    assert [r.index for r in sent if r.index >= 0] == [0, 2, 3, 4] and not proc.resuming and not proc.deferred

    # a resumed request that ends at its kept chunk's token: sent by the step that clears it
    proc.update_state(bu(added=[add(2, "r", out)]))
    _step(proc, [[0.0] * 10, [0.0] * 10, [0.1] * 10])
    out.append(0)
    proc.update_state(bu(removed=[2]))
    assert [r.index for r in sent if r.index >= 0] == [0, 2, 3, 4, 5]



@both_forms
def test_a_resumed_helper_request_defers_its_re_prefill_rows_too():
    """A verdict-only helper request is never parked, so a resumed one starts over; its
    re-prefill chunks' rows still wait for the kept one (the self-check reads its answer rows
    by index: a discarded chunk's row must not stand for a token's), and it is not ended."""
    from safeserve.server import safety_wire as W

    proc, sent = _processor()
    bu = lambda removed=(), added=(): SimpleNamespace(removed=list(removed), added=list(added), moved=[])  # noqa: E731
    out = [7, 7]
    args = _args("check", verdict_only=True).to_extra_args()
    proc.update_state(bu(added=[(0, SimpleNamespace(extra_args=args), [], out)]))  # resumed at 2
    assert proc.phase[0] != W.PHASE_DONE and "check" in proc.resuming
    _step(proc, [[0.9] * 10])  # a chunk inside the prompt
    _step(proc, [[0.1] * 10])  # the last chunk
    assert not [r for r in sent if r.index >= 0]  # neither is out yet
    out.append(8)  # vLLM kept the last chunk's token
    proc.update_state(None)
    assert [(r.index, r.scores[0]) for r in sent if r.index >= 0] == [(2, pytest.approx(0.1))]

def test_a_deferred_record_counts_no_engine_step():
    """The hub counts a step per message with its seconds; a deferred record carries None."""
    from safeserve.server import metrics
    from safeserve.server import safety_wire as W
    from safeserve.server.safety_tracker import TelemetryHub

    hub = TelemetryHub()
    t = _bare_tracker()
    hub.register(t)
    before = metrics.SAFETY_STEPS._value.get()
    hub._route([W.StepRecord("r", 0, [0.1] * 10, 0, 0, 0, -1, 0, 0)], None)
    assert metrics.SAFETY_STEPS._value.get() == before and t.has_step(0)
    hub._route([W.StepRecord("r", 1, [0.1] * 10, 0, 0, 0, -1, 0, 0)], 0.001)
    assert metrics.SAFETY_STEPS._value.get() == before + 1


def test_holdback_does_not_release_the_first_token_on_a_prompt_chunks_forced_record():
    """An earlier prompt chunk's record may say token 0 was forced while the last chunk's
    (still in flight) says it was sampled: the first token waits for step 1's verdict."""
    from safeserve.server import safety_wire as W

    t = _bare_tracker()
    t.add(_rec(0, event=2, phase=W.PHASE_REFUSING, forced=5, acted=1))  # an earlier chunk
    assert t.releasable(1, finished=False) == 0
    t.add(_rec(0))  # the last chunk: clean, token 0 was sampled
    assert t.releasable(1, finished=False) == 0
    t.add(_rec(1))
    assert t.releasable(2, finished=False) == 1


def test_records_after_finish_are_stray_and_a_one_token_answer_waits_for_the_end():
    """A step the engine ran past a choice's end (a stop string found in the frontend) does not
    change it; a one-token response waits for the worker's end-of-request record, which proves
    its index-0 record is the last prompt chunk's."""
    import asyncio

    from safeserve.server import safety_wire as W

    t = _bare_tracker()
    for j in range(3):
        t.add(_rec(j))
    t.finish("stop", 3)
    t.add(_rec(3, event=2, phase=W.PHASE_DONE, forced=0, acted=1))  # past the end
    assert not t.acted and not t.has_step(3) and t.report().action == "none"
    # The same records before the engine's last output (as under load): the same outcome.
    # Which came first is a race no wait settles, so steps from n_tokens on are undone at
    # finish, as they are dropped after it: the last token (2), read by step 3, is never
    # judged, however the response ended.
    for before in (True, False):
        t = _bare_tracker()
        for j in range(3):
            t.add(_rec(j, event=1 if j else 0))  # a violating run under way at the end
        late = [_rec(3, event=2, phase=W.PHASE_DONE, forced=0, acted=1),  # completes it (tau 3)
                W.StepRecord("r", 4, [0.99] * 10, 2, 3, W.PHASE_DONE, 0, 1, 0)]
        for rec in late if before else []:
            t.add(rec)
        t.finish("stop", 3)
        for rec in [] if before else late:
            t.add(rec)
        assert not t.acted and not t.cut and not t.has_step(3) and not t.has_step(4)
        report = t.report()
        assert not report.response.flagged and report.action == "none"
        assert max(report.response.max_scores.values()) < 0.5  # steps 3 and 4 undone
    # and a clean answer whose steps past the end triggered (step 4 only) stays clean
    t = _bare_tracker()
    for j in range(4):
        t.add(_rec(j))
    t.add(W.StepRecord("r", 4, [0.99] * 10, 2, 3, W.PHASE_DONE, 0, 1, 0))
    assert t.acted and t.stop_forced
    t.finish("stop", 3)
    assert not t.acted and not t.stop_forced and not t.cut and t.report().action == "none"

    async def one_token():
        t = _bare_tracker()
        t.add(W.StepRecord("r", W.GONE, [], 0, 0, 0, -1, 0))  # unscheduled for a step mid-prompt
        t.add(_rec(0))  # an earlier chunk, back in the batch: clean
        waiting = asyncio.ensure_future(t.wait_verdict())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        # unscheduled again before its last chunk: it left with no token, which proves nothing
        t.add(W.StepRecord("r", W.GONE, [], 0, 0, 0, -1, 0, left_at=0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        t.add(_rec(0, event=2, phase=W.PHASE_DONE, forced=0, acted=1))  # the last chunk
        t.add(W.StepRecord("r", W.GONE, [], 0, 0, 0, -1, 0, left_at=1))  # done: one token
        await asyncio.wait_for(waiting, 1)
        return t

    t = asyncio.run(one_token())
    assert t.stop_forced and t.report().action == "stop" and not t.incomplete


@both_forms
def test_the_worker_reports_each_request_it_lets_go():
    from safeserve.server import safety_wire as W

    proc, sent = _processor()
    out = []
    bu = lambda removed=(), added=(): SimpleNamespace(removed=list(removed), added=list(added), moved=[])  # noqa: E731
    proc.update_state(bu(added=[(0, SimpleNamespace(extra_args=_args("r").to_extra_args()), [], out)]))
    _step(proc, [[0.1] * 10])
    proc.update_state(bu(removed=[0]))
    assert [(r.rid, r.index, r.left_at) for r in sent] == [("r", 0, 0), ("r", W.GONE, 0)]
    out2 = [7]  # a request that leaves with a token sampled says so
    proc.update_state(bu(added=[(0, SimpleNamespace(extra_args=_args("s").to_extra_args()), [], out2)]))
    proc.update_state(bu(removed=[0]))
    assert (sent[-1].rid, sent[-1].index, sent[-1].left_at) == ("s", W.GONE, 1)


def test_one_records_failure_does_not_drop_the_other_requests_records():
    from safeserve.server.safety_tracker import TelemetryHub

    hub = TelemetryHub()  # not started: routing only
    bad, good = _bare_tracker(), _bare_tracker()
    good.rid = "g"

    def broken(rec):
        raise RuntimeError("boom")

    bad.add = broken
    hub.register(bad)
    hub.register(good)
    rec_g = _rec(0)
    rec_g.rid = "g"
    hub._route([_rec(0), rec_g], None)
    assert good.prompt is rec_g  # routed after the failure
    assert bad.incomplete  # fail closed: a step of it could not be shown


@both_forms
def test_a_nan_score_fails_closed_and_is_reported_as_a_number():
    """A NaN from an overflowed hidden state must not let the row through (it compares false
    in the kernel) nor reach the JSON report."""
    proc, sent = _processor()
    out = []
    proc._add(0, _args("r"), out)
    logits = _step(proc, [[float("nan")] * 10])  # the prompt row
    assert int(logits[0].argmax()) == 5 and sent[-1].event == 2  # refusal forced
    assert sent[-1].scores == [1.0] * 10


@both_forms
def test_a_prompt_veto_caps_the_verdict_but_never_a_nan():
    """Format 11: the veto's K columns come last; at a prompt row each output is capped at
    its veto column, so a veto of 0 clears a verdict that flags every output, but a NaN in the
    verdict still reads as certain (fail closed), whatever the veto says; a prefilled
    request's prompt row is not capped."""
    proc, sent = _processor()
    proc.n_veto = 10
    for i, rid in enumerate(("capped", "nan", "passed")):
        proc._add(i, _args(rid), [])
    proc._add(3, _args("prefilled", prefilled=True), [])
    nan = float("nan")
    logits = _step(proc, [[0.9] * 20 + [0.0] * 10, [nan] * 20 + [0.0] * 10,
                          [0.9] * 20 + [0.95] * 10, [0.9] * 20 + [0.0] * 10])
    by_rid = {r.rid: r for r in sent}
    # a prefilled request's prompt row reads the attacker's opening: never vetoed
    assert by_rid["prefilled"].event == 2 and by_rid["prefilled"].scores == pytest.approx([0.9] * 10)
    assert by_rid["capped"].event == 0 and by_rid["capped"].scores == [0.0] * 10
    assert int(logits[0].argmax()) != 5
    assert by_rid["nan"].event == 2 and by_rid["nan"].scores == [1.0] * 10
    assert int(logits[1].argmax()) == 5  # the refusal forced
    assert by_rid["passed"].event == 2 and by_rid["passed"].scores == pytest.approx([0.9] * 10)


@both_forms
def test_a_request_re_added_while_its_old_row_is_refilled_by_a_move_keeps_its_state():
    """b leaves row 0, a (row 1, refusing) is removed and re-added in the same step into row
    0, and a condense move fills row 1 from row 2: a must find its snapshot (the move's
    destination is parked before the adds), and no stale snapshot of it stays parked."""
    from vllm.v1.sample.logits_processor import MoveDirectionality

    proc, _ = _processor()
    outs = {"b": [], "a": [], "x": []}
    for i, rid in enumerate(("b", "a", "x")):
        proc._add(i, _args(rid), outs[rid])
    _step(proc, [[0.1] * 10, [0.9] * 10, [0.1] * 10])  # a's prompt is flagged: refusing
    for rid in outs:
        outs[rid].append(5 if rid == "a" else 7)
    add = (0, SimpleNamespace(extra_args=_args("a").to_extra_args()), [], outs["a"])
    proc.update_state(SimpleNamespace(removed=[], added=[add],
                                      moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert proc.rids[:2] == ["a", "x"] and int(proc.phase[0]) == 1  # still refusing
    assert "a" not in proc.parked


@both_forms
def test_a_requests_prompt_thresholds_judge_its_prompt_row_only():
    """threshold_shift lowers the row's (response) thresholds; its prompt row is judged at the
    prompt thresholds, exactly (a score equal to one is flagged), for that row alone."""
    import numpy as np

    proc, sent = _processor()
    shifted = 1.0 / (1.0 + 2.718281828 ** 3)  # 0.5 moved by -3 logits: 0.047
    at = float(np.float32(0.999753))  # a score exactly at its prompt threshold
    outs = {"a": [], "b": []}
    proc._add(0, _args("a", thresholds=[shifted] * 10, prompt_thresholds=[0.5] * 9 + [at],
                       tau=1), outs["a"])
    proc._add(1, _args("b", thresholds=[shifted] * 10, tau=1), outs["b"])
    _step(proc, [[0.2] * 10, [0.2] * 10])  # both prompts at 0.2
    a, b = sent[-2], sent[-1]
    assert a.event == 0 and b.event == 2  # a judged at 0.5, b at 0.047
    assert a.scores == b.scores == [pytest.approx(0.2)] * 10  # reported as scored
    outs["a"].append(7)
    _step(proc, [[0.2] * 10, [0.0] * 10])  # a's first response step: judged at 0.047
    assert sent[-2].event == 2
    proc._add(2, _args("c", thresholds=[shifted] * 10, prompt_thresholds=[0.5] * 9 + [at],
                       tau=1), [])
    _step(proc, [[0.0] * 10, [0.0] * 10, [0.0] * 9 + [at]])
    assert sent[-1].rid == "c" and sent[-1].event == 2


def test_a_tracker_whose_report_fails_is_still_released():
    from safeserve.models.taxonomy import Taxonomy
    from safeserve.server.safety_config import SafetyPolicy
    from safeserve.server.safety_service import SafetyService
    from safeserve.server.safety_tracker import TelemetryHub

    hub = TelemetryHub()
    svc = SafetyService(SafetyPolicy(Taxonomy.load()), hub, lambda: None)
    t = _bare_tracker()

    def broken(*a):
        raise RuntimeError("boom")

    t.record_metrics = broken
    hub.register(t)
    with pytest.raises(RuntimeError):
        svc.close(t, "stop")
    assert t.rid not in hub.trackers  # not left registered to collect records forever


def test_a_host_stopped_requests_scores_end_at_its_stop():
    """A structured-output request stopped by the HTTP side: the engine may run a few steps
    past the stop before its abort lands; their scores read tokens nobody sees, so the
    response's max_scores leave them out."""
    from safeserve.kernels.safety_decision import EVENT_TRIGGER
    from safeserve.server import safety_wire as W
    from safeserve.server.safety_tracker import RequestTracker

    args = _args("r", action=W.ACTION_ANNOTATE)
    tracker = RequestTracker("r", tuple(f"c{i}" for i in range(10)), args, "stop", {}, False,
                             host_stop=True)
    tracker.add(W.StepRecord("r", 0, [0.1] * 10, 0, 0, W.PHASE_WATCH, -1, 0))
    for i in (1, 2):
        tracker.add(W.StepRecord("r", i, [0.2] * 10, 0, 0, W.PHASE_WATCH, -1, 0))
    tracker.add(W.StepRecord("r", 3, [0.2] + [0.7] + [0.2] * 8, EVENT_TRIGGER, 2,
                             W.PHASE_WATCH, -1, 0))
    assert tracker.host_stopped and tracker.trigger_index == 3
    for i in (4, 5):  # past the stop: the abort has not landed yet
        tracker.add(W.StepRecord("r", i, [0.99] * 10, 0, 0, W.PHASE_WATCH, -1, 0))
    tracker.finish("stop", 6)
    scores = tracker.report().response.max_scores
    assert scores["c1"] == pytest.approx(0.7) and scores["c0"] == pytest.approx(0.2)
    assert max(scores.values()) < 0.99
