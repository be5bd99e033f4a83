"""Safety heads built by hand for deterministic end-to-end tests (no training, no ../shared).

* ``violence``: constant high score (bias +8): every prompt violates it unless the request
  allows ``violence`` — the switch for prompt-level and mixed-config tests.
* ``weapons``: the LM-head embedding row of one token minus the mean row (its logit relative
  to the average token), so it fires exactly when the model is about to say that token — a
  mid-generation trigger at a known place (measured: 23.8 at that step, <= 15.5 elsewhere).
* every other output: constant low (bias -8).

Its operating point has an alert band of 2 logits with alert tau 1: a request whose own
violence threshold sits just above 0.99966 puts the prompt in the band (nothing else comes
near its thresholds at a prompt end), so the " Paris" step alone triggers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from safeserve.models.checkpoint import SafetyHead
from safeserve.models.model_store import compose_checkpoint
from safeserve.models.taxonomy import Taxonomy

TRIGGER_WORD = " Paris"


def build_test_head(base_dir: Path, out_dir: Path, trigger_word: str = TRIGGER_WORD,
                    trigger_logit: float = 20.0) -> Path:
    from transformers import AutoTokenizer

    tax = Taxonomy.load()
    k = tax.num_outputs
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    ids = tok(trigger_word, add_special_tokens=False)["input_ids"]
    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        name = "lm_head.weight" if "lm_head.weight" in f.keys() else "model.embed_tokens.weight"
        table = f.get_tensor(name).float()
    emb = table[ids[0]] - table.mean(0)
    weight = torch.zeros(k, emb.shape[0])
    bias = torch.full((k,), -8.0)
    bias[tax.index("violence")] = 8.0
    weight[tax.index("weapons")] = emb
    bias[tax.index("weapons")] = -trigger_logit
    head = SafetyHead(weight, bias, tax, extra={
        "purpose": "tests", "operating_point": {"alert_margin": 2.0, "alert_tau": 1}})
    head_src = out_dir / "head_src"
    head.save(head_src)
    return compose_checkpoint(base_dir, head_src, root=out_dir)
