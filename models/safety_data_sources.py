"""The readers of the public prompt sets behind the safety-signal data (``safety_data_build``;
paths relative to the data root, the layout of shared/data): harmful training prompts with
their categories, benign instructions, the evaluation sets whose prompts never enter training
(``EVAL_FILES``, matched by the leakage key ``normalise``) and the prompt-only external
evaluation rows.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from safeserve.models.categories import categorise_text, map_categories


def normalise(text: str) -> str:
    """Leakage key: lowercase, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


@dataclass
class SourcePrompt:
    text: str
    source: str
    categories: list[str]  # empty for benign
    harmful: bool


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _harmbench_prompt(row: dict) -> str:
    ctx = (row.get("ContextString") or "").strip()
    return f"{ctx}\n\n---\n\n{row['Behavior']}" if ctx else row["Behavior"]


def read_harmful_sources(root: Path, warn) -> list[SourcePrompt]:
    """Harmful training prompts (paths relative to the data root; missing files are skipped)."""
    out: list[SourcePrompt] = []

    def add(text, source, src_cat=None):
        cats = map_categories(src_cat, text)
        if cats is not None and text.strip():
            out.append(SourcePrompt(text.strip(), source, cats, True))

    for split in ("train", "val"):
        p = root / f"refusal_direction_splits/harmful_{split}.json"
        if p.is_file():
            for r in _read_json(p):
                add(r["instruction"], f"refusal_direction_{split}", r.get("category"))
        else:
            warn(f"missing {p}")
    p = root / "harmbench/harmbench_behaviors_text_val.csv"
    if p.is_file():
        for r in _read_csv(p):
            add(_harmbench_prompt(r), "harmbench_val", r.get("SemanticCategory"))
    else:
        warn(f"missing {p}")
    p = root / "harmbench/extra_behavior_datasets/adv_training_behaviors.csv"
    if p.is_file():
        for r in _read_csv(p):
            add(r["Behavior"], "harmbench_adv_training", r.get("SemanticCategory") or None)
    for name in ("tdc2023_dev_behaviors.json", "tdc2023_test_behaviors.json"):
        p = root / "tdc2023" / name
        if p.is_file():
            for t in _read_json(p):
                add(t, "tdc2023")
    p = root / "tdc2023/tdc2023_test_phase_behaviors.csv"
    if p.is_file():
        for r in _read_csv(p):
            add(r["Behavior"], "tdc2023")
    return out


def read_benign_sources(root: Path, warn) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"alpaca": [], "gpteacher_roleplay": []}
    p = root / "refusal_direction_splits/harmless_train.json"
    if p.is_file():
        out["alpaca"] = [r["instruction"].strip() for r in _read_json(p)]
    else:
        warn(f"missing {p}")
    p = root / "benign_instructions/gpteacher_roleplay-simple-deduped-roleplay-dataset.json"
    if p.is_file():
        for r in _read_json(p):
            inst, extra = r.get("instruction", "").strip(), (r.get("input") or "").strip()
            out["gpteacher_roleplay"].append(f"{inst}\n\n{extra}" if extra else inst)
    else:
        warn(f"missing {p}")
    return out


# Evaluation sets: their prompts never enter training (normalised exact match).
EVAL_FILES = {
    "harmbench_test": ("harmbench/harmbench_behaviors_text_test.csv", "Behavior"),
    "advbench": ("advbench/harmful_behaviors.csv", "goal"),
    "advbench_attngcg": ("advbench/harmful_behaviors_targets_fixed_AttnGCG.csv", "goal"),
    "advbench_hb_format": ("harmbench/extra_behavior_datasets/advbench_behaviors.csv", "Behavior"),
    "jailbreakbench": ("jailbreakbench/jbb_behaviors_harmful.csv", "Goal"),
    "strongreject": ("strongreject/strongreject_dataset.csv", "forbidden_prompt"),
    "xstest": ("xstest/xstest_prompts.csv", "prompt"),
    # Declared test split of the refusal-direction sets (a mix of the sets above).
    "refusal_direction_test": ("refusal_direction_splits/harmful_test.json", "instruction"),
}


def read_eval_keys(root: Path, warn) -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    for name, (rel, col) in EVAL_FILES.items():
        p = root / rel
        if not p.is_file():
            warn(f"eval set {name} not found at {p}: it cannot be checked for leakage")
            continue
        rows = _read_json(p) if p.suffix == ".json" else _read_csv(p)
        keys[name] = {normalise(r[col]) for r in rows if r.get(col)}
    return keys


def read_external_eval(root: Path) -> list[dict]:
    """Prompt-only rows for measuring the prompt verdict on differently phrased sets.

    CoSAlign-Test (BeaverTails questions): situation 2/3 under any config = the prompt has a risk
    the config does not allow (harmful); situation 1 under the 'safe' config (nothing allowed)
    = no risk at all (benign). XSTest safe / contrast prompts. Used for reporting only: never for
    training, threshold choice or layer choice.
    """
    rows: dict[str, dict] = {}
    p = root / "cosa_microsoft/notebooks/test_set_verification_75.tsv"
    if p.is_file():
        with open(p, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f, delimiter="\t"):
                text, spec, sit = r["prompt"].strip(), r["test spec"], r["situation"]
                if sit in ("2", "3"):
                    rows[normalise(text)] = {"prompt": text, "prompt_label": "unsafe",
                                             "categories": ["other"], "source": "cosa_beavertails"}
                elif sit == "1" and spec == "safe":
                    rows.setdefault(normalise(text), {"prompt": text, "prompt_label": "safe",
                                                      "categories": [],
                                                      "source": "cosa_beavertails"})
    p = root / "xstest/xstest_prompts.csv"
    if p.is_file():
        for r in _read_csv(p):
            unsafe = r["label"] == "unsafe"
            rows[normalise(r["prompt"])] = {
                "prompt": r["prompt"], "prompt_label": "unsafe" if unsafe else "safe",
                "categories": categorise_text(r["prompt"]) if unsafe else [],
                "source": "xstest_unsafe" if unsafe else "xstest_safe"}
    p = root / "strongreject/strongreject_dataset.csv"
    if p.is_file():
        for r in _read_csv(p):
            rows[normalise(r["forbidden_prompt"])] = {
                "prompt": r["forbidden_prompt"], "prompt_label": "unsafe",
                "categories": categorise_text(r["forbidden_prompt"]), "source": "strongreject"}
    return list(rows.values())
