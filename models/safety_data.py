"""Training data for the explicit safety signal: the trajectory format and per-token labels.

Trajectory format
-----------------
One training row is one conversation, as a JSON object per line (``.jsonl``) or a CSV row with
the same column names (list fields hold JSON text in CSV; an empty cell is null):

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
     "prompt_label": "unsafe",
     "categories": ["weapons"],
     "response_unsafe_from": 0,
     "source": "harmbench_val/own_answer"}

or, for a single turn, ``"prompt": str`` and ``"response": str`` instead of ``"messages"``.

* ``messages``: chat messages; if the last one is the assistant's it is the response, and the
  messages before it are the prompt. Without a response the row is prompt-only.
* ``prompt_label``: ``"safe"`` or ``"unsafe"`` (is the request itself harmful).
* ``categories``: taxonomy ids of the harm in the row (the prompt's categories; also used for an
  unsafe response). Must be non-empty when anything in the row is unsafe (use ``["other"]`` when
  unknown) and empty when nothing is.
* ``response_unsafe_from``: character offset in the response from which it is harmful; ``null``
  means the response is safe throughout (a refusal or a benign answer). Must be null without a
  response.
* ``source``: free text, where the row came from (used for per-source metrics).
* ``group`` (optional): rows sharing a group go to the same side of a held-out split (the data
  build puts all phrasings and answers of one base prompt in one group).

Per-token labels
----------------
The prompt is rendered with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``;
the response is tokenised on its own and appended, which is what the server sees (it tokenises
the prompt, then appends the generated tokens one by one). Position ``p`` is labelled from the
hidden state after reading token ``p``:

* the last prompt position (the end of the generation prompt, just before the first response
  token) carries the prompt verdict: the prompt's categories plus ``unsafe`` when the prompt is
  unsafe, all zeros when it is safe;
* response position ``p`` is unsafe (categories + ``unsafe``) when token ``p`` ends after
  ``response_unsafe_from`` (the token covering that offset and every later one), safe (zeros)
  before it;
* every other position is masked out.

A complete response (one not cut at ``max_length``) is followed by the tokenizer's
end-of-sequence token, the token the server ends a turn on: a position with no label (never
scored), there only as the language-model target of lora / full mode, so that the model also
learns where a safe answer or a refusal ends (``Encoded.end_of_turn``).

The data build (``safeserve train build-safety-data``) is ``safety_data_build``.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from safeserve.models.taxonomy import Taxonomy

PROMPT_LABELS = ("safe", "unsafe")
MASK_IGNORE, MASK_PROMPT, MASK_RESPONSE = 0, 1, 2


class TrajectoryError(ValueError):
    """A training row that does not follow the trajectory format."""


@dataclass
class Trajectory:
    prompt_messages: list[dict]
    response: str | None
    prompt_label: str
    categories: list[str]
    response_unsafe_from: int | None
    source: str = ""
    group: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def prompt_unsafe(self) -> bool:
        return self.prompt_label == "unsafe"

    @property
    def response_unsafe(self) -> bool:
        return self.response_unsafe_from is not None

    @property
    def user_text(self) -> str:
        """The last user message: the request the prompt verdict is about."""
        users = [m["content"] for m in self.prompt_messages if m.get("role") == "user"]
        return users[-1] if users else ""

    def to_dict(self) -> dict:
        msgs = list(self.prompt_messages)
        if self.response is not None:
            msgs.append({"role": "assistant", "content": self.response})
        row = {"messages": msgs, "prompt_label": self.prompt_label,
               "categories": list(self.categories),
               "response_unsafe_from": self.response_unsafe_from, "source": self.source}
        if self.group:
            row["group"] = self.group
        row.update(self.extra)
        return row


# --------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------


class UnsafeSpanCutError(TrajectoryError):
    """Truncation to max_length removed every token of a response's unsafe part."""


