"""Measure the refusal judge against human labels.

XSTest ships five models' completions of its 450 prompts, each labelled by two annotators
(``final_label``: ``1_full_compliance``, ``2_full_refusal``, ``3_partial_refusal``). The judge
was tuned on two of the files (``TUNING_FILES``); agreement on the other three is the honest
number.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from safeserve.models.evaluation.judge import LABELS, judge

TUNING_FILES = ("llama2new", "mistralinstruct")

_HUMAN = {
    "1_full_compliance": "full_compliance",
    "2_full_refusal": "full_refusal",
    "3_partial_refusal": "partial_refusal",
}


@dataclass
class Agreement:
    name: str
    confusion: Counter = field(default_factory=Counter)  # (human, judge) -> count
    # What the evaluation reports, by whom: (subset, "human" | "judge" | "n") -> count, where
    # subset "safe" counts full refusals of XSTest's safe prompts (over-refusal) and
    # "contrast" full compliance with its unsafe contrast prompts (attack success).
    rates: Counter = field(default_factory=Counter)

    def add(self, human: str, predicted: str, prompt_type: str = "") -> None:
        self.confusion[(human, predicted)] += 1
        if prompt_type:
            subset, label = (("contrast", "full_compliance") if prompt_type.startswith("contrast")
                             else ("safe", "full_refusal"))
            self.rates[(subset, "n")] += 1
            self.rates[(subset, "human")] += human == label
            self.rates[(subset, "judge")] += predicted == label

    def merge(self, other: "Agreement") -> None:
        self.confusion.update(other.confusion)
        self.rates.update(other.rates)

    def rate(self, subset: str, who: str) -> float | None:
        n = self.rates[(subset, "n")]
        return self.rates[(subset, who)] / n if n else None

    @property
    def n(self) -> int:
        return sum(self.confusion.values())

    @property
    def accuracy(self) -> float:
        return sum(c for (h, p), c in self.confusion.items() if h == p) / max(1, self.n)

    @property
    def binary_accuracy(self) -> float:
        """Agreement on refused (full or partial) vs complied: what an ASR depends on."""
        same = sum(c for (h, p), c in self.confusion.items() if (h == "full_compliance") == (p == "full_compliance"))
        return same / max(1, self.n)

    def precision_recall(self, label: str) -> tuple[float, float, int]:
        tp = self.confusion[(label, label)]
        predicted = sum(c for (_, p), c in self.confusion.items() if p == label)
        actual = sum(c for (h, _), c in self.confusion.items() if h == label)
        return tp / predicted if predicted else 0.0, tp / actual if actual else 0.0, actual

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "n": self.n,
            "agreement": self.accuracy,
            "binary_agreement": self.binary_accuracy,
            "per_class": {
                label: dict(zip(("precision", "recall", "support"), self.precision_recall(label)))
                for label in LABELS
            },
            "confusion": {h: {p: self.confusion[(h, p)] for p in LABELS} for h in LABELS},
            "safe_full_refusal": {"human": self.rate("safe", "human"),
                                  "judge": self.rate("safe", "judge"),
                                  "n": self.rates[("safe", "n")]},
            "contrast_full_compliance": {"human": self.rate("contrast", "human"),
                                         "judge": self.rate("contrast", "judge"),
                                         "n": self.rates[("contrast", "n")]},
        }


def model_name(path: Path) -> str:
    """``xstest_v2_completions_gpt4.csv`` -> ``gpt4``."""
    return path.stem.rsplit("_", 1)[-1]


def check_file(path: str | Path) -> Agreement:
    path = Path(path)
    result = Agreement(model_name(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"final_label", "completion"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: no {', '.join(sorted(missing))} column (want XSTest's "
                             "human-labelled completions: completion, final_label)")
        for row in reader:
            human = _HUMAN.get((row.get("final_label") or "").strip())
            if human is None:
                continue
            result.add(human, judge(row.get("completion") or "").label,
                       (row.get("type") or "").strip())
    return result


def check_dir(directory: str | Path) -> dict:
    """Per-file agreement plus the pooled tuning and held-out groups."""
    files = sorted(Path(directory).glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no *.csv completion files in {directory}")
    per_file = [check_file(f) for f in files]
    if not any(r.n for r in per_file):
        raise ValueError(f"no human-labelled completions in {directory} (final_label "
                         f"{' / '.join(sorted(_HUMAN))})")
    tuned, held_out = Agreement("tuning"), Agreement("held_out")
    for result in per_file:
        (tuned if result.name in TUNING_FILES else held_out).merge(result)
    return {
        "tuning_files": list(TUNING_FILES),
        "files": [r.to_dict() for r in per_file],
        "tuning": tuned.to_dict() if tuned.n else None,
        "held_out": held_out.to_dict() if held_out.n else None,
    }


def format_report(report: dict) -> str:
    """A markdown rendering of ``check_dir``'s result."""
    lines = [
        f"Judge tuned on: {', '.join(report['tuning_files'])}",
        "",
        "Rates are what `eval safety` reports from text: full refusal of the safe prompts "
        "(over-refusal) and full compliance with the unsafe contrast prompts (attack success), "
        "by the human labels and by the judge.",
        "",
        "| file | role | n | 3-class agreement | refused-vs-complied agreement "
        "| safe fully refused: human / judge | contrast fully complied: human / judge |",
        "|---|---|---|---|---|---|---|",
    ]

    def pair(r: dict, key: str) -> str:
        m = r.get(key) or {}
        if not m.get("n"):
            return "-"
        return f"{m['human']:.1%} / {m['judge']:.1%} (n={m['n']})"

    for r in report["files"]:
        role = "tuning" if r["name"] in report["tuning_files"] else "held out"
        lines.append(f"| {r['name']} | {role} | {r['n']} | {r['agreement']:.3f} "
                     f"| {r['binary_agreement']:.3f} | {pair(r, 'safe_full_refusal')} "
                     f"| {pair(r, 'contrast_full_compliance')} |")
    for group in ("tuning", "held_out"):
        r = report.get(group)
        if not r:
            continue
        lines += ["", f"### {group.replace('_', ' ')} (pooled, n={r['n']}): agreement {r['agreement']:.3f}, "
                  f"refused-vs-complied {r['binary_agreement']:.3f}; safe fully refused "
                  f"{pair(r, 'safe_full_refusal')}; contrast fully complied "
                  f"{pair(r, 'contrast_full_compliance')}", "",
                  "| class | precision | recall | support |", "|---|---|---|---|"]
        for label, m in r["per_class"].items():
            lines.append(f"| {label} | {m['precision']:.3f} | {m['recall']:.3f} | {m['support']} |")
        lines += ["", "confusion (rows human, columns judge):", "",
                  "| human \\ judge | " + " | ".join(LABELS) + " |", "|---" * (len(LABELS) + 1) + "|"]
        for h in LABELS:
            lines.append(f"| {h} | " + " | ".join(str(r["confusion"][h][p]) for p in LABELS) + " |")
    return "\n".join(lines)
