"""The harm taxonomy: which categories the safety head scores, in which order.

The head has one output per category plus a final overall ``unsafe`` output, so a head with
``len(taxonomy) + 1`` rows is the only shape that matches a taxonomy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_TAXONOMY_PATH = Path(__file__).with_name("taxonomy.yaml")
OVERALL = "unsafe"  # name of the head's last output: the binary benign/malicious signal
_ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Category:
    id: str
    definition: str
    threshold: float


@dataclass(frozen=True)
class Taxonomy:
    categories: tuple[Category, ...]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.categories)

    @property
    def num_outputs(self) -> int:
        """Rows of the head: one per category plus the overall score."""
        return len(self.categories) + 1

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.ids + (OVERALL,)

    def index(self, category_id: str) -> int:
        try:
            return self.ids.index(category_id)
        except ValueError:
            raise KeyError(category_id) from None

    def to_dict(self) -> dict:
        return {
            "version": 1,
            "categories": [
                {"id": c.id, "threshold": c.threshold, "definition": c.definition}
                for c in self.categories
            ],
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict) -> "Taxonomy":
        raw = data.get("categories")
        if not isinstance(raw, list) or not raw:
            raise ValueError("taxonomy: 'categories' must be a non-empty list")
        cats, seen = [], set()
        for i, item in enumerate(raw):
            cid = str(item.get("id", ""))
            if not _ID_RE.match(cid) or cid == OVERALL:
                raise ValueError(f"taxonomy: categories[{i}].id {cid!r} is not a valid id")
            if cid in seen:
                raise ValueError(f"taxonomy: duplicate category id {cid!r}")
            seen.add(cid)
            thr = float(item.get("threshold", 0.5))
            if not 0.0 < thr < 1.0:
                raise ValueError(f"taxonomy: categories[{i}].threshold must be in (0, 1)")
            cats.append(Category(cid, str(item.get("definition", "")).strip(), thr))
        return cls(tuple(cats))

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Taxonomy":
        path = Path(path) if path else DEFAULT_TAXONOMY_PATH
        return cls.from_dict(yaml.safe_load(path.read_text()))