def _fail(where: str, fld: str, msg: str) -> TrajectoryError:
    return TrajectoryError(f"{where}: field '{fld}': {msg}")


def _json_cell(value, where: str, fld: str):
    """CSV cells hold lists as JSON text; JSONL rows already hold objects."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text == "":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if fld == "categories":  # allow "a;b" or "a,b" in hand-written CSV
            return [t.strip() for t in re.split(r"[;,]", text) if t.strip()]
        raise _fail(where, fld, f"not valid JSON: {text[:60]!r}") from None


def _group_of(value) -> str:
    """The row's group as text; only a missing group is "" (group 0 is a group, not none:
    without it the rows would be grouped by prompt text and could split across a held-out
    split)."""
    return "" if value is None else str(value)


def parse_trajectory(row: dict, where: str, taxonomy: Taxonomy | None = None) -> Trajectory:
    """Validate one raw row; errors name ``where`` (file:line) and the field."""
    if not isinstance(row, dict):
        raise TrajectoryError(f"{where}: a row must be an object, got {type(row).__name__}")
    msgs = _json_cell(row.get("messages"), where, "messages")
    if msgs is not None:
        if not isinstance(msgs, list) or not msgs:
            raise _fail(where, "messages", "must be a non-empty list of chat messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                    or m.get("role") not in {"system", "user", "assistant"}:
                raise _fail(where, "messages", f"item {i} needs role system|user|assistant and "
                                               "string content")
        if msgs[-1]["role"] == "assistant":
            prompt_msgs, response = msgs[:-1], msgs[-1]["content"]
        else:
            prompt_msgs, response = msgs, None
        if not any(m["role"] == "user" for m in prompt_msgs):
            raise _fail(where, "messages", "the prompt has no user message")
    else:
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _fail(where, "prompt", "missing: give 'messages' or a non-empty 'prompt'")
        prompt_msgs = [{"role": "user", "content": prompt}]
        response = row.get("response")
        if response is not None and not isinstance(response, str):
            raise _fail(where, "response", "must be a string")

    label = row.get("prompt_label")
    if label not in PROMPT_LABELS:
        raise _fail(where, "prompt_label", f"must be 'safe' or 'unsafe', got {label!r}")

    cats = _json_cell(row.get("categories"), where, "categories") or []
    if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
        raise _fail(where, "categories", "must be a list of taxonomy ids")
    if taxonomy is not None:
        unknown = [c for c in cats if c not in taxonomy.ids]
        if unknown:
            raise _fail(where, "categories", f"unknown ids {unknown}; known: {list(taxonomy.ids)}")

    start = row.get("response_unsafe_from")
    if isinstance(start, str):  # a CSV cell
        try:
            start = int(start) if start.strip() else None
        except ValueError:
            raise _fail(where, "response_unsafe_from",
                        f"must be empty or an integer character offset, got {start!r}") from None
    if start is not None:
        if response is None:
            raise _fail(where, "response_unsafe_from", "set but the row has no response")
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(response):
            raise _fail(where, "response_unsafe_from",
                        f"must be null or an int in [0, {len(response)}], got {start!r}")
        if start == len(response):
            start = None  # harmful from the very end: no harmful character at all

    unsafe = label == "unsafe" or start is not None
    if unsafe and not cats:
        raise _fail(where, "categories", "empty but the row is unsafe (use ['other'] if unknown)")
    if not unsafe and cats:
        raise _fail(where, "categories", "given but nothing in the row is unsafe")

    known = {"messages", "prompt", "response", "prompt_label", "categories",
             "response_unsafe_from", "source", "group"}
    return Trajectory(prompt_msgs, response, label, list(cats), start,
                      str(row.get("source") or ""), _group_of(row.get("group")),
                      {k: v for k, v in row.items() if k not in known})


def load_trajectories(path: str | Path, taxonomy: Taxonomy | None = None) -> list[Trajectory]:
    """Read a ``.jsonl`` or ``.csv`` trajectory file; raises TrajectoryError naming the row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory file {path} does not exist")
    out = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            for i, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                out.append(parse_trajectory(row, f"{path}:{i}", taxonomy))
    else:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TrajectoryError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                out.append(parse_trajectory(row, f"{path}:{i}", taxonomy))
    if not out:
        raise TrajectoryError(f"{path}: no rows")
    return out


