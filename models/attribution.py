"""The attribution read-out (``safeserve train attribution``; checkpoint format 7).

Under an allow-list the head's overall ``unsafe`` output cannot say which category it saw, so
the decision lets it act for one category. Until format 7 that was the category the per-token
outputs scored highest at each step; on conversational requests those outputs do not tell the
categories apart (the default head's ``drugs`` output reads 0.9+ on most BeaverTails prompts),
so an allowed request was often refused for a category it never touched and a disallowed one
answered because its top category happened to be allowed. This read-out names the request's
category once, at its prompt end, from the final hidden state, and the overall output acts for
that category for the whole request (``kernels/safety_decision.attribute_overall``). It only
matters for requests with an allow-list: every other decision is unchanged to the bit.

Data: the harmful prompts of ``train prompt-head --questions`` (the training sources with every
evaluation set's prompts removed, each as written, rephrased and payload-split, plus the
project-labelled conversational questions, ``question_data``), with their category labels. A
fifth of the prompt groups is held out and reported: how often the named category is one of
the prompt's labelled categories, against the head's own top category at the prompt.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch


def top_hit_rate(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose highest-scoring column is one of their labelled ones."""
    if len(logits) == 0:
        return float("nan")
    top = torch.argmax(logits, dim=1, keepdim=True)
    return round(labels.gather(1, top).squeeze(1).float().mean().item(), 4)


def category_readout_data(rows, cats: list[str], lm_dir: Path, seed: int, log=print):
    """What a category read-out over prompt ends is fitted on: the prompt end's final state
    [N, H], the category labels [N, C], which rows are held out (a fifth of the prompt groups,
    seeded) and the (model, tokenizer) they came from."""
    from safeserve.models.prompt_head import prompt_end_features
    from safeserve.models.safety_features import load_lm

    groups = sorted({r.group for r in rows})
    held = set(random.Random(seed).sample(groups, len(groups) // 5))
    y = torch.zeros(len(rows), len(cats))
    for i, r in enumerate(rows):
        for c in r.categories:
            y[i, cats.index(c)] = 1
    model, tok = load_lm(lm_dir)
    model.eval()
    final, _ = prompt_end_features(model, tok, [r.text for r in rows], log)
    is_held = torch.tensor([r.group in held for r in rows])
    return final, y, is_held, (model, tok)


def train_attribution(head_dir: Path, out: Path, data_root: Path, model_dir: Path | None = None,
                      seed: int = 0, heldout_questions: bool = False, log=print) -> dict:
    """Fit the attribution read-out for the head in ``head_dir`` and write
    ``<out>/safety_head/`` (the head's own tensors and operating point unchanged)."""
    from safeserve.kernels.safety_head import head_logits
    from safeserve.models.checkpoint import load_safety_head
    from safeserve.models.head_check import served_model_for
    from safeserve.models.prompt_head import (build_prompt_rows, fit_readout,
                                              write_readout_checkpoint)

    t0 = time.time()
    head = load_safety_head(head_dir)
    lm_dir = served_model_for(Path(head_dir), model_dir)
    cats = [c.id for c in head.taxonomy.categories]
    rows = [r for r in build_prompt_rows(Path(data_root), seed, questions=True,
                                         heldout_questions=heldout_questions, warn=log)
            if r.harmful and r.categories]
    if not rows:
        raise ValueError(f"no categorised harmful prompts under {data_root}")
    final, y, is_held, (model, tok) = category_readout_data(rows, cats, lm_dir, seed, log)
    w, b = fit_readout(final[~is_held], y[~is_held])
    head.attribution = (w, b)
    head.validate(model.config.hidden_size)
    own = head_logits(final[is_held], head.weight, head.bias, head.mlp)[:, :len(cats)]
    named = head.attribution_logits(final[is_held])
    conversational = torch.tensor([r.group.startswith("hhq:") for r in rows])[is_held]
    yh = y[is_held]
    metrics = {"attribution": {
        "train_prompts": int((~is_held).sum()), "heldout_prompts": int(is_held.sum()),
        "heldout_top_category_labelled": top_hit_rate(named, yh),
        "heldout_top_category_labelled_by_head": top_hit_rate(own, yh),
        "heldout_conversational": {
            "prompts": int(conversational.sum()),
            "top_category_labelled": top_hit_rate(named[conversational], yh[conversational]),
            "top_category_labelled_by_head": top_hit_rate(own[conversational],
                                                          yh[conversational])},
        "heldout_questions": heldout_questions,
        "data_root": str(data_root), "seed": seed, "seconds": round(time.time() - t0)}}
    return write_readout_checkpoint(head, head_dir, out, model_dir, lm_dir, "attribution",
                                    metrics["attribution"], model, tok, log)
