"""Features for the safety head: the LM's hidden states at the labelled positions of
trajectories (``safety_data.encode_trajectory``), extracted once with the LM frozen and cached
per data file, plus the train / held-out split of trajectory files.

``head`` mode of ``safeserve train safety`` fits on these; the calibration
(``safety_calibration``) and the layer probe read them too.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from safeserve.models.safety_data import (Encoded, Trajectory, TrajectoryError,
                                          UnsafeSpanCutError, encode_trajectory,
                                          load_trajectories)
from safeserve.models.taxonomy import Taxonomy


HARD_NEGATIVE_SOURCES = ("gpteacher_roleplay", "risky_benign", "alpaca_wrapped", "hard_negative")


@dataclass
class Features:
    """Hidden states at labelled positions, one row per position, in trajectory order."""

    hidden: dict[int, torch.Tensor]  # layer -> [N, H]
    labels: torch.Tensor  # [N, K]
    kind: torch.Tensor  # [N] MASK_PROMPT / MASK_RESPONSE
    traj: torch.Tensor  # [N] trajectory index
    meta: list[dict] = field(default_factory=list)  # per trajectory

    def subset(self, traj_ids: set[int]) -> "Features":
        keep = torch.tensor([int(t) in traj_ids for t in self.traj.tolist()], dtype=torch.bool)
        order = sorted(traj_ids)
        remap = {t: i for i, t in enumerate(order)}
        return Features({k: v[keep] for k, v in self.hidden.items()}, self.labels[keep],
                        self.kind[keep], torch.tensor([remap[int(t)] for t in self.traj[keep]]),
                        [self.meta[t] for t in order])


def _meta(t: Trajectory) -> dict:
    benign = not t.prompt_unsafe and not t.response_unsafe
    return {"source": t.source, "group": t.group or t.user_text, "prompt_unsafe": t.prompt_unsafe,
            "response_unsafe": t.response_unsafe, "benign": benign,
            "hard_negative": benign and t.source.startswith(HARD_NEGATIVE_SOURCES),
            "has_response": bool(t.response)}


def backbone(model):
    """The decoder stack (no LM head) of a causal LM, PEFT-wrapped or not."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return m.get_decoder()


def resolve_layer(layer: int, num_layers: int) -> int:
    """Index into ``hidden_states``: -1 or L = the final post-norm state (index L)."""
    if layer == -1 or layer == num_layers:
        return num_layers
    if not 1 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range: use 1..{num_layers} or -1")
    return layer


def encode_all(trajs: list[Trajectory], tokenizer, taxonomy: Taxonomy, max_length: int,
               log=print) -> tuple[list[Encoded], list[Trajectory]]:
    encs, kept, long_prompt, cut_span = [], [], 0, 0
    for t in trajs:
        try:
            encs.append(encode_trajectory(t, tokenizer, taxonomy, max_length))
            kept.append(t)
        except UnsafeSpanCutError:
            cut_span += 1
        except TrajectoryError:
            long_prompt += 1
    if long_prompt:
        log(f"skipped {long_prompt} rows whose prompt alone is longer than max_length {max_length}")
    if cut_span:
        log(f"skipped {cut_span} rows whose response turns unsafe only after max_length "
            f"{max_length}")
    return encs, kept


