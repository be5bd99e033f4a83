"""Training prompts for CoSAlign: JSONL rows ``{"prompt": str, "categories": [taxonomy ids]}``
(an empty list is a benign prompt), and converters from public sources into that form.

Sources read (paths come from the CLI; nothing here knows where datasets live):

* BeaverTails / CoSAlign JSONL: ``prompt`` + ``category`` (BeaverTails' name -> bool map) or
  ``categories`` (CoSAlign names or our ids). BeaverTails rows judged safe become benign.
* HarmBench behaviours CSV: ``SemanticCategory`` mapped; copyright behaviours skipped.
* Harmful instruction JSON (refusal-direction splits: ``instruction`` + optional
  ``category``): categories from a keyword pass over the text when the source has none.
* Benign instruction JSON/JSONL (Alpaca style ``instruction``): ``categories: []``.

Prompts that also occur in an evaluation file (``exclude``) are dropped, compared after
lower-casing and collapsing whitespace.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from safeserve.models.categories import beavertails_categories, cosa_category, map_categories
from safeserve.models.evaluation.datasets import json_object_line
from safeserve.models.taxonomy import Taxonomy


@dataclass
class LabelledPrompt:
    prompt: str
    categories: list[str] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "categories": self.categories, "source": self.source}


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def load_prompts(path: str | Path, taxonomy: Taxonomy | None = None) -> list[LabelledPrompt]:
    ids = set((taxonomy or Taxonomy.load()).ids)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json_object_line(path, n, line)
            prompt = str(obj.get("prompt") or "").strip()
            cats = obj.get("categories", [])
            if not prompt or not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
                raise ValueError(f"{path}:{n}: want {{prompt: str, categories: [ids]}}")
            unknown = [c for c in cats if c not in ids]
            if unknown:
                raise ValueError(f"{path}:{n}: unknown categories {unknown} (known: {sorted(ids)})")
            rows.append(LabelledPrompt(prompt, sorted(set(cats)), str(obj.get("source", ""))))
    return rows


def write_prompts(rows: list[LabelledPrompt], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- converters

def read_beavertails(path: str | Path, taxonomy: Taxonomy) -> list[LabelledPrompt]:
    """BeaverTails rows (``category`` / ``is_safe``: labels of a question-answer pair) or
    rows with prompt-level ``categories``. A QA-labelled prompt is kept only when one of its
    answers was labelled harmful: a harmful question whose sampled answers all refused has
    only safe pairs, and calling it benign would make compliance the preferred answer."""
    ids = set(taxonomy.ids)
    out = []
    qa_labelled: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json_object_line(path, n, line)
            prompt = str(obj.get("prompt") or "").strip()
            if not prompt:
                continue
            if "category" in obj:  # BeaverTails: labels of the QA pair
                cats = [] if obj.get("is_safe") else beavertails_categories(obj["category"])
                qa_labelled.add(normalise(prompt))
            else:
                cats = sorted({c if c in ids else cosa_category(c) for c in obj.get("categories", [])})
            out.append(LabelledPrompt(prompt, cats, "beavertails"))
    # BeaverTails has several answers per prompt: keep one row, with the union of labels.
    merged: dict[str, LabelledPrompt] = {}
    for r in out:
        key = normalise(r.prompt)
        if key in merged:
            merged[key].categories = sorted(set(merged[key].categories) | set(r.categories))
        else:
            merged[key] = r
    return [r for key, r in merged.items() if r.categories or key not in qa_labelled]


def read_harmbench(path: str | Path) -> list[LabelledPrompt]:
    out = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            sem = (row.get("SemanticCategory") or "").strip()
            if sem == "copyright" or (row.get("FunctionalCategory") or "").strip() == "contextual":
                continue  # lyrics/passages and context-dependent behaviours: not config material
            text = (row.get("Behavior") or "").strip()
            cats = map_categories(sem, text)
            if cats is not None:
                out.append(LabelledPrompt(text, cats, f"harmbench:{sem}"))
    return out


def _read_json_rows(path: str | Path) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".jsonl"):
        return [json_object_line(path, n, x) for n, x in enumerate(text.splitlines(), 1) if x.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: want a JSON list of objects or strings, not {type(data).__name__}")
    for n, x in enumerate(data):
        if not isinstance(x, (dict, str)):
            raise ValueError(f"{path}: item {n}: want an object or a string, not {type(x).__name__}")
    return [x if isinstance(x, dict) else {"instruction": x} for x in data]


def read_harmful_instructions(path: str | Path) -> list[LabelledPrompt]:
    out = []
    for row in _read_json_rows(path):
        text = str(row.get("instruction") or row.get("prompt") or "").strip()
        if not text:
            continue
        cats = map_categories(str(row.get("category") or "") or None, text)
        if cats is not None:
            out.append(LabelledPrompt(text, cats, "harmful_instructions"))
    return out


def read_benign(path: str | Path, limit: int, rng: random.Random) -> list[LabelledPrompt]:
    rows = [r for r in _read_json_rows(path) if not str(r.get("input") or "").strip()]
    texts = [str(r.get("instruction") or r.get("prompt") or "").strip() for r in rows]
    texts = [t for t in texts if t]
    if limit and len(texts) > limit:
        texts = rng.sample(texts, limit)
    return [LabelledPrompt(t, [], "benign") for t in texts]


def exclusion_keys(path: str | Path) -> set[str]:
    """Normalised prompts of an evaluation file (CoSAlign-Test TSV or any JSONL with prompt)."""
    p = Path(path)
    if p.suffix == ".tsv":
        with open(p, newline="", encoding="utf-8") as f:
            return {normalise(r["prompt"]) for r in csv.DictReader(f, delimiter="\t") if r.get("prompt")}
    return {normalise(r.get("prompt") or r.get("instruction") or "") for r in _read_json_rows(p)}


def build_prompt_set(*, beavertails=(), harmbench=(), harmful=(), benign=(), benign_limit=0,
                     exclude=(), seed: int = 0, taxonomy: Taxonomy | None = None
                     ) -> tuple[list[LabelledPrompt], dict]:
    taxonomy = taxonomy or Taxonomy.load()
    rng = random.Random(seed)
    rows: list[LabelledPrompt] = []
    for p in beavertails:
        rows += read_beavertails(p, taxonomy)
    for p in harmbench:
        rows += read_harmbench(p)
    for p in harmful:
        rows += read_harmful_instructions(p)
    for p in benign:
        rows += read_benign(p, benign_limit, rng)
    banned = set().union(*(exclusion_keys(p) for p in exclude)) if exclude else set()
    seen, kept, dropped_eval = set(), [], 0
    for r in rows:
        key = normalise(r.prompt)
        if key in banned:
            dropped_eval += 1
        elif key not in seen:
            seen.add(key)
            kept.append(r)
    rng.shuffle(kept)
    stats = {"rows": len(kept), "dropped_as_eval": dropped_eval,
             "benign": sum(not r.categories for r in kept),
             "by_category": {c: sum(c in r.categories for r in kept) for c in taxonomy.ids}}
    return kept, stats
