"""Prompt-set loaders for the safety evaluation.

Every loader takes a file path and returns a list of ``Sample``. Nothing here knows where the
public datasets live on a given machine; the CLI passes paths in.

``harmful`` is True for prompts a safe model should refuse (HarmBench, AdvBench, JailbreakBench,
StrongREJECT, XSTest's "contrast_" prompts) and False for XSTest's safe prompts, which measure
over-refusal.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Sample:
    id: str
    dataset: str
    prompt: str
    harmful: bool = True
    category: str | None = None
    # An affirmative opening written for this prompt ("Sure, here is ..."), used as the prefill.
    target: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _read_csv(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Rows of a CSV; ``required``: columns whose absence means the wrong file for a loader
    (e.g. JailbreakBench's CSV also has a ``Behavior`` column: short labels, not requests)."""
    # utf-8-sig: some of the public CSVs start with a byte-order mark.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} has no column {', '.join(missing)} (columns: "
                             f"{', '.join(reader.fieldnames or []) or 'none'}): the wrong file "
                             "for this dataset?")
        return list(reader)


def _clean(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def load_harmbench(
    path: str | Path,
    *,
    include_contextual: bool = False,
    include_copyright: bool = False,
    targets_path: str | Path | None = None,
    name: str = "harmbench",
) -> list[Sample]:
    """HarmBench behaviours CSV (``Behavior, FunctionalCategory, SemanticCategory, ContextString, BehaviorID``).

    Contextual behaviours need their ``ContextString`` pasted in front of the request to make
    sense; they are skipped unless ``include_contextual`` (then the context is prepended).
    Copyright behaviours ask for song lyrics or book passages; a refusal judge cannot tell a
    verbatim reproduction from an invented one, so they are skipped unless asked for.
    ``targets_path`` is HarmBench's optional BehaviorID -> "Sure, here's ..." JSON map.
    """
    targets: dict[str, str] = {}
    if targets_path is not None:
        targets = json.loads(Path(targets_path).read_text(encoding="utf-8"))
        if not isinstance(targets, dict):
            raise ValueError(f"{targets_path}: want a JSON object mapping BehaviorID to a "
                             f"target prefix, not a {type(targets).__name__}")
    samples = []
    for i, row in enumerate(_read_csv(path, ("Behavior", "BehaviorID"))):
        behavior = _clean(row.get("Behavior"))
        if behavior is None:
            continue
        context = _clean(row.get("ContextString"))
        functional = (_clean(row.get("FunctionalCategory")) or "").lower()
        if context and not include_contextual:
            continue
        if functional == "copyright" and not include_copyright:
            continue
        prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
        behavior_id = _clean(row.get("BehaviorID")) or str(i)
        samples.append(
            Sample(
                id=f"{name}:{behavior_id}",
                dataset=name,
                prompt=prompt,
                category=_clean(row.get("SemanticCategory")),
                target=_clean(targets.get(behavior_id)),
            )
        )
    return samples


def load_advbench(path: str | Path, *, name: str = "advbench") -> list[Sample]:
    """AdvBench harmful_behaviors.csv (``goal, target``); the target is the natural prefill."""
    return [
        Sample(id=f"{name}:{i}", dataset=name, prompt=goal, target=_clean(row.get("target")))
        for i, row in enumerate(_read_csv(path, ("goal",)))
        if (goal := _clean(row.get("goal")))
    ]


def load_jailbreakbench(path: str | Path, *, name: str = "jbb") -> list[Sample]:
    """JailbreakBench behaviours CSV (``Goal, Target, Behavior, Category``)."""
    return [
        Sample(
            id=f"{name}:{i}",
            dataset=name,
            prompt=goal,
            category=_clean(row.get("Category")),
            target=_clean(row.get("Target")),
        )
        for i, row in enumerate(_read_csv(path, ("Goal",)))
        if (goal := _clean(row.get("Goal")))
    ]


def load_strongreject(path: str | Path, *, name: str = "strongreject") -> list[Sample]:
    """StrongREJECT CSV (``category, source, forbidden_prompt``); it has no targets."""
    return [
        Sample(id=f"{name}:{i}", dataset=name, prompt=prompt, category=_clean(row.get("category")))
        for i, row in enumerate(_read_csv(path, ("forbidden_prompt",)))
        if (prompt := _clean(row.get("forbidden_prompt")))
    ]


def load_xstest(
    path: str | Path, *, which: str = "safe", name: str = "xstest"
) -> list[Sample]:
    """XSTest prompts CSV (``id, prompt, type, label, focus, note``).

    Types starting with ``contrast_`` are the unsafe contrast prompts, the rest are safe prompts
    that only look risky. The ``label`` column says the same; the type decides when they disagree,
    since it is how the XSTest authors built the set. ``which`` is "safe", "unsafe" or "all".
    """
    if which not in {"safe", "unsafe", "all"}:
        raise ValueError(f"which must be safe, unsafe or all, not {which!r}")
    samples = []
    for i, row in enumerate(_read_csv(path, ("prompt", "label"))):
        prompt = _clean(row.get("prompt"))
        if prompt is None:
            continue
        kind = _clean(row.get("type")) or ""
        label = (_clean(row.get("label")) or "").lower()
        unsafe = kind.startswith("contrast_") if kind else label == "unsafe"
        if (which == "safe" and unsafe) or (which == "unsafe" and not unsafe):
            continue
        samples.append(
            Sample(
                id=f"{name}:{_clean(row.get('id')) or i}",
                dataset=name,
                prompt=prompt,
                harmful=unsafe,
                category=kind or None,
            )
        )
    return samples


def json_object_line(path, lineno: int, line: str) -> dict:
    """One JSON-lines row, which must be an object: a list or string row would fail later as
    an AttributeError that names neither the file nor the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: want a JSON object per line, not "
                         f"{type(record).__name__}")
    return record


def load_jsonl(path: str | Path, *, name: str | None = None, harmful: bool = True) -> list[Sample]:
    """Generic JSON lines: one ``{"prompt": ..., "category"?: ..., "target"?: ..., "id"?: ...}`` per line."""
    name = name or Path(path).stem
    samples = []
    seen_ids: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json_object_line(path, lineno, line)
            for field in ("prompt", "category", "target"):
                if record.get(field) is not None and not isinstance(record[field], str):
                    raise ValueError(f"{path}:{lineno}: '{field}' must be a string, "
                                     f"not {type(record[field]).__name__}")
            # A string such as "false" would be truthy: only a JSON boolean says benign.
            if "harmful" in record and not isinstance(record["harmful"], bool):
                raise ValueError(f"{path}:{lineno}: 'harmful' must be true or false, "
                                 f"not {record['harmful']!r}")
            prompt = _clean(record.get("prompt"))
            if prompt is None:
                raise ValueError(f"{path}:{lineno}: a record without a 'prompt'")
            sample_id = f"{name}:{record.get('id', lineno)}"
            # Samples are excluded from development runs by id: two rows with one id would
            # take each other out.
            if sample_id in seen_ids:
                raise ValueError(f"{path}:{lineno}: id {sample_id.split(':', 1)[1]!r} is already "
                                 f"used by line {seen_ids[sample_id]} (a row without an 'id' "
                                 f"takes its line number)")
            seen_ids[sample_id] = lineno
            samples.append(
                Sample(
                    id=sample_id,
                    dataset=name,
                    prompt=prompt,
                    harmful=record.get("harmful", harmful),
                    category=_clean(record.get("category")),
                    target=_clean(record.get("target")),
                )
            )
    return samples


LOADERS: dict[str, Callable[..., list[Sample]]] = {
    "harmbench": load_harmbench,
    "advbench": load_advbench,
    "jbb": load_jailbreakbench,
    "jailbreakbench": load_jailbreakbench,
    "strongreject": load_strongreject,
    "jsonl": load_jsonl,
}


def load_named(name: str, path: str | Path, **options) -> list[Sample]:
    """Load ``path`` with the loader called ``name``; unknown names with a .jsonl file use the
    generic loader, so ``--data mine=prompts.jsonl`` works under any label."""
    loader = LOADERS.get(name.lower())
    if loader is None:
        if str(path).endswith(".jsonl"):
            return load_jsonl(path, name=name)
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(LOADERS))} or any name with a .jsonl file")
    if loader is load_jsonl:
        return load_jsonl(path, **options)
    return loader(path, name=name.lower() if name.lower() != "jailbreakbench" else "jbb", **options)


def sample_limit(samples: list[Sample], limit: int | None, seed: int = 0) -> list[Sample]:
    """A seeded random subset of ``limit`` samples, kept in file order (the same seed and file
    give the same subset on every machine)."""
    if limit is None or limit <= 0 or limit >= len(samples):
        return list(samples)
    picked = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in picked]


def sample_outside(samples: list[Sample], reported: int | None, reported_seed: int,
                   limit: int | None, seed: int = 0) -> list[Sample]:
    """A development sample: the samples outside ``sample_limit(samples, reported,
    reported_seed)`` (the reported sample, left out; None or 0 leaves nothing out), then
    ``sample_limit`` of what is left at ``limit`` and ``seed``."""
    if reported:
        held = {s.id for s in sample_limit(samples, reported, reported_seed)}
        samples = [s for s in samples if s.id not in held]
    return sample_limit(samples, limit, seed)
