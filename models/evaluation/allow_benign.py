"""A benign development set for allow-list requests (``safeserve eval allow-benign``).

CoSAlign-Test measures what an allow-list lets through on risky prompts; it says nothing about
what the same machinery costs on plain ones. This set sends prompts that should simply be
answered (Alpaca validation instructions and held-out written hard negatives: risky-sounding
but benign) each with one of CoSAlign-Test's non-empty allow-lists in turn, so that a
change to the allow-list rules (the topic gate, the overall output's named category) can be
scored on what it refuses that it should not. Nothing in it is a training prompt: the Alpaca
instructions come from the validation split (the safety data reads the train split), the hard
negatives from the groups `build-hard-negatives` holds out with the same seed.

Written as ``eval cosa``'s JSONL: ``{prompt, allow, expect: "answer", source}``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ALPACA_VALIDATION = "refusal_direction_splits/harmless_val.json"
COSA_TEST = "cosa_microsoft/notebooks/test_set_verification_75.tsv"


def cosa_allow_lists(tsv: Path) -> list[tuple[str, ...]]:
    """CoSAlign-Test's distinct non-empty allow-lists, sorted."""
    from safeserve.models.evaluation.cosa_eval import load_cosa_tsv

    return sorted({it.allow for it in load_cosa_tsv(tsv) if it.allow})


def build_allow_benign(data_root: Path, n_alpaca: int = 150, n_hard: int = 150,
                       seed: int = 0, heldout_fraction: float = 0.4,
                       split_seed: int = 0) -> list[dict]:
    """``n_alpaca`` validation instructions and ``n_hard`` held-out hard negatives (seeded
    samples), interleaved, the i-th given CoSAlign-Test's i-th allow-list modulo their count.
    ``split_seed`` is the hard negatives' split, apart from ``seed``: it must be the one the
    heads were trained with (0 for every bundled head), or this set would take some of their
    training groups."""
    from safeserve.models.hard_negatives import hard_negative_prompts, split_hard_negatives
    from safeserve.models.safety_data_sources import read_eval_keys

    data_root = Path(data_root)
    for rel in (ALPACA_VALIDATION, COSA_TEST):
        if not (data_root / rel).is_file():
            raise FileNotFoundError(f"{data_root / rel} is missing (want the shared data root)")
    allow_lists = cosa_allow_lists(data_root / COSA_TEST)
    if not allow_lists:
        raise ValueError(f"{data_root / COSA_TEST} has no non-empty allow-list")
    rng = random.Random(seed)
    pool = [r["instruction"].strip()
            for r in json.loads((data_root / ALPACA_VALIDATION).read_text())
            if 0 < len(r["instruction"].strip()) < 300]
    # The hard negatives' draw must not depend on --n-alpaca: it always follows a draw of
    # the default 150 (so the default set is the one measured since session 28).
    alpaca = random.Random(seed).sample(pool, min(n_alpaca, len(pool)))
    rng.sample(pool, min(150, len(pool)))
    # The same split as build-hard-negatives (groups with an evaluation prompt dropped
    # first): only groups it holds out.
    eval_keys = set().union(*read_eval_keys(data_root, lambda msg: None).values())
    _, held, _ = split_hard_negatives(hard_negative_prompts(split_seed), eval_keys,
                                      heldout_fraction, split_seed)
    hard = [p.prompt for p in rng.sample(held, min(n_hard, len(held)))]
    sources = [("alpaca_val", t) for t in alpaca] + [("hard_negative", t) for t in hard]
    rng.shuffle(sources)
    return [{"prompt": text, "allow": list(allow_lists[i % len(allow_lists)]),
             "expect": "answer", "source": source, "id": f"{source}-{i}"}
            for i, (source, text) in enumerate(sources)]


def write_allow_benign(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
