"""Fine-tuning and safe data for SEAL: reading, filtering with stable sample ids, tokenising.

Accepted files (one record per row):

* JSONL (``.jsonl``), a JSON array (``.json``) or CSV (``.csv``, header row).
* Each record is either ``{"prompt": str, "response": str}`` or ``{"messages": [...]}`` (chat
  messages with ``role`` and ``content``; the last message must be the assistant's answer and
  is the response, everything before it is the prompt). In CSV, ``messages`` may hold the JSON
  text of that list.
* Optional ``id`` (string or number): the sample id. Without it the sample id is the record's
  0-based row number in the file (JSONL: line number, blank lines counted; CSV: data row after
  the header; JSON: array index), so ids stay stable when other rows are dropped.
* Optional ``source`` (string): carried through to reports and plots (e.g. "benign"/"harmful").

Rows are dropped, with a reason counted, when they cannot be parsed, have an empty prompt or
response, do not fit in ``max_length`` tokens (prompt with the chat template plus response plus
end-of-turn), or repeat an id already seen. The kept rows keep their ids, so a selector's
logits always index the right rows of the original file.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE = -100


@dataclass
class Sample:
    id: str
    row: int
    prompt_messages: list[dict]
    response: str
    source: str | None = None
    input_ids: list[int] = field(default_factory=list)
    n_prompt: int = 0  # tokens of the prompt (chat template, generation prompt included)

    def to_record(self) -> dict:
        rec = {"id": self.id, "messages": self.prompt_messages
               + [{"role": "assistant", "content": self.response}]}
        if self.source is not None:
            rec["source"] = self.source
        return rec


@dataclass
class Dataset:
    path: Path
    sha256: str
    samples: list[Sample]
    dropped: Counter
    n_rows: int

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def summary(self) -> str:
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{self.path.name}: {self.n_rows} rows, kept {len(self.samples)}, dropped {drops}"


class SealInputError(ValueError):
    """Input a SEAL command cannot use (no rows left, a selector of another file, ...): the CLI
    reports it as one line, no traceback."""


class RowError(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _raw_rows(path: Path) -> list[tuple[int, object]]:
    """(row number, parsed record or an Exception) for every record in the file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(enumerate(csv.DictReader(f)))
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json data file must hold a list of records")
        return list(enumerate(data))
    rows: list[tuple[int, object]] = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((i, e))
    return rows


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def parse_record(rec) -> tuple[list[dict], str]:
    """(prompt messages, response) of one record, or RowError."""
    if not isinstance(rec, dict):
        raise RowError("unparsable")
    if rec.get("messages") not in (None, ""):
        msgs = rec["messages"]
        if isinstance(msgs, str):
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError:
                raise RowError("unparsable") from None
        if (not isinstance(msgs, list) or len(msgs) < 2
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in msgs)):
            raise RowError("unparsable")
        if msgs[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in msgs[:-1]):
            raise RowError("unparsable")
        prompt = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
        response = _text(msgs[-1]["content"])
        if not response or not any(_text(m["content"]) for m in prompt if m["role"] == "user"):
            raise RowError("empty")
        return prompt, response
    if "prompt" not in rec or "response" not in rec:
        raise RowError("unparsable")
    prompt, response = _text(rec["prompt"]), _text(rec["response"])
    if not prompt or not response:
        raise RowError("empty")
    return [{"role": "user", "content": prompt}], response


def prompt_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt as the server feeds it: chat template plus the assistant generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n".join(m["content"] for m in messages) + "\n"
    return list(tokenizer(text)["input_ids"])


def encode(tokenizer, messages: list[dict], response: str) -> tuple[list[int], int]:
    """Token ids of prompt + response + end-of-turn, and the prompt length.

    The response is tokenised on its own, as generation produces it after the prompt."""
    p_ids = prompt_token_ids(tokenizer, messages)
    r_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        r_ids.append(tokenizer.eos_token_id)
    return p_ids + r_ids, len(p_ids)


def load_dataset(path: str | Path, tokenizer=None, max_length: int | None = None) -> Dataset:
    """Read, filter and (with a tokenizer) encode a data file; see the module docstring."""
    path = Path(path)
    raws = _raw_rows(path)
    dropped: Counter = Counter()
    samples: list[Sample] = []
    seen: set[str] = set()
    for row, rec in raws:
        try:
            prompt, response = parse_record(rec)
        except RowError as e:
            dropped[e.reason] += 1
            continue
        raw_id = rec.get("id")
        sid = str(raw_id).strip() if raw_id not in (None, "") else str(row)
        if sid in seen:
            dropped["duplicate_id"] += 1
            continue
        source = rec.get("source")
        s = Sample(sid, row, prompt, response, str(source) if source not in (None, "") else None)
        if tokenizer is not None:
            s.input_ids, s.n_prompt = encode(tokenizer, prompt, response)
            if max_length is not None and len(s.input_ids) > max_length:
                dropped["too_long"] += 1
                continue
        seen.add(sid)
        samples.append(s)
    return Dataset(path, file_sha256(path), samples, dropped, len(raws))


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are IGNORE on prompt and padding positions."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    for r, s in enumerate(samples):
        n = len(s.input_ids)
        ids[r, :n] = torch.tensor(s.input_ids)
        att[r, :n] = 1
        labels[r, s.n_prompt:n] = ids[r, s.n_prompt:n]
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
