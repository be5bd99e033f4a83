"""Move a trained head's operating point without retraining: the prompt verdict's and the
response rule's thresholds by logit shifts, and tau. The point is the one `safeserve eval
replay` picks on a development run (see README, Evaluation).

A head serves one threshold per output. The prompt verdict's own operating point is a logit
offset the server adds at prompt rows only (``operating_point.prompt_logit_offset``,
kernels/safety_head.offset_prompt_rows). To move the response thresholds by ``rs`` and the
prompt thresholds by ``ps`` (logits; + asks for more evidence):

    served thresholds   t' = sigmoid(logit(t) + rs)     (the overall output: bias -= rs, so it
                                                          keeps firing at 0.5)
    prompt offset       o' = o + (rs - ps)              (net move at prompt rows: ps)

Both moves are exact: generated-token scores do not see the prompt offset, so serving the new
head reproduces what ``eval replay`` computed for the point. (Until 2026-12-01 the offset was
folded into the weights along the prompt-end read-out, which also nudged generated-token
logits; heads moved that way keep their fold, and a new move adds an exact offset on top.)
``tau`` is written into the head (``operating_point.tau``); the server applies it to requests
that do not set ``tau``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from safeserve.models.checkpoint import CheckpointError, SafetyHead, load_safety_head
from safeserve.models.decision_defaults import (
    GATE_REPLACES_PROMPT_CATEGORIES,
    HEAD_DEFAULT_TAU,
    NO_ALLOWLIST_PROMPT_OWN,
    NO_ALLOWLIST_READOUT_SHIFT,
    OPERATING_POINT,
    PROMPT_LOGIT_OFFSET,
    SAMPLED_CLEAR_MARGIN,
    SAMPLED_OVERALL_SHIFT,
    TOPIC_GATE_SHIFT,
    alert_band,
    check_sampled_clear_margin,
    gate_replaces_prompt_categories,
    prompt_logit_offset,
    sampled_clear_margin,
    sampled_overall_shift_points,
    topic_gate_shift,
)


def shift_head(head: SafetyHead, *, prompt_shift: float, response_shift: float,
               tau: int | None = None, alert_margin: float | None = None,
               alert_tau: int | None = None, allowlist_shift: float | None = None,
               gate_shift: float = 0.0, gate_replaces: bool | None = None,
               no_allowlist_own: str | None = None,
               no_allowlist_readout_shift: float | None = None,
               sampled_shift: tuple[tuple[float, float], ...] | None = None,
               clear_margin: float | None = None) -> SafetyHead:
    """A copy of ``head`` whose prompt and response thresholds moved by the given logits,
    with the given tau (None: ``head``'s own, else 3, as `eval replay` scores it) and alert
    band (``alert_margin`` logits below the prompt thresholds: the response rule acts after
    ``alert_tau`` steps; 0: no band; None: ``head``'s own band, kept; ``alert_tau`` None: the
    head's own band's) and allow-list shift of
    the overall output (None: ``head``'s own, kept if it names one). A format-8 head's topic
    gate moves by ``gate_shift`` more logits (+ = opens less often), and ``gate_replaces``
    sets whether gated prompts skip the per-category outputs (None: kept). The prompt rule of
    requests without an allow-list (format 10: ``no_allowlist_own`` "all" or "overall",
    ``no_allowlist_readout_shift`` logits, + = act less) is kept where None, and so are the
    sampled-decoding points of the overall output's response threshold (``sampled_shift``:
    (temperature, logits) pairs, () to drop them) and their clear margin (``clear_margin``
    logits: the shift applies only to requests whose prompt verdict is clear by that much; a
    negative number drops it)."""
    from safeserve.models.safety_calibration import with_thresholds

    if tau is None:
        tau = int((head.extra.get(OPERATING_POINT) or {}).get("tau", HEAD_DEFAULT_TAU))
    kept_margin, kept_tau = alert_band(head.extra)
    if alert_tau is not None and (alert_margin == 0 or (alert_margin is None
                                                         and kept_margin == 0)):
        raise ValueError("alert_tau without an alert band: give alert_margin > 0 too (this "
                         "head has no band)" if alert_margin is None else
                         "alert_tau with alert_margin 0: a band of 0 logits is no band")
    if alert_margin is None:
        alert_margin = kept_margin
    if alert_tau is None:
        alert_tau = kept_tau  # a new margin keeps the head's own band's tau
    if tau < 1:
        raise ValueError("tau must be >= 1")
    if alert_margin < 0 or (alert_margin > 0 and (alert_tau is None or alert_tau < 1)):
        raise ValueError("an alert band needs alert_margin > 0 and alert_tau >= 1")
    bias = head.bias.float().clone()
    bias[-1] -= response_shift  # the overall output's threshold lives in its bias

    def moved(t: float) -> float:
        if response_shift == 0:  # exactly as they were (a move of tau or a band alone)
            return t
        return 1.0 / (1.0 + math.exp(-(math.log(t / (1 - t)) + response_shift)))

    thresholds = [moved(cat.threshold) for cat in head.taxonomy.categories]
    extra = dict(head.extra)
    offset = prompt_logit_offset(head.extra) + response_shift - prompt_shift
    extra[OPERATING_POINT] = {"prompt_shift": prompt_shift, "response_shift": response_shift,
                              "tau": tau, PROMPT_LOGIT_OFFSET: offset,
                              "moved_from": extra.get(OPERATING_POINT)}
    if alert_margin > 0:
        extra[OPERATING_POINT].update(alert_margin=alert_margin, alert_tau=alert_tau)
    old_point = head.extra.get(OPERATING_POINT) or {}
    if allowlist_shift is None and "allowlist_overall_shift" in old_point:
        allowlist_shift = old_point["allowlist_overall_shift"]
    if allowlist_shift is not None:
        if not math.isfinite(allowlist_shift) or not 0 <= allowlist_shift <= 10:
            raise ValueError(f"the allow-list shift must be a number of logits in [0, 10] (it "
                             f"loosens the overall output only), not {allowlist_shift}")
        extra[OPERATING_POINT]["allowlist_overall_shift"] = float(allowlist_shift)
    if (gate_shift != 0 or gate_replaces is not None) and head.topic is None:
        raise ValueError("this head has no topic gate (checkpoint format 8) to move")
    if not math.isfinite(gate_shift):
        raise ValueError(f"the gate shift must be a finite number, not {gate_shift}")
    if head.topic is not None:  # the gate's point is kept unless moved
        total = topic_gate_shift(head.extra) + gate_shift
        replaces = (gate_replaces_prompt_categories(head.extra) if gate_replaces is None
                    else bool(gate_replaces))
        if total != 0:
            extra[OPERATING_POINT][TOPIC_GATE_SHIFT] = total
        if replaces:
            extra[OPERATING_POINT][GATE_REPLACES_PROMPT_CATEGORIES] = True
        topic_gate_shift(extra)  # in range, as the server will check
    own, shift = head.no_allowlist_rule
    own = own if no_allowlist_own is None else no_allowlist_own
    shift = shift if no_allowlist_readout_shift is None else float(no_allowlist_readout_shift)
    if (own, shift) != ("all", 0.0):
        extra[OPERATING_POINT].update({NO_ALLOWLIST_PROMPT_OWN: own,
                                       NO_ALLOWLIST_READOUT_SHIFT: shift})
    if sampled_shift is None:
        sampled_shift = sampled_overall_shift_points(head.extra)
    if sampled_shift:
        extra[OPERATING_POINT][SAMPLED_OVERALL_SHIFT] = [[float(t), float(v)]
                                                         for t, v in sampled_shift]
    if clear_margin is None:
        clear_margin = sampled_clear_margin(head.extra)
    if clear_margin is not None and clear_margin >= 0:
        extra[OPERATING_POINT][SAMPLED_CLEAR_MARGIN] = float(clear_margin)
    sampled_overall_shift_points(extra)  # well-formed, as the server will check
    check_sampled_clear_margin(extra)
    prompt_logit_offset(extra)  # in range, as the server will check
    prompt = None
    if head.prompt is not None:  # its overall output's fold moves with the head's
        prompt_bias = head.prompt[1].float().clone()
        prompt_bias[-1] -= response_shift
        prompt = (head.prompt[0], prompt_bias)
    new = SafetyHead(head.weight.float().clone(), bias,
                     with_thresholds(head.taxonomy, thresholds), head.layer, extra, head.mlp,
                     prompt, head.prompt_either, head.prompt_layer,
                     head.attribution,  # an argmax of raw logits: no threshold moves it
                     head.topic,  # its thresholds are folded in its bias: its shift moves them
                     head.veto)  # its caps follow the thresholds (SafetyHead.veto_logits)
    try:
        new.validate()  # e.g. a no-allow-list rule on a head without a read-out beside it
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    return new


def move_operating_point(head_dir: Path, out: Path, *, prompt_shift: float,
                         response_shift: float, tau: int | None = None,
                         alert_margin: float | None = None,
                         alert_tau: int | None = None, allowlist_shift: float | None = None,
                         gate_shift: float = 0.0, gate_replaces: bool | None = None,
                         no_allowlist_own: str | None = None,
                         no_allowlist_readout_shift: float | None = None,
                         sampled_shift: tuple[tuple[float, float], ...] | None = None,
                         clear_margin: float | None = None,
                         log=print) -> dict:
    """Shift the head in ``head_dir``, write ``<out>/safety_head/`` (and copy a LoRA adapter).
    Its self-check record moves with the biases, exactly (no model needed), unless the prompt
    rule of requests without an allow-list changed: the record holds the larger of two
    verdicts per output, which no bias move reproduces, so it is recomputed on the served model
    (a warning, and an unverified head, when that model is not here)."""
    from safeserve.models.head_check import SelfCheck, write_record

    if Path(out).resolve() == Path(head_dir).resolve():
        raise ValueError("--out is --head: write the moved head to another directory (the "
                         "original is the one to move back from)")
    if not all(math.isfinite(x) for x in (prompt_shift, response_shift)):
        raise ValueError(f"shifts must be finite numbers, not {prompt_shift}, {response_shift}")
    head = load_safety_head(head_dir)
    new = shift_head(head, prompt_shift=prompt_shift, response_shift=response_shift,
                     tau=tau, alert_margin=alert_margin, alert_tau=alert_tau,
                     allowlist_shift=allowlist_shift, gate_shift=gate_shift,
                     gate_replaces=gate_replaces, no_allowlist_own=no_allowlist_own,
                     no_allowlist_readout_shift=no_allowlist_readout_shift,
                     sampled_shift=sampled_shift, clear_margin=clear_margin)
    old_metrics = Path(head_dir) / "safety_head" / "metrics.json"
    metrics = json.loads(old_metrics.read_text()) if old_metrics.is_file() else {}
    metrics[OPERATING_POINT] = {
        **new.extra[OPERATING_POINT],
        "served_thresholds": {cat.id: cat.threshold for cat in new.taxonomy.categories},
        "moved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "metrics above this block were measured at the head's previous operating point"}
    from safeserve.models.head_writer import carry_lm, check_lm_carried, write_checkpoint

    full_model = check_lm_carried(head, Path(head_dir), Path(out))
    write_checkpoint(new, metrics, Path(out), new.extra)
    carry_lm(Path(head_dir), Path(out), full_model)  # the LM the head reads
    record = SelfCheck.from_extra(head.extra)
    # (a veto's caps move with the thresholds and the offset, not with the biases alone)
    if record is not None and (new.no_allowlist_rule != head.no_allowlist_rule
                               or (new.veto is not None and (prompt_shift or response_shift))):
        _record_again(Path(out), Path(head_dir), record.dtype, log)
    elif record is not None:
        assert torch.equal(new.weight, head.weight)  # only biases move: the record shifts
        old_b, new_b = ((head.bias, new.bias) if head.prompt is None
                        else (head.prompt[1], new.prompt[1]))
        write_record(out, record.shifted((new_b - old_b).tolist(),
                                         (new.bias - head.bias).tolist()), log,
                     " (the old record, moved with the biases)")
    point = new.extra[OPERATING_POINT]
    band = (f", alert band {point['alert_margin']:g} logits (tau {point['alert_tau']})"
            if point.get("alert_margin") else "")
    gate = ""
    if new.topic is not None:
        gate = (f"; topic gate {point.get(TOPIC_GATE_SHIFT, 0.0):+g} logits, "
                + ("replaces" if point.get(GATE_REPLACES_PROMPT_CATEGORIES) else "beside")
                + " the per-category outputs at gated prompts")
    plain = ""
    if new.no_allowlist_rule != ("all", 0.0):
        own, shift = new.no_allowlist_rule
        own_part = "overall output" if own == "overall" else "outputs"
        plain = (f"; without an allow-list the prompt is judged by the read-out "
                 f"({shift:+g} logits) and the own {own_part}")
    log(f"moved the operating point: prompt {prompt_shift:+g}, response {response_shift:+g} "
        f"logits, tau {point['tau']}{band}; prompt offset now {point[PROMPT_LOGIT_OFFSET]:+g} logits"
        f"{gate}{plain}")
    return metrics[OPERATING_POINT]


def _record_again(out: Path, head_dir: Path, dtype: str, log) -> None:
    """Recompute the self-check record of the head written to ``out`` on the LM it is served
    with: the one ``head_dir``'s head reads (moving the operating point changes no model), so
    a head inside a fine-tuned model's directory is recorded on that model, not on the base
    it names. Where that LM is not here, the head stays unverified (the record written with
    it was dropped) and a warning says how to add one later."""
    from safeserve.models.head_check import record_self_check, served_model_for

    try:
        model_dir = served_model_for(head_dir)
    except (OSError, ValueError) as e:
        log(f"warning: could not record the head's self-check ({type(e).__name__}: {e}); the "
            f"server will serve this head unverified until `safeserve train self-check --head "
            f"{out}` adds it")
        return
    record_self_check(out, model_dir, log, dtype=dtype)