@torch.inference_mode()
def extract_features(model, tokenizer, trajs: list[Trajectory], taxonomy: Taxonomy,
                     layers: list[int], max_length: int = 512, batch_size: int = 16,
                     log=print, desc: str = "features") -> Features:
    """Run the (frozen) model once and keep hidden states at labelled positions."""
    encs, trajs = encode_all(trajs, tokenizer, taxonomy, max_length, log)
    if not encs:
        raise TrajectoryError(f"no {desc} rows left to read at max_length {max_length}")
    dec = backbone(model)
    device = next(model.parameters()).device
    n_layers = model.config.num_hidden_layers
    idx = {l: resolve_layer(l, n_layers) for l in layers}
    need_all = any(i != n_layers for i in idx.values())
    order = sorted(range(len(encs)), key=lambda i: len(encs[i].input_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chunks: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    labels, kinds, trajids = [], [], []
    for b in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        ids_b = order[b:b + batch_size]
        width = max(len(encs[i].input_ids) for i in ids_b)
        x = torch.full((len(ids_b), width), pad, dtype=torch.long)
        att = torch.zeros((len(ids_b), width), dtype=torch.long)
        for r, i in enumerate(ids_b):
            n = len(encs[i].input_ids)
            x[r, :n] = torch.tensor(encs[i].input_ids)
            att[r, :n] = 1
        out = dec(input_ids=x.to(device), attention_mask=att.to(device),
                  output_hidden_states=need_all)
        for r, i in enumerate(ids_b):
            pos = torch.nonzero(encs[i].mask).squeeze(1)
            for l, hi in idx.items():
                h = out.last_hidden_state if hi == n_layers else out.hidden_states[hi]
                h = h[r, pos.to(device)].float().cpu()
                # Probe layers other than the final one are kept in half precision (memory).
                chunks[l].append(h if hi == n_layers else h.half())
            labels.append(encs[i].labels[pos])
            kinds.append(encs[i].mask[pos])
            trajids.append(torch.full((len(pos),), i, dtype=torch.long))
    # Restore trajectory order (rows of one trajectory stay contiguous and in position order).
    perm = sorted(range(len(order)), key=lambda j: order[j])
    cat = lambda xs: torch.cat([xs[j] for j in perm]) if xs else torch.empty(0)  # noqa: E731
    return Features({l: cat(v) for l, v in chunks.items()}, cat(labels), cat(kinds),
                    cat(trajids), [_meta(t) for t in trajs])


def cached_features(cache: Path | None, key: dict, compute) -> Features:
    """Load features from ``cache`` when its key matches, else compute and store them."""
    blob = None
    if cache is not None and cache.is_file():
        try:
            blob = torch.load(cache, weights_only=False)
        except (AttributeError, ModuleNotFoundError, EOFError, RuntimeError, ValueError,
                pickle.UnpicklingError):
            blob = None  # unreadable or written by an older layout of this code: recompute
    if blob is not None:
        have = dict(blob.get("key") or {})
        # A cache that holds more layers than asked for serves the asked ones.
        if ({k: v for k, v in have.items() if k != "layers"}
                == {k: v for k, v in key.items() if k != "layers"}
                and set(key.get("layers", [])) <= set(have.get("layers", []))):
            f = blob["features"]
            f = f if isinstance(f, Features) else Features(**f)
            f.hidden = {l: h for l, h in f.hidden.items() if l in set(key["layers"])}
            return f
    feats = compute()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # Plain containers only: a pickled class would be tied to the module that ran it
        # (``__main__`` under ``python -m``).
        torch.save({"key": key, "features": dict(vars(feats))}, cache)
    return feats


# Bump when the per-token labelling (models/safety_data.py) changes what a row encodes to.
LABEL_RULES_VERSION = 2
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_lm(model_dir: Path, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_DTYPES[dtype])
    return model, tok


def paths_of(value) -> list[Path]:
    """One path or several (``--data a --data b``) as a list; None or empty -> []."""
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [Path(value)]
    return [Path(v) for v in value]


def _held_groups(groups: set[str], seed: int, fraction: float = 0.2) -> set[str]:
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    return set(order[: max(1, int(len(order) * fraction))])


def split_data(data, eval_data, taxonomy: Taxonomy, seed: int):
    """Train and held-out trajectories from one or more files each; without held-out files,
    20% of the training prompt groups are held out."""
    train = [t for p in paths_of(data) for t in load_trajectories(p, taxonomy)]
    if paths_of(eval_data):
        return train, [t for p in paths_of(eval_data) for t in load_trajectories(p, taxonomy)]
    held = _held_groups({t.group or t.user_text for t in train}, seed)
    return ([t for t in train if (t.group or t.user_text) not in held],
            [t for t in train if (t.group or t.user_text) in held])


def _feature_key(path: Path, model: Path, layers: list[int], max_length: int,
                 dtype: str = "float32", taxonomy: Taxonomy | None = None) -> dict:
    st = path.stat()
    model = Path(model)
    # Weights (any format), tokenizer and chat template: what the hidden states and the
    # labelled positions depend on. A model rewritten in place shows in size and mtime.
    files = sorted(f for pattern in ("*.safetensors", "*.bin", "tokenizer*", "chat_template*",
                                     "special_tokens_map.json")
                   for f in model.glob(pattern)) if model.is_dir() else []
    return {"data": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime,
            "model": str(model), "layers": sorted(layers), "max_length": max_length,
            "files": [(f.name, f.stat().st_size, f.stat().st_mtime) for f in files],
            "dtype": dtype, "labels": list(taxonomy.output_names) if taxonomy else None,
            "label_rules": LABEL_RULES_VERSION}


def concat_features(parts: list[Features]) -> Features:
    """Rows of several files as one set (trajectory indices renumbered)."""
    if len(parts) == 1:
        return parts[0]
    offsets, n = [], 0
    for f in parts:
        offsets.append(n)
        n += len(f.meta)
    return Features({l: torch.cat([f.hidden[l] for f in parts]) for l in parts[0].hidden},
                    torch.cat([f.labels for f in parts]), torch.cat([f.kind for f in parts]),
                    torch.cat([f.traj + o for f, o in zip(parts, offsets)]),
                    [m for f in parts for m in f.meta])


def file_features(path: Path, model, tok, model_dir: Path, taxonomy: Taxonomy,
                  layers: list[int], max_length: int, batch_size: int,
                  cache_dir: Path | None, name: str, log=print,
                  dtype: str = "float32") -> Features:
    """One file's features, cached under ``cache_dir`` by file, model, layers and length."""
    path = Path(path)
    rows = load_trajectories(path, taxonomy)
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    cache = cache_dir / f"{path.stem}-{tag}_features.pt" if cache_dir else None
    t0 = time.time()
    f = cached_features(cache, _feature_key(path, model_dir, layers, max_length, dtype, taxonomy),
                        lambda: extract_features(model, tok, rows, taxonomy, layers,
                                                 max_length, batch_size, log, name))
    log(f"{name} {path}: {len(f.meta)} conversations, {f.labels.shape[0]} labelled "
        f"positions ({time.time() - t0:.0f}s)")
    return f


def head_features(data, eval_data, external: Path | None, model_dir: Path,
                  taxonomy: Taxonomy, layers: list[int], max_length: int, batch_size: int,
                  cache_dir: Path | None, seed: int, log=print, dtype: str = "float32"):
    """Features for train / held-out / external rows. ``data`` and ``eval_data`` are one path
    or several; each file's features are cached on their own under ``cache_dir`` (adding a
    file re-extracts only that file). Without held-out files, 20% of the training prompt
    groups are held out (as in ``split_data``)."""
    model, tok = load_lm(model_dir, dtype)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")

    def of_file(path: Path, name: str) -> Features:
        return file_features(path, model, tok, model_dir, taxonomy, layers, max_length,
                             batch_size, cache_dir, name, log, dtype)

    train = concat_features([of_file(p, "train") for p in paths_of(data)])
    out = {"train": train}
    if paths_of(eval_data):
        out["heldout"] = concat_features([of_file(p, "heldout") for p in paths_of(eval_data)])
    else:
        # Held-out groups drawn from every row read, as split_data draws them (lora / full
        # mode, the pre-check): rows dropped at --max-length must not reshuffle the split.
        held = _held_groups({t.group or t.user_text for p in paths_of(data)
                             for t in load_trajectories(p, taxonomy)}, seed)
        out["train"] = train.subset({i for i, m in enumerate(train.meta)
                                     if m["group"] not in held})
        out["heldout"] = train.subset({i for i, m in enumerate(train.meta) if m["group"] in held})
    if external is not None:
        out["external"] = of_file(Path(external), "external")
    return out, model
