"""Move a trained head's operating point without retraining: the prompt verdict's and the
response rule's thresholds by logit shifts, and tau. The point is the one `safeserve eval
replay` picks on a development run (see README, Evaluation).

A head serves one threshold per output; the prompt verdict's own operating point is already
folded into its weights along the prompt-end read-out (v, c), with v.h + c ~ 1 at prompt ends
and ~ 0 on generated tokens (``safety_train.finish_head``). To move the response thresholds
by ``rs`` and the prompt thresholds by ``ps`` (logits; + asks for more evidence):

    served thresholds   t' = sigmoid(logit(t) + rs)           (the overall output: bias -= rs,
                                                                 it keeps firing at 0.5)
    fold                logits += (rs - ps) * (v.h + c)        (net move at prompt ends: ps)

The fold also moves generated-token logits by (rs - ps) * (v.h + c), which is small, not zero
(the read-out's spread there is reported in the head's metrics), so the served numbers are
measured by serving the new head, not taken from the replay. ``tau`` is written into the head
(``operating_point.tau``); the server applies it to requests that do not set ``tau``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from safeserve.models.checkpoint import SafetyHead, load_safety_head
from safeserve.models.decision_defaults import OPERATING_POINT


def shift_head(head: SafetyHead, v: torch.Tensor, c: float, *, prompt_shift: float,
               response_shift: float, tau: int, alert_margin: float | None = None,
               alert_tau: int | None = None) -> SafetyHead:
    """A copy of ``head`` whose prompt and response thresholds moved by the given logits,
    with the given alert band (``alert_margin`` logits below the prompt thresholds: the
    response rule acts after ``alert_tau`` steps; 0: no band; None: ``head``'s own band, kept)."""
    from safeserve.models.decision_defaults import alert_band
    from safeserve.models.safety_train import with_thresholds

    if alert_margin is None:
        alert_margin, kept_tau = alert_band(head.extra)
        alert_tau = alert_tau if alert_tau is not None else kept_tau
    if tau < 1:
        raise ValueError("tau must be >= 1")
    if alert_margin < 0 or (alert_margin > 0 and (alert_tau is None or alert_tau < 1)):
        raise ValueError("an alert band needs alert_margin > 0 and alert_tau >= 1")
    fold = response_shift - prompt_shift
    weight = head.weight.float() + fold * v.float()[None, :]
    bias = head.bias.float() + fold * c
    bias[-1] -= response_shift  # the overall output's threshold lives in its bias

    def moved(t: float) -> float:
        return 1.0 / (1.0 + math.exp(-(math.log(t / (1 - t)) + response_shift)))

    thresholds = [moved(cat.threshold) for cat in head.taxonomy.categories]
    extra = dict(head.extra)
    extra[OPERATING_POINT] = {"prompt_shift": prompt_shift, "response_shift": response_shift,
                              "tau": tau, "moved_from": extra.get(OPERATING_POINT)}
    if alert_margin > 0:
        extra[OPERATING_POINT].update(alert_margin=alert_margin, alert_tau=alert_tau)
    return SafetyHead(weight, bias, with_thresholds(head.taxonomy, thresholds), head.layer,
                      extra, head.mlp)


def _readout_of_gate(head: SafetyHead) -> tuple[torch.Tensor, float]:
    """The prompt-end read-out a gated MLP carries: its gate is clamp(1 - s (v.h + c), 0, 1)
    with (v, c) fitted the same way on the head's training data and sharpened by s."""
    from safeserve.models.safety_train import GATE_SHARPNESS

    if head.mlp is None or len(head.mlp) < 4:
        raise ValueError("this head has no gated MLP to read the prompt-end read-out from: "
                         "give --eval-data (the held-out trajectories it was calibrated on)")
    gate = head.mlp[3].float() / GATE_SHARPNESS
    return gate[:-1], float(gate[-1])


def move_operating_point(head_dir: Path, model_dir: Path, eval_data, out: Path, *,
                         prompt_shift: float, response_shift: float, tau: int,
                         alert_margin: float | None = None, alert_tau: int | None = None,
                         max_length: int = 512, batch_size: int = 16,
                         cache_dir: Path | None = None, seed: int = 0, log=print) -> dict:
    """Re-estimate the prompt-end read-out on the held-out files (the calibration half, as
    training did), or take a gated head's own when no files are given; shift the head, write
    ``<out>/safety_head/`` (and copy a LoRA adapter)."""
    head = load_safety_head(head_dir)
    if eval_data:
        v, c, readout = _readout_of_data(head, model_dir, eval_data, max_length, batch_size,
                                         cache_dir, seed, log)
    else:
        v, c = _readout_of_gate(head)
        readout = {"source": "the head's gate (its training data's prompt-end read-out)"}
    new = shift_head(head, v, c, prompt_shift=prompt_shift, response_shift=response_shift,
                     tau=tau, alert_margin=alert_margin, alert_tau=alert_tau)
    old_metrics = Path(head_dir) / "safety_head" / "metrics.json"
    metrics = json.loads(old_metrics.read_text()) if old_metrics.is_file() else {}
    metrics[OPERATING_POINT] = {
        **new.extra[OPERATING_POINT], "prompt_end_readout": readout,
        "served_thresholds": {cat.id: cat.threshold for cat in new.taxonomy.categories},
        "moved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "metrics above this block were measured at the head's previous operating point"}
    from safeserve.models.safety_train import write_checkpoint

    write_checkpoint(new, metrics, Path(out), new.extra)
    adapter = Path(head_dir) / "adapter"
    if adapter.is_dir() and Path(out) != Path(head_dir):
        shutil.copytree(adapter, Path(out) / "adapter", dirs_exist_ok=True)
    spread = (f"; read-out on response tokens {readout['at_response_mean']:.3f} "
              f"± {readout['at_response_std']:.3f}" if "at_response_mean" in readout else "")
    point = new.extra[OPERATING_POINT]
    band = (f", alert band {point['alert_margin']:g} logits (tau {point['alert_tau']})"
            if point.get("alert_margin") else "")
    log(f"moved the operating point: prompt {prompt_shift:+g}, response {response_shift:+g} "
        f"logits, tau {tau}{band}{spread}")
    return metrics[OPERATING_POINT]


def _readout_of_data(head: SafetyHead, model_dir: Path, eval_data, max_length: int,
                     batch_size: int, cache_dir: Path | None, seed: int,
                     log) -> tuple[torch.Tensor, float, dict]:
    """(v, c) fitted on the calibration half of the held-out files, and its spread."""
    from safeserve.models.safety_train import (
        MASK_PROMPT,
        MASK_RESPONSE,
        _load_lm,
        _paths,
        concat_features,
        file_features,
        prompt_end_direction,
        split_groups,
    )

    model, tok = _load_lm(Path(model_dir))
    model.eval()
    feats = concat_features([file_features(p, model, tok, Path(model_dir), head.taxonomy,
                                           [head.layer], max_length, batch_size, cache_dir,
                                           "heldout", log) for p in _paths(eval_data)])
    cal_ids, _ = split_groups(feats.meta, 0.5, seed)
    cal = feats.subset(cal_ids)
    hidden = cal.hidden[head.layer]
    v, c = prompt_end_direction(hidden, cal.kind)
    ind = hidden.float() @ v + c
    readout = {"at_prompt_end_mean": float(ind[cal.kind == MASK_PROMPT].mean()),
               "at_response_mean": float(ind[cal.kind == MASK_RESPONSE].mean()),
               "at_response_std": float(ind[cal.kind == MASK_RESPONSE].std())}
    return v, c, readout
