"""The prompt veto (checkpoint format 11): a second, one-output read-out that a prompt must also
pass before its prompt verdict may flag it.

Why: the prompt verdict's thresholds were set on benign prompts that are mostly hard negatives
(risky words in harmless senses), so its false alarms on ordinary requests went unmeasured. On
held-out Alpaca instructions the default head v13 flagged 7.2% at the prompt ("Determine the
atomic number of Iron." as `weapons`), about as many as XSTest's look-alike prompts. Those
flags sit in the verdict's noisy tail. A read-out fitted with many ordinary instructions (and
the same harmful prompts) ranks them far below harmful requests, so requiring both verdicts
clears most of them while a harmful prompt, which both flag, stays flagged.

The veto reads the rows the serving kernel reads at a prompt end (the final hidden state, and a
head's ``prompt_layer`` state beside it), one logistic output (harmful or not), fitted on
``build_prompt_rows`` with ``n_alpaca`` ordinary instructions. Its threshold is the
``quantile`` of held-out ordinary instructions' logits (Alpaca's validation split, which no
training set or reported evaluation reads; `eval allow-benign`'s development set draws its
Alpaca prompts from the same file, so a share of them (24 of its 150 at the default seeds) set
this threshold, and its benign rate is not fully clean for the veto): a prompt below it is
cleared, so about
``quantile`` of ordinary traffic can never be flagged at the prompt. It only ever removes prompt
flags; the response rule is untouched.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import torch

CALIBRATION_FILE = "refusal_direction_splits/harmless_val.json"


def calibration_prompts(root: Path, n: int, seed: int, exclude: set[str]) -> list[str]:
    """``n`` ordinary instructions from Alpaca's validation split, none an evaluation prompt."""
    from safeserve.models.safety_data_sources import normalise

    path = Path(root) / CALIBRATION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the veto's calibration prompts)")
    texts = [r["instruction"].strip() for r in json.loads(path.read_text())]
    texts = [t for t in texts if t and normalise(t) not in exclude]
    random.Random(seed).shuffle(texts)
    if len(texts) < n:
        raise ValueError(f"{path} has {len(texts)} usable prompts; --calibration wants {n}")
    return texts[:n]


def train_prompt_veto(head_dir: Path, out: Path, data_root: Path, model_dir: Path | None = None,
                      quantile: float = 0.95, n_alpaca: int = 6000, n_calibration: int = 1000,
                      seed: int = 0, questions: bool = True, weight_decay: float = 1e-2,
                      heldout_questions: bool = False, log=print) -> dict:
    """Fit the veto for the head in ``head_dir`` and write ``<out>/safety_head/`` (format 11)."""
    from safeserve.models.checkpoint import load_safety_head
    from safeserve.models.head_check import served_model_for
    from safeserve.models.prompt_head import (build_prompt_rows, fit_readout,
                                              prompt_end_features, write_readout_checkpoint)
    from safeserve.models.safety_data_sources import read_eval_keys
    from safeserve.models.safety_features import load_lm

    if not 0.0 < quantile < 1.0:
        raise ValueError(f"--quantile must be in (0, 1), not {quantile}")
    t0 = time.time()
    head = load_safety_head(head_dir)
    head.veto = None  # a veto already there is replaced, not stacked
    lm_dir = served_model_for(Path(head_dir), model_dir)
    root = Path(data_root)
    rows = build_prompt_rows(root, seed, n_alpaca=n_alpaca, questions=questions,
                             heldout_questions=heldout_questions, warn=log)
    keys = set().union(*read_eval_keys(root, log).values())
    calibration = calibration_prompts(root, n_calibration, seed, keys)
    # a fifth of the groups held out for the metrics (the fit itself uses the rest)
    groups = sorted({r.group for r in rows})
    held = set(random.Random(seed).sample(groups, len(groups) // 5))
    is_held = torch.tensor([r.group in held for r in rows])
    y = torch.tensor([[float(r.harmful)] for r in rows])
    model, tok = load_lm(lm_dir)
    model.eval()
    final, mid = prompt_end_features(model, tok, [r.text for r in rows] + calibration, log,
                                     head.prompt_layer)
    served = head.served_hidden(final, mid)
    x, cal = served[:len(rows)], served[len(rows):]
    w, b = fit_readout(x[~is_held], y[~is_held], weight_decay=weight_decay)
    threshold = torch.quantile((cal @ w.T + b)[:, 0], quantile)
    head.veto = (w, b - threshold)
    # What the served prompt verdict does on the held-out rows, with and without the veto
    # (flagged: a prompt logit at its output's threshold logit, less the prompt offset).
    at = head.veto_offsets()
    hf, hm = final[:len(rows)][is_held], None if mid is None else mid[:len(rows)][is_held]
    before = dataclasses.replace(head, veto=None).prompt_logits(hf, hm) >= at
    after = head.prompt_logits(hf, hm) >= at
    harmful = y[is_held, 0] == 1
    passes = (x[is_held] @ head.veto[0].T + head.veto[1])[:, 0] >= 0

    def rate(mask: torch.Tensor, sel: torch.Tensor) -> float:
        return round(mask[sel].float().mean().item(), 4) if bool(sel.any()) else 0.0

    stats = {
        "quantile": quantile, "alpaca": n_alpaca, "calibration_prompts": len(calibration),
        "questions": questions, "heldout_questions": heldout_questions,
        "weight_decay": weight_decay, "reads": (
            "final" if head.prompt_layer is None else f"final+layer{head.prompt_layer}"),
        "train_prompts": int((~is_held).sum()), "heldout_prompts": int(is_held.sum()),
        "heldout_harmful_passing_veto": rate(passes, harmful),
        "heldout_benign_passing_veto": rate(passes, ~harmful),
        "heldout_flagged_before": {"harmful": rate(before.any(1), harmful),
                                   "benign": rate(before.any(1), ~harmful)},
        "heldout_flagged_with_veto": {"harmful": rate(after.any(1), harmful),
                                      "benign": rate(after.any(1), ~harmful)},
        "data_root": str(data_root), "seed": seed,
        "seconds": round(time.time() - t0)}
    return write_readout_checkpoint(
        head, head_dir, out, model_dir, lm_dir, "prompt_veto", stats, model, tok, log,
        note="prompt-verdict metrics above prompt_veto were measured before the veto")
