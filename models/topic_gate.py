"""The topic gate (``safeserve train topic-gate``; checkpoint format 8).

An allow-list says which kinds of risk a request may touch, so under one the question is what
the request is about, not only whether it is harmful. The per-token head and the prompt verdict
judge harm; on casually phrased requests ("Why are Christians such bad people?", "How do I put a
tracker on my wife?") they stay far below threshold, so under v8 nearly half of CoSAlign-Test's
requests whose risks the config does not allow were answered, none of them acted on. The gate
is a multi-label read-out over the prompt end's final state, one output per category: the
categorised harmful prompts of ``train prompt-head --questions`` are positive for their
labelled categories, every benign prompt of the same builder (Alpaca, role-play, written hard
negatives, the project-labelled safe questions) negative for all; with ``wildguard`` also the
project-labelled WildGuardMix prompts, both ways (measured in session 27, not adopted: on
CoSAlign-Test's development split it gated fewer disallowed requests than v11's gate at the
same benign and allowed-request cost). Each category's threshold is
the ``1 - target_fpr`` quantile of held-out benign prompts' logits plus ``shift`` logits,
folded into the bias so that the gate is open at logit >= 0.

Served only under a non-empty allow-list (``kernels/safety_decision.gate_topics``): a category
the request does not allow whose gate is open flags the prompt for it. Requests without an
allow-list never consult it: a topic read-out flags benign prompts that merely mention a
risky subject (the reason the default verdict is a harm detector), which an allow-listed
request, one that named its risks, has opted out of.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def gate_thresholds(benign_logits: torch.Tensor, target_fpr: float, shift: float) -> torch.Tensor:
    """Per category, the ``1 - target_fpr`` quantile of the benign logits plus ``shift``."""
    return torch.quantile(benign_logits, 1 - target_fpr, dim=0) + shift


def train_topic_gate(head_dir: Path, out: Path, data_root: Path, model_dir: Path | None = None,
                     target_fpr: float = 0.02, shift: float = 1.5, seed: int = 0,
                     wildguard: bool = False, heldout_questions: bool = False,
                     log=print) -> dict:
    """Fit the topic gate for the format-7 head in ``head_dir`` and write ``<out>/safety_head/``
    (every other tensor and the operating point unchanged, except that a gate operating point
    the input head carries (``topic_gate_shift``, ``gate_replaces_prompt_categories``: it
    already had a gate, moved by ``train operating-point``) is reset: it belonged to the old
    gate, and the new one opens exactly at the thresholds it records)."""
    from safeserve.models.attribution import category_readout_data, top_hit_rate
    from safeserve.models.checkpoint import load_safety_head
    from safeserve.models.decision_defaults import (GATE_REPLACES_PROMPT_CATEGORIES,
                                                    OPERATING_POINT, TOPIC_GATE_SHIFT)
    from safeserve.models.head_check import served_model_for
    from safeserve.models.prompt_head import (build_prompt_rows, fit_readout,
                                              write_readout_checkpoint)

    if not 0 < target_fpr < 1:
        raise ValueError(f"target_fpr must be in (0, 1), not {target_fpr}")
    t0 = time.time()
    head = load_safety_head(head_dir)
    if head.attribution is None:
        raise ValueError(f"the head in {head_dir} has no attribution read-out (format 7): "
                         "run `safeserve train attribution` first")
    point = dict(head.extra.get(OPERATING_POINT) or {})
    reset = {k: point.pop(k) for k in (TOPIC_GATE_SHIFT, GATE_REPLACES_PROMPT_CATEGORIES)
             if k in point}
    if reset:
        log(f"the input head's gate operating point {reset} belongs to its old gate: reset "
            "(apply it to the new one with `train operating-point`)")
        head.extra = {**head.extra, OPERATING_POINT: point}
    lm_dir = served_model_for(Path(head_dir), model_dir)
    cats = [c.id for c in head.taxonomy.categories]
    rows = [r for r in build_prompt_rows(Path(data_root), seed, questions=True,
                                         wildguard=wildguard,
                                         heldout_questions=heldout_questions, warn=log)
            if not r.harmful or r.categories]
    if not any(r.harmful for r in rows) or all(r.harmful for r in rows):
        raise ValueError(f"need categorised harmful and benign prompts under {data_root}")
    final, y, is_held, (model, tok) = category_readout_data(rows, cats, lm_dir, seed, log)
    benign = torch.tensor([not r.harmful for r in rows])
    w, b = fit_readout(final[~is_held], y[~is_held])
    held_benign = final[is_held & benign] @ w.T + b
    if len(held_benign) == 0:
        raise ValueError("no held-out benign prompts to set the gate's thresholds on")
    thr = gate_thresholds(held_benign, target_fpr, shift)
    head.topic = (w, b - thr)
    head.validate(model.config.hidden_size)
    logits = head.topic_logits(final[is_held])
    harmful = ~benign[is_held]
    opened = (logits >= 0).any(dim=1)
    conversational = torch.tensor([r.group.startswith("hhq:") for r in rows])[is_held]
    wild = torch.tensor([r.group.startswith("wgq:") for r in rows])[is_held]
    stats = {
        "train_prompts": int((~is_held).sum()), "heldout_prompts": int(is_held.sum()),
        "target_fpr": target_fpr, "shift_logits": shift,
        "thresholds_logits": [round(v, 4) for v in thr.tolist()],
        # with nothing allowed: how often any category's gate opens
        "heldout_benign_open": round(opened[~harmful].float().mean().item(), 4),
        "heldout_harmful_open": round(opened[harmful].float().mean().item(), 4),
        "heldout_conversational_harmful_open": round(
            opened[harmful & conversational].float().mean().item(), 4)
        if bool((harmful & conversational).any()) else None,
        "heldout_wildguard_harmful_open": round(
            opened[harmful & wild].float().mean().item(), 4)
        if bool((harmful & wild).any()) else None,
        "heldout_wildguard_benign_open": round(
            opened[~harmful & wild].float().mean().item(), 4)
        if bool((~harmful & wild).any()) else None,
        "wildguard_prompts": int(sum(r.group.startswith("wgq:") for r in rows)),
        "heldout_top_category_labelled": top_hit_rate(logits[harmful], y[is_held][harmful]),
        "heldout_questions": heldout_questions,
        "data_root": str(data_root), "seed": seed, "seconds": round(time.time() - t0)}
    return write_readout_checkpoint(head, head_dir, out, model_dir, lm_dir, "topic_gate", stats,
                                    model, tok, log)