def write_jsonl(rows: Iterable[Trajectory | dict], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r.to_dict() if isinstance(r, Trajectory) else r,
                               ensure_ascii=False) + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------------------
# Per-token labels
# --------------------------------------------------------------------------------------


@dataclass
class Encoded:
    input_ids: list[int]
    labels: torch.Tensor  # [T, K] float32 targets (K = categories + overall)
    mask: torch.Tensor  # [T] int8: MASK_IGNORE / MASK_PROMPT / MASK_RESPONSE
    prompt_end: int  # last prompt position
    response_span: tuple[int, int]  # [start, end) token positions of the response
    truncated: bool = False
    # Position of the end-of-sequence token after a complete response (None: no response,
    # cut at max_length, or a tokenizer without one): unlabelled, an LM target only.
    end_of_turn: int | None = None


def target_vector(categories: list[str], taxonomy: Taxonomy) -> torch.Tensor:
    """Unsafe target: the categories' rows and the overall row set to 1."""
    t = torch.zeros(taxonomy.num_outputs)
    for c in categories:
        t[taxonomy.index(c)] = 1.0
    t[-1] = 1.0
    return t


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    return list(enc["input_ids"])


def encode_trajectory(traj: Trajectory, tokenizer, taxonomy: Taxonomy,
                      max_length: int | None = None) -> Encoded:
    """Token ids and per-position targets for one trajectory (see the module docstring)."""
    p_ids = prompt_ids(tokenizer, traj.prompt_messages)
    if max_length is not None and len(p_ids) > max_length:
        raise TrajectoryError(f"prompt of {traj.source!r} has {len(p_ids)} tokens, over "
                              f"max_length {max_length}")
    r_ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    if traj.response:
        enc = tokenizer(traj.response, add_special_tokens=False, return_offsets_mapping=True)
        r_ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    truncated = False
    if max_length is not None and len(p_ids) + len(r_ids) > max_length:
        keep = max_length - len(p_ids)
        r_ids, offsets, truncated = r_ids[:keep], offsets[:keep], True
        if (traj.response_unsafe_from is not None
                and not any(end > traj.response_unsafe_from for _, end in offsets)):
            # What is left would teach "harmful prompt, safe answer" (and make the harmless
            # lead-in an LM target): the row cannot be used at this length.
            raise UnsafeSpanCutError(f"the unsafe part of {traj.source!r}'s response starts "
                                     f"after max_length {max_length}")

    ids = p_ids + r_ids
    end_of_turn = None
    eos = getattr(tokenizer, "eos_token_id", None)
    if (r_ids and not truncated and eos is not None
            and (max_length is None or len(ids) < max_length)):
        end_of_turn = len(ids)
        ids = ids + [int(eos)]
    k = taxonomy.num_outputs
    labels = torch.zeros(len(ids), k)
    mask = torch.zeros(len(ids), dtype=torch.int8)
    unsafe_t = target_vector(traj.categories, taxonomy) if traj.categories else None
    pe = len(p_ids) - 1
    mask[pe] = MASK_PROMPT
    if traj.prompt_unsafe:
        labels[pe] = unsafe_t
    start = len(p_ids)
    for j, (_, end) in enumerate(offsets):
        mask[start + j] = MASK_RESPONSE
        if traj.response_unsafe_from is not None and end > traj.response_unsafe_from:
            labels[start + j] = unsafe_t
    return Encoded(ids, labels, mask, pe, (start, start + len(r_ids)), truncated, end_of_turn)
