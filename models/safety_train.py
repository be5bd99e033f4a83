"""Explicit safety-signal training job (after Li & Kim, ICML 2025): L = L_lm + lambda * L_cls.

The classification signal is a linear head on a hidden state of the LM: K = categories + 1
sigmoid outputs (per category, then the overall ``unsafe``), applied at every position through
``safeserve.kernels.safety_head.head_logits`` (the same math the server runs). Per-token targets
come from ``safety_data.encode_trajectory``. L_cls is BCE-with-logits over labelled positions
with class-balanced positive weights, averaged separately over prompt-end positions and over
response positions and summed, so the few prompt verdicts are not drowned by the many response
tokens.

Modes (``safeserve train safety --mode ...``):

* ``head``: the LM stays frozen. The model runs once over all trajectories (no grad, batched by
  length), the hidden states at labelled positions are cached, and the head is fitted on the
  cache (features standardised for conditioning; the scaling is folded back into weight and
  bias, so the saved head reads the raw hidden state). Seconds per fit on CPU.
* ``lora``: PEFT LoRA on the attention projections q/k/v/o and the MLP gate/up/down (r=16,
  alpha=32, dropout 0.05; all linear layers, since the head reads the residual stream they all
  write) trained jointly with the head.
* ``full``: every LM weight plus the head.

For ``lora`` and ``full``, L_lm is next-token cross-entropy on *safe* response tokens only
(benign answers and refusals); unsafe response tokens are classification targets but never LM
targets, so the model is never taught to produce the harmful text it learns to flag. With
``--lm-targets benign`` L_lm covers only the answers to benign prompts (the base model's own
answers, so L_lm is self-distillation): the written refusals then train the head but not the
LM, which keeps answering as the base model did and leaves refusing to the strategy. The loop
runs under ``accelerate.Accelerator``, so the same code trains 7-8B models on several GPUs:

    accelerate launch --num_processes 8 --mixed_precision bf16 \\
        -m safeserve.models.safety_train safety --data train.jsonl --eval-data heldout.jsonl \\
        --model /models/llama-3-8b-instruct --out ckpt --mode lora --lambda 0.1 \\
        --batch-size 4 --max-length 1024

``full`` mode on 7-8B models needs sharded optimiser state: give ``accelerate launch`` an FSDP or
DeepSpeed config (``accelerate config``); the training code is the same.

LoRA mode writes the adapter to ``<out>/adapter/`` and the merged model to ``<out>`` (what the
server loads). All modes write ``<out>/safety_head/`` (see models/checkpoint.py) with
``metrics.json``; ``head`` mode copies the base model's files into ``<out>`` unless
``--head-only`` (then ``<out>`` holds just ``safety_head/``, to be composed with the base model).

Thresholds are calibrated on half of the held-out prompt groups so that at most
``--target-fpr`` of benign held-out conversations get flagged under the server's rule (prompt
verdict, or ``--tau`` consecutive unsafe response positions); thresholded metrics are reported
on the other half. The prompt verdict and the response rule need different operating points
(a benign 80-token answer offers ~80 chances for a run of tau, a prompt one), but the server
has one threshold per output, so the prompt thresholds are folded into the head along a linear
prompt-end read-out (``finish_head``). Category thresholds go into the saved taxonomy.yaml. The
overall ``unsafe`` output has no taxonomy entry, so its threshold is folded into its bias
instead: it fires at score >= 0.5.

``safeserve train probe-layers`` fits a head-only probe on several layers (1..L; L or -1 = the
final post-norm state the server reads) and reports held-out AUROC, to choose the layer by
measurement.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from safeserve.kernels.safety_head import head_logits, offset_prompt_rows
from safeserve.models.checkpoint import SafetyHead, load_safety_head
from safeserve.models.decision_defaults import OPERATING_POINT, prompt_logit_offset
from safeserve.models.safety_data import (MASK_PROMPT, MASK_RESPONSE, Encoded, Trajectory,
                                          encode_trajectory, load_trajectories)
from safeserve.models.taxonomy import Category, Taxonomy

HARD_NEGATIVE_SOURCES = ("gpteacher_roleplay", "risky_benign", "alpaca_wrapped", "hard_negative")


# --------------------------------------------------------------------------------------
# Features (hidden states at labelled positions)
# --------------------------------------------------------------------------------------


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
    encs, kept, skipped = [], [], 0
    for t in trajs:
        try:
            encs.append(encode_trajectory(t, tokenizer, taxonomy, max_length))
            kept.append(t)
        except ValueError:
            skipped += 1
    if skipped:
        log(f"skipped {skipped} rows whose prompt alone is longer than max_length {max_length}")
    return encs, kept


@torch.inference_mode()
def extract_features(model, tokenizer, trajs: list[Trajectory], taxonomy: Taxonomy,
                     layers: list[int], max_length: int = 512, batch_size: int = 16,
                     log=print, desc: str = "features") -> Features:
    """Run the (frozen) model once and keep hidden states at labelled positions."""
    encs, trajs = encode_all(trajs, tokenizer, taxonomy, max_length, log)
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
    if cache is not None and cache.is_file():
        blob = torch.load(cache, weights_only=False)
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


# --------------------------------------------------------------------------------------
# Loss and head fitting
# --------------------------------------------------------------------------------------


def positive_weights(labels: torch.Tensor, cap: float = 20.0) -> torch.Tensor:
    """Class-balanced BCE positive weight per output: #neg / #pos, capped."""
    pos = labels.sum(0)
    neg = labels.shape[0] - pos
    return (neg / pos.clamp(min=1.0)).clamp(1.0, cap)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, kind: torch.Tensor,
                        pos_weight: torch.Tensor) -> torch.Tensor:
    """Mean BCE over prompt positions + mean BCE over response positions (each if present)."""
    bce = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight,
                                             reduction="none").mean(1)
    total = logits.new_zeros(())
    for k in (MASK_PROMPT, MASK_RESPONSE):
        sel = kind == k
        if sel.any():
            total = total + bce[sel].mean()
    return total


@dataclass
class HeadFit:
    weight: torch.Tensor  # [K, H] raw-hidden space (what is saved)
    bias: torch.Tensor  # [K]
    losses: list[float]
    # The fit in standardised space ((x - mean) / std): same logits as weight/bias on raw x.
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    weight_std: torch.Tensor | None = None
    bias_std: torch.Tensor | None = None
    mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # raw-hidden space


def fit_head(hidden: torch.Tensor, labels: torch.Tensor, kind: torch.Tensor, *,
             epochs: int = 30, lr: float = 2e-3, batch_size: int = 4096,
             weight_decay: float = 1e-3, seed: int = 0, progress: bool = True,
             mlp_units: int = 0, mlp_gate: tuple[torch.Tensor, float] | None = None,
             frozen_linear: tuple[torch.Tensor, torch.Tensor] | None = None) -> HeadFit:
    """Fit weight [K,H] and bias [K] (and, with ``mlp_units``, the residual MLP of
    ``kernels/safety_head.py``) on cached features, standardised, then folded back to raw
    hidden states. ``mlp_gate`` = (v, c) gates the MLP by clamp(1 - (v.h + c), 0, 1);
    ``frozen_linear`` = (weight, bias) of an existing head keeps its linear part as it is."""
    g = torch.Generator().manual_seed(seed)
    x = hidden.float()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-4)
    z = (x - mu) / sd
    k = labels.shape[1]
    pw = positive_weights(labels)
    prior = labels.mean(0).clamp(1e-4, 1 - 1e-4)
    if frozen_linear is not None:  # raw (W, b) -> standardised space, not trained
        w = (frozen_linear[0].float() * sd).clone()
        b = (frozen_linear[1].float() + frozen_linear[0].float() @ mu).clone()
        params = []
    else:
        w = torch.zeros(k, z.shape[1], requires_grad=True)
        b = torch.log(prior / (1 - prior)).clone().requires_grad_(True)
        params = [w, b]
    mlp = None
    if mlp_units > 0:
        # He-initialised up projection; the down projection starts at zero, so training
        # starts from the linear head and adds the non-linear term only where it helps.
        up = (torch.randn(mlp_units, z.shape[1], generator=g) * (2.0 / z.shape[1]) ** 0.5).requires_grad_(True)
        up_bias = torch.zeros(mlp_units, requires_grad=True)
        down = torch.zeros(k, mlp_units, requires_grad=True)
        mlp = (up, up_bias, down)
        params += list(mlp)
        if mlp_gate is not None:  # v.x + c = (v * sd).z + (v.mu + c)
            v, c = mlp_gate
            mlp += (torch.cat([v.float() * sd, (v.float() @ mu + c).reshape(1)]),)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # Sample prompt and response positions in the same proportion in every batch.
    n = z.shape[0]
    losses = []
    bar = tqdm(range(epochs), desc="head", unit="epoch", disable=not progress)
    for _ in bar:
        perm = torch.randperm(n, generator=g)
        tot, steps = 0.0, 0
        for s in range(0, n, batch_size):
            ix = perm[s:s + batch_size]
            loss = classification_loss(head_logits(z[ix], w, b, mlp), labels[ix], kind[ix], pw)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot, steps = tot + float(loss.detach()), steps + 1
        losses.append(tot / max(steps, 1))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    with torch.no_grad():
        w_raw = w / sd  # logits = w.(x-mu)/sd + b = (w/sd).x + (b - (w/sd).mu)
        b_raw = b - w_raw @ mu
        mlp_raw = None
        if mlp is not None:  # the same fold for the up projection
            up_raw = mlp[0] / sd
            mlp_raw = (up_raw.contiguous(), (mlp[1] - up_raw @ mu).contiguous(),
                       mlp[2].detach().clone())
            if mlp_gate is not None:
                mlp_raw += (torch.cat([mlp_gate[0].float(), torch.tensor([float(mlp_gate[1])])]),)
    return HeadFit(w_raw.detach().contiguous(), b_raw.detach().contiguous(), losses, mu, sd,
                   w.detach().clone(), b.detach().clone(), mlp_raw)


def scores_of(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              chunk: int = 65536, mlp=None) -> torch.Tensor:
    """Sigmoid scores through the serving math, chunked over rows."""
    out = [torch.sigmoid(head_logits(hidden[i:i + chunk].float(), weight, bias, mlp))
           for i in range(0, hidden.shape[0], chunk)]
    return torch.cat(out) if out else torch.empty(0, weight.shape[0])


# --------------------------------------------------------------------------------------
# Metrics and calibration
# --------------------------------------------------------------------------------------


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties averaged); None without both classes."""
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    s, idx = scores.double().sort()
    _, inv, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(s)
    ranks[idx] = avg[inv]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def flag_trajectories(scores: torch.Tensor, feats: Features, thresholds: torch.Tensor,
                      tau: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Server rule per trajectory: (prompt verdict unsafe, tau consecutive unsafe responses)."""
    viol = (scores >= thresholds).any(1)
    n = len(feats.meta)
    p_flag = torch.zeros(n, dtype=torch.bool)
    r_flag = torch.zeros(n, dtype=torch.bool)
    run = 0
    last = -1
    for v, k, t in zip(viol.tolist(), feats.kind.tolist(), feats.traj.tolist()):
        if t != last:
            run, last = 0, t
        if k == MASK_PROMPT:
            p_flag[t] = v
        else:
            run = run + 1 if v else 0
            if run >= tau:
                r_flag[t] = True
    return p_flag, r_flag


def _rate(mask: torch.Tensor, sel: torch.Tensor) -> dict:
    n = int(sel.sum())
    return {"rate": (float(mask[sel].float().mean()) if n else None), "n": n}


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def prompt_end_direction(hidden: torch.Tensor, kind: torch.Tensor,
                         ridge: float = 1e-2) -> tuple[torch.Tensor, float]:
    """Linear read-out (v, c) with v.h + c ~ 1 at prompt-end positions and ~ 0 at response
    positions (ridge least squares; the two position types are linearly separable because the
    prompt end always follows the assistant role marker)."""
    x = hidden.float()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-4)
    z = torch.cat([(x - mu) / sd, torch.ones(x.shape[0], 1)], 1)
    y = (kind == MASK_PROMPT).float()
    # Balance the two position types so the few prompt ends are fitted as well as responses.
    w = torch.where(y > 0, 0.5 / y.sum().clamp(min=1), 0.5 / (1 - y).sum().clamp(min=1))
    a = z.T @ (z * w[:, None]) + ridge * torch.eye(z.shape[1])
    coef = torch.linalg.solve(a, z.T @ (w * y))
    v = coef[:-1] / sd
    return v, float(coef[-1] - v @ mu)


def _run_max(scores: torch.Tensor, feats: Features, tau: int) -> torch.Tensor:
    """Per conversation and output: the largest score held by tau consecutive response
    positions (0 without enough response tokens). Output k alone flags the response part of a
    conversation at threshold t iff this value is >= t."""
    out = torch.zeros(len(feats.meta), scores.shape[1])
    resp = feats.kind == MASK_RESPONSE
    for t in torch.unique(feats.traj).tolist():
        r = scores[(feats.traj == t) & resp]
        if r.shape[0] >= tau:
            out[t] = r.unfold(0, tau, 1).min(dim=2).values.max(0).values
    return out


def _prompt_scores(scores: torch.Tensor, feats: Features) -> torch.Tensor:
    out = torch.zeros(len(feats.meta), scores.shape[1])
    sel = feats.kind == MASK_PROMPT
    out[feats.traj[sel]] = scores[sel]
    return out


def calibrate(logits: torch.Tensor, feats: Features, tau: int, target_fpr: float,
              overall_share: float = 0.5, prompt_share: float = 0.4
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Separate prompt and response thresholds per output from benign conversations.

    The benign false-positive budget ``target_fpr`` is split between the prompt verdict
    (``prompt_share``) and the response rule, and between the overall output
    (``overall_share``) and the categories (the rest, evenly). Each output's prompt threshold
    is the matching upper quantile of benign prompt-end scores, its response threshold that of
    the benign conversations' tau-run maxima. Budgets shrink until the combined rule (any
    output) stays within ``target_fpr`` on these conversations.
    Returns (prompt thresholds, response thresholds, budget scale used).
    """
    scores = torch.sigmoid(logits)
    benign = torch.tensor([m["benign"] for m in feats.meta])
    k = scores.shape[1]
    ps, rm = _prompt_scores(scores, feats)[benign], _run_max(scores, feats, tau)[benign]
    share = torch.full((k,), (1 - overall_share) / max(k - 1, 1))
    share[-1] = overall_share

    def thresholds(ref: torch.Tensor, budget: float) -> torch.Tensor:
        """Just above the (m+1)-th largest benign value, m = floor(budget * share * n): at
        most m benign conversations reach it (an interpolated quantile would let the top
        one through at any budget)."""
        if ref.shape[0] == 0:
            return torch.full((k,), 0.5)
        top = ref.sort(0, descending=True).values
        m = [min(int(budget * float(share[j]) * ref.shape[0]), ref.shape[0] - 1)
             for j in range(k)]
        q = torch.stack([top[m[j], j] for j in range(k)])
        return (q + 1e-6).clamp(0.01, 0.9999)

    # Prompt and response budgets shrink separately, each until its own part of the rule
    # stays within its share of the target on these conversations.
    sp = sr = 1.0
    for _ in range(20):
        thr_p = thresholds(ps, target_fpr * prompt_share * sp)
        thr_r = thresholds(rm, target_fpr * (1 - prompt_share) * sr)
        p_flag, r_flag = flag_trajectories_split(scores, feats, thr_p, thr_r, tau)
        p_rate = float(p_flag[benign].float().mean()) if ps.shape[0] else 0.0
        r_rate = float(r_flag[benign].float().mean()) if ps.shape[0] else 0.0
        ok_p = p_rate <= target_fpr * prompt_share + 1e-9
        ok_r = r_rate <= target_fpr * (1 - prompt_share) + 1e-9
        if ok_p and ok_r:
            break
        sp, sr = sp * (1 if ok_p else 0.7), sr * (1 if ok_r else 0.7)
    return thr_p, thr_r, min(sp, sr)


def flag_trajectories_split(scores: torch.Tensor, feats: Features, thr_p: torch.Tensor,
                            thr_r: torch.Tensor, tau: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The server rule with separate prompt / response thresholds (before folding)."""
    thr = torch.where((feats.kind == MASK_PROMPT)[:, None], thr_p[None, :], thr_r[None, :])
    return flag_trajectories(scores, feats, thr, tau)


def evaluate(scores: torch.Tensor, feats: Features, thresholds: torch.Tensor, names: list[str],
             tau: int) -> dict:
    """Held-out metrics: AUROC and accuracy per output at prompt and token level, and the
    server-rule detection and false-positive rates per conversation."""
    hit = scores >= thresholds
    out: dict = {"prompt_level": {}, "token_level": {}}
    for level, k in (("prompt_level", MASK_PROMPT), ("token_level", MASK_RESPONSE)):
        sel = feats.kind == k
        for j, name in enumerate(names):
            y = feats.labels[sel, j]
            out[level][name] = {
                "auroc": auroc(scores[sel, j], y),
                "accuracy": float((hit[sel, j] == (y > 0.5)).float().mean()) if sel.any() else None,
                "positives": int(y.sum()), "n": int(sel.sum())}
    p, r = flag_trajectories(scores, feats, thresholds, tau)
    m = feats.meta
    t = lambda key: torch.tensor([bool(x[key]) for x in m])  # noqa: E731
    benign, hard = t("benign"), t("hard_negative")
    prompt_unsafe, resp_unsafe = t("prompt_unsafe"), t("response_unsafe")
    prefill = torch.tensor(["/prefill" in x["source"] for x in m])
    out["conversation_level"] = {
        "harmful_prompt_flagged_at_prompt": _rate(p, prompt_unsafe),
        "harmful_prompt_flagged_any": _rate(p | r, prompt_unsafe),
        "unsafe_response_flagged_by_response": _rate(r, resp_unsafe),
        "prefill_attack_flagged_by_response": _rate(r, resp_unsafe & prefill),
        "benign_flagged_any (false positive)": _rate(p | r, benign),
        "benign_flagged_at_prompt": _rate(p, benign),
        "hard_negative_flagged_any (false positive)": _rate(p | r, hard),
        "hard_negative_flagged_at_prompt": _rate(p, hard),
    }
    by_src: dict[str, dict] = {}
    for i, x in enumerate(m):
        s = by_src.setdefault(x["source"].split("/")[0], {"n": 0, "flagged": 0})
        s["n"] += 1
        s["flagged"] += int(p[i] | r[i])
    out["flag_rate_by_source"] = {k: round(v["flagged"] / v["n"], 4) for k, v in by_src.items()}
    return out


def external_prompt_metrics(scores: torch.Tensor, feats: Features,
                            thresholds: torch.Tensor) -> dict:
    """Prompt verdict on prompt-only rows, per source and label (never used for any choice)."""
    sel = feats.kind == MASK_PROMPT
    s, trajs = scores[sel], feats.traj[sel]
    flag = (s >= thresholds).any(1)
    keys = [f"{feats.meta[int(t)]['source']}/"
            f"{'unsafe' if feats.meta[int(t)]['prompt_unsafe'] else 'safe'}" for t in trajs]
    out = {}
    for key in sorted(set(keys)):
        m = torch.tensor([k == key for k in keys])
        out[key] = {"n": int(m.sum()), "flagged_rate": float(flag[m].float().mean())}
    y = torch.tensor([feats.meta[int(t)]["prompt_unsafe"] for t in trajs]).float()
    out["all_auroc_overall"] = auroc(s[:, -1], y)
    return out


def head_external_metrics(head: SafetyHead, ex: Features) -> dict:
    """``external_prompt_metrics`` of a finished head at its served thresholds."""
    return external_prompt_metrics(
        scores_of(ex.hidden[head.layer], head.weight, head.bias, mlp=head.mlp), ex,
        torch.tensor([c.threshold for c in head.taxonomy.categories] + [0.5]))


def split_groups(meta: list[dict], fraction: float, seed: int) -> tuple[set[int], set[int]]:
    groups = sorted({m["group"] for m in meta})
    random.Random(seed).shuffle(groups)
    pick = set(groups[: int(round(len(groups) * fraction))])
    a = {i for i, m in enumerate(meta) if m["group"] in pick}
    return a, set(range(len(meta))) - a


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def with_thresholds(taxonomy: Taxonomy, thresholds: list[float]) -> Taxonomy:
    # 6 decimals: thresholds sit near 1, where 4 would move them by up to half a logit.
    return Taxonomy(tuple(Category(c.id, c.definition, round(float(t), 6))
                          for c, t in zip(taxonomy.categories, thresholds)))


def copy_model_files(src: Path, dst: Path) -> None:
    """Copy the LM's files (no symlinks) so the checkpoint is self-contained."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name, follow_symlinks=True)


def finish_head(weight: torch.Tensor, bias: torch.Tensor, eval_feats: Features,
                taxonomy: Taxonomy, args: dict, layer: int, log=print,
                mlp=None) -> tuple[SafetyHead, dict]:
    """Calibrate on half the held-out groups, report on the other half, build the head.

    The prompt verdict and the response rule get separate operating points (prompt
    thresholds t_p, response thresholds t_r; see ``calibrate``). The server has one threshold
    per output, so the difference is folded into the head along the prompt-end read-out
    (v, c): logit' = logit + delta * (v.h + c) with delta = logit(t_r) - logit(t_p), which adds
    delta at prompt ends and ~0 on response tokens; t_r is then the served threshold. The
    overall output's threshold is folded into its bias (it fires at 0.5). All reported
    thresholded rates come from the final head under the server rule.
    """
    names = list(taxonomy.output_names)
    cal_ids, test_ids = split_groups(eval_feats.meta, 0.5, args.get("seed", 0))
    cal, test = eval_feats.subset(cal_ids), eval_feats.subset(test_ids)
    hc = cal.hidden[layer]
    logits_cal = torch.cat([head_logits(hc[i:i + 65536], weight, bias, mlp)
                            for i in range(0, hc.shape[0], 65536)])
    thr_p, thr_r, scale = calibrate(logits_cal, cal, args["tau"], args["target_fpr"])
    weight, bias = weight.clone(), bias.clone()
    v, c = prompt_end_direction(hc, cal.kind)
    ind = hc.float() @ v + c
    delta = _logit(thr_r) - _logit(thr_p)
    if args.get("prompt_offset", True):
        weight += delta[:, None] * v[None, :]
        bias += delta * c
    thr = thr_r.clone()
    shift = float(_logit(thr[-1]))
    bias[-1] -= shift
    thr[-1] = 0.5
    # The fold and the overall shift are linear in the logits, so they land in the linear
    # part whether or not the head has the residual MLP.
    head = SafetyHead(weight, bias, with_thresholds(taxonomy, thr[:-1].tolist()), layer=layer,
                      mlp=mlp)
    tau = args["tau"]
    metrics = {
        # AUROC is threshold-free: the whole held-out set; thresholded rates: the test half.
        "auroc_all_heldout": evaluate(scores_of(eval_feats.hidden[layer], head.weight,
                                                head.bias, mlp=mlp), eval_feats, thr, names, tau),
        "thresholded_on_test_half": evaluate(scores_of(test.hidden[layer], head.weight,
                                                       head.bias, mlp=mlp), test, thr, names, tau),
        "thresholded_on_calibration_half": evaluate(scores_of(hc, head.weight, head.bias,
                                                              mlp=mlp), cal,
                                                    thr, names, tau)["conversation_level"],
        "calibration": {
            "target_fpr": args["target_fpr"], "tau": tau, "budget_scale": scale,
            "prompt_thresholds": dict(zip(names, thr_p.tolist())),
            "response_thresholds": dict(zip(names, thr_r.tolist())),
            "prompt_offset_logits": dict(zip(names, delta.tolist())),
            "prompt_end_readout": {
                "at_prompt_end_mean": float(ind[cal.kind == MASK_PROMPT].mean()),
                "at_response_mean": float(ind[cal.kind == MASK_RESPONSE].mean()),
                "at_response_std": float(ind[cal.kind == MASK_RESPONSE].std())},
            "overall_bias_shift": shift,
            "served_thresholds": dict(zip(names, thr.tolist())),
            "calibration_conversations": len(cal.meta),
            "test_conversations": len(test.meta)},
    }
    return head, metrics


def _recipe(args: dict) -> dict:
    """The options that reproduce a run, JSON-safe (paths as text)."""
    def safe(v):
        if isinstance(v, (list, tuple)):
            return [safe(x) for x in v]
        return str(v) if isinstance(v, Path) else v

    return {k: safe(v) for k, v in args.items()
            if isinstance(v, (str, int, float, bool, Path, type(None), list, tuple))}


def write_checkpoint(head: SafetyHead, metrics: dict, out: Path, extra: dict) -> Path:
    head.extra = dict(extra)
    d = head.save(out)
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return d


def summary_table(metrics: dict, names: list[str]):
    from rich.table import Table

    t = Table(title="held-out AUROC (prompt / token)")
    t.add_column("output")
    t.add_column("prompt AUROC")
    t.add_column("token AUROC")
    t.add_column("threshold")
    a = metrics["auroc_all_heldout"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for n in names:
        t.add_row(n, fmt(a["prompt_level"][n]["auroc"]), fmt(a["token_level"][n]["auroc"]),
                  fmt(metrics["calibration"]["served_thresholds"][n]))
    return t


# --------------------------------------------------------------------------------------
# Head mode and the layer probe
# --------------------------------------------------------------------------------------


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_lm(model_dir: Path, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_DTYPES[dtype])
    return model, tok


def _paths(value) -> list[Path]:
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


def _split_data(data, eval_data, taxonomy: Taxonomy, seed: int):
    """Train and held-out trajectories from one or more files each; without held-out files,
    20% of the training prompt groups are held out."""
    train = [t for p in _paths(data) for t in load_trajectories(p, taxonomy)]
    if _paths(eval_data):
        return train, [t for p in _paths(eval_data) for t in load_trajectories(p, taxonomy)]
    held = _held_groups({t.group or t.user_text for t in train}, seed)
    return ([t for t in train if (t.group or t.user_text) not in held],
            [t for t in train if (t.group or t.user_text) in held])


def _feature_key(path: Path, model: Path, layers: list[int], max_length: int) -> dict:
    st = path.stat()
    return {"data": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime,
            "model": str(model), "layers": sorted(layers), "max_length": max_length}


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
                  cache_dir: Path | None, name: str, log=print) -> Features:
    """One file's features, cached under ``cache_dir`` by file, model, layers and length."""
    path = Path(path)
    rows = load_trajectories(path, taxonomy)
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    cache = cache_dir / f"{path.stem}-{tag}_features.pt" if cache_dir else None
    t0 = time.time()
    f = cached_features(cache, _feature_key(path, model_dir, layers, max_length),
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
    groups are held out (as in ``_split_data``)."""
    model, tok = _load_lm(model_dir, dtype)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")

    def of_file(path: Path, name: str) -> Features:
        return file_features(path, model, tok, model_dir, taxonomy, layers, max_length,
                             batch_size, cache_dir, name, log)

    train = concat_features([of_file(p, "train") for p in _paths(data)])
    out = {"train": train}
    if _paths(eval_data):
        out["heldout"] = concat_features([of_file(p, "heldout") for p in _paths(eval_data)])
    else:
        held = _held_groups({m["group"] for m in train.meta}, seed)
        out["train"] = train.subset({i for i, m in enumerate(train.meta)
                                     if m["group"] not in held})
        out["heldout"] = train.subset({i for i, m in enumerate(train.meta) if m["group"] in held})
    if external is not None:
        out["external"] = of_file(Path(external), "external")
    return out, model


def probe_layers(feats: dict, layers: list[int], taxonomy: Taxonomy, epochs: int, lr: float,
                 seed: int, log=print) -> list[dict]:
    """Held-out AUROC of a head fitted on each layer (overall output and category mean)."""
    rows = []
    tr, ev = feats["train"], feats["heldout"]
    for layer in layers:
        fit = fit_head(tr.hidden[layer], tr.labels, tr.kind, epochs=epochs, lr=lr, seed=seed,
                       progress=False)
        s = scores_of(ev.hidden[layer], fit.weight, fit.bias)
        row = {"layer": layer}
        for lvl, k in (("prompt", MASK_PROMPT), ("token", MASK_RESPONSE)):
            sel = ev.kind == k
            row[f"{lvl}_auroc_unsafe"] = auroc(s[sel, -1], ev.labels[sel, -1])
            cats = [auroc(s[sel, j], ev.labels[sel, j]) for j in range(len(taxonomy.ids))]
            cats = [c for c in cats if c is not None]
            row[f"{lvl}_auroc_category_mean"] = sum(cats) / len(cats) if cats else None
        if "external" in feats:
            ex = feats["external"]
            se = scores_of(ex.hidden[layer], fit.weight, fit.bias)
            row["external_prompt_auroc_unsafe"] = auroc(se[:, -1], ex.labels[:, -1])
        log(json.dumps(row))
        rows.append(row)
    return rows


# The gate is clamp(1 - GATE_SHARPNESS * read-out, 0, 1): fully closed from a read-out of
# 1 / GATE_SHARPNESS up. Prompt ends read ~0.95, not 1, and an MLP that never had to fit them
# can be large there, so a gate of 1 - read-out would leak it into the prompt verdict.
GATE_SHARPNESS = 2.0


def _prompt_end_gate(feats: "Features", layer: int = -1) -> tuple[torch.Tensor, float]:
    v, c = prompt_end_direction(feats.hidden[layer], feats.kind)
    return v * GATE_SHARPNESS, c * GATE_SHARPNESS


def _frozen_linear(init_head) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The linear part of an existing linear head, kept as it is (``--init-head``)."""
    if not init_head:
        return None
    head = load_safety_head(init_head)
    if head.mlp is not None:
        raise ValueError(f"--init-head {init_head} has an MLP; give a linear head")
    return head.weight, head.bias


def keep_init_operating_point(init_head, fit: HeadFit, heldout: Features,
                              args: dict) -> tuple[SafetyHead, dict]:
    """``--keep-thresholds``: the init head's linear part, thresholds, fold and operating point
    (its exact prompt offset included) as they were, plus the fitted (gated) MLP. With the gate closed at prompt ends the prompt verdict is the
    init head's; the response rule reads the new scores at the old thresholds (move them with
    ``train operating-point``). Metrics are measured at that point, nothing is calibrated."""
    init = load_safety_head(init_head)
    point = {k: v for k, v in init.extra.items() if k == OPERATING_POINT}
    head = SafetyHead(init.weight, init.bias, init.taxonomy, init.layer, extra=point,
                      mlp=fit.mlp)
    thr = torch.tensor([c.threshold for c in init.taxonomy.categories] + [0.5])
    names = list(init.taxonomy.output_names)
    h = heldout.hidden[init.layer]
    scores = offset_prompt_rows(scores_of(h, head.weight, head.bias, mlp=head.mlp),
                                heldout.kind == MASK_PROMPT, prompt_logit_offset(init.extra))
    measured = evaluate(scores, heldout, thr, names, args["tau"])
    # All held-out conversations are "test" here: nothing was calibrated on them.
    metrics = {"auroc_all_heldout": measured, "thresholded_on_test_half": measured,
               "calibration": {"kept_operating_point_of": str(init_head), "tau": args["tau"],
                               "served_thresholds": dict(zip(names, thr.tolist()))}}
    return head, metrics


def run_head_mode(args: dict, taxonomy: Taxonomy, log=print) -> dict:
    layer = args["layer"]
    probe = [int(x) for x in str(args.get("probe_layers") or "").split(",") if x.strip()]
    layers = sorted(set([layer] + probe))
    cache_dir = Path(args["cache_dir"]) if args.get("cache_dir") else None
    feats, _ = head_features(args["data"], args.get("eval_data"), args.get("external_eval"),
                             args["model"], taxonomy, layers, args["max_length"],
                             args["batch_size"], cache_dir, args["seed"], log,
                             args["dtype"])
    tr = feats["train"]
    t0 = time.time()
    fit = fit_head(tr.hidden[layer], tr.labels, tr.kind, epochs=args["epochs"], lr=args["lr"],
                   batch_size=args["head_batch_size"], weight_decay=args["weight_decay"],
                   seed=args["seed"], mlp_units=args["mlp_units"],
                   mlp_gate=_prompt_end_gate(tr) if args["mlp_gate"] else None,
                   frozen_linear=_frozen_linear(args.get("init_head")))
    log(f"head fitted in {time.time() - t0:.1f}s; loss {fit.losses[0]:.4f} -> "
        f"{fit.losses[-1]:.4f}")
    if args["keep_thresholds"]:
        head, metrics = keep_init_operating_point(args["init_head"], fit, feats["heldout"], args)
    else:
        head, metrics = finish_head(fit.weight, fit.bias, feats["heldout"], taxonomy, args,
                                    layer, log, mlp=fit.mlp)
    metrics["train_loss"] = {"first_epoch": fit.losses[0], "last_epoch": fit.losses[-1]}
    if "external" in feats:
        metrics["external_prompt_only"] = head_external_metrics(head, feats["external"])
    if probe:
        metrics["layer_probe"] = probe_layers(feats, layers, taxonomy, args["epochs"],
                                              args["lr"], args["seed"], log)
    metrics["data"] = {"train_conversations": len(tr.meta), "train_positions": tr.labels.shape[0],
                       "heldout_conversations": len(feats["heldout"].meta)}
    out = Path(args["out"])
    if not args.get("head_only"):
        copy_model_files(args["model"], out)
    extra = {"recipe": _recipe(args),
             "base_model": str(args["model"]), "mode": "head",
             "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_checkpoint(head, metrics, out, {**head.extra, **extra})
    return metrics


# --------------------------------------------------------------------------------------
# LoRA / full mode: L = L_lm + lambda * L_cls with accelerate
# --------------------------------------------------------------------------------------

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class HeadParams(torch.nn.Module):
    """The safety head as trainable parameters (weight [K,H], bias [K])."""

    def __init__(self, k: int, h: int, prior: torch.Tensor | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(k, h))
        init = torch.zeros(k) if prior is None else torch.log(prior / (1 - prior))
        self.bias = torch.nn.Parameter(init.clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(hidden, self.weight, self.bias)


LM_TARGETS = ("safe", "benign")


def _collate(encs: list[Encoded], pad: int, lm_targets: str = "safe"):
    """Batch tensors. LM targets: ``safe`` = every safe response token (benign answers and
    refusals to harmful prompts); ``benign`` = only the answers of fully benign conversations,
    which are the base model's own: L_lm is then self-distillation that keeps the LM's behaviour,
    and the LM never learns to refuse by itself (the head and the decoding strategy decide)."""
    width = max(len(e.input_ids) for e in encs)
    k = encs[0].labels.shape[1]
    x = torch.full((len(encs), width), pad, dtype=torch.long)
    att = torch.zeros((len(encs), width), dtype=torch.long)
    lab = torch.zeros((len(encs), width, k))
    kind = torch.zeros((len(encs), width), dtype=torch.int8)
    lm = torch.full((len(encs), width), -100, dtype=torch.long)
    for r, e in enumerate(encs):
        n = len(e.input_ids)
        ids = torch.tensor(e.input_ids)
        x[r, :n], att[r, :n], lab[r, :n], kind[r, :n] = ids, 1, e.labels, e.mask
        # LM targets: safe response tokens only (never the harmful text the head flags).
        safe_resp = (e.mask == MASK_RESPONSE) & (e.labels[:, -1] < 0.5)
        if lm_targets == "benign" and bool((e.labels[e.mask > 0] > 0.5).any()):
            safe_resp = torch.zeros_like(safe_resp)
        lm[r, :n] = torch.where(safe_resp, ids, torch.full_like(ids, -100))
    return {"input_ids": x, "attention_mask": att, "labels": lab, "kind": kind, "lm": lm}


def lm_loss(logits: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Next-token CE: logits at p predict token p+1; mean over target tokens (0 if none)."""
    tgt = lm[:, 1:]
    lg = logits[:, :-1]
    n = (tgt != -100).sum()
    if n == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), tgt.reshape(-1),
                           ignore_index=-100, reduction="sum") / n


def run_adapter_mode(args: dict, taxonomy: Taxonomy, log=print) -> dict:
    from accelerate import Accelerator

    acc = Accelerator()
    log = log if acc.is_main_process else (lambda *a, **k: None)
    torch.manual_seed(args["seed"])
    model, tok = _load_lm(args["model"], args["dtype"])
    if args["mode"] == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args["lora_r"], lora_alpha=args["lora_alpha"], lora_dropout=0.05,
                         target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    train, held = _split_data(args["data"], args.get("eval_data"), taxonomy, args["seed"])
    encs, _ = encode_all(train, tok, taxonomy, args["max_length"], log)
    all_lab = torch.cat([e.labels[e.mask > 0] for e in encs])
    pw = positive_weights(all_lab)
    head = HeadParams(taxonomy.num_outputs, model.config.hidden_size,
                      all_lab.mean(0).clamp(1e-4, 1 - 1e-4))
    n_layers = model.config.num_hidden_layers
    li = resolve_layer(args["layer"], n_layers)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    loader = torch.utils.data.DataLoader(encs, batch_size=args["batch_size"], shuffle=True,
                                         collate_fn=lambda b: _collate(b, pad,
                                                                       args["lm_targets"]))
    params = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": args["lr"]},
              {"params": list(head.parameters()), "lr": args["head_lr"]}]
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    model, head, opt, loader = acc.prepare(model, head, opt, loader)
    pw = pw.to(acc.device)
    step, hist = 0, []
    max_steps = args.get("max_steps") or 0
    model.train()
    for epoch in range(args["epochs"]):
        bar = tqdm(loader, desc=f"epoch {epoch + 1}", disable=not acc.is_main_process)
        for batch in bar:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True)
            hid = out.hidden_states[li]
            sel = batch["kind"] > 0
            l_cls = classification_loss(head(hid[sel]), batch["labels"][sel],
                                        batch["kind"][sel], pw)
            l_lm = lm_loss(out.logits, batch["lm"])
            loss = l_lm + args["lambda_cls"] * l_cls
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            step += 1
            hist.append({"step": step, "loss": float(loss.detach()), "lm": float(l_lm.detach()),
                         "cls": float(l_cls.detach())})
            bar.set_postfix(lm=f"{hist[-1]['lm']:.3f}", cls=f"{hist[-1]['cls']:.3f}")
            if max_steps and step >= max_steps:
                break
        if max_steps and step >= max_steps:
            break
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return {}
    out_dir = Path(args["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    m = acc.unwrap_model(model)
    h = acc.unwrap_model(head)
    if args["mode"] == "lora":
        m.save_pretrained(out_dir / "adapter")
        m = m.merge_and_unload()
    m.eval()
    m.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    # Held-out metrics with the trained model's own hidden states.
    ev = extract_features(m, tok, held, taxonomy, [args["layer"]], args["max_length"],
                          args["batch_size"], log, "heldout")
    head_obj, metrics = finish_head(h.weight.detach().float().cpu(),
                                    h.bias.detach().float().cpu(), ev, taxonomy, args,
                                    args["layer"], log)
    metrics["train_history"] = hist[-50:]
    if args.get("external_eval"):
        ext = load_trajectories(args["external_eval"], taxonomy)
        ex = extract_features(m, tok, ext, taxonomy, [args["layer"]], args["max_length"],
                              args["batch_size"], log, "external")
        metrics["external_prompt_only"] = head_external_metrics(head_obj, ex)
    metrics["data"] = {"train_conversations": len(encs), "heldout_conversations": len(ev.meta),
                       "steps": step, "lm_targets": args["lm_targets"]}
    extra = {"recipe": _recipe(args),
             "base_model": str(args["model"]), "mode": args["mode"],
             "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_checkpoint(head_obj, metrics, out_dir, extra)
    return metrics


def recalibrate(model_dir: Path, head_dir: Path, eval_data, out: Path, *, target_fpr: float,
                tau: int = 3, max_length: int = 512, batch_size: int = 16, seed: int = 0,
                log=print) -> dict:
    """New thresholds for a trained head at another benign budget, without retraining.

    ``model_dir`` is the LM the head reads (the base model for a head-only checkpoint, the
    merged model for LoRA). Held-out features are extracted once, then ``finish_head`` runs as
    at the end of training: only the thresholds and the training fold of the prompt verdict
    move (a second fold is one more shift along the prompt-end read-out, re-estimated on these
    features), and the metrics are re-measured at the new operating point. The head's
    ``operating_point`` (an exact prompt offset, tau, alert band from ``train
    operating-point``) is dropped: it belonged to the old thresholds. Writes ``<out>/safety_head/``; a
    LoRA ``adapter/`` beside ``head_dir``'s head is copied along.
    """
    from safeserve.models.checkpoint import load_safety_head

    head = load_safety_head(head_dir)
    taxonomy = head.taxonomy
    model, tok = _load_lm(Path(model_dir))
    model.eval()
    held = [t for p in _paths(eval_data) for t in load_trajectories(p, taxonomy)]
    ev = extract_features(model, tok, held, taxonomy, [head.layer], max_length, batch_size, log,
                          "heldout")
    args = {"tau": tau, "target_fpr": target_fpr, "seed": seed, "prompt_offset": True}
    new_head, metrics = finish_head(head.weight.float(), head.bias.float(), ev, taxonomy, args,
                                    head.layer, log, mlp=head.mlp)
    metrics["recalibrated_from"] = {"head": str(head_dir), "target_fpr": target_fpr,
                                    "previous_served_thresholds": {
                                        c.id: c.threshold for c in taxonomy.categories}}
    # A fresh operating point: the old one's exact prompt offset (if any) would count twice
    # on top of the fold calibrated here from the raw logits, and its tau / band were chosen
    # for the old thresholds.
    extra = {k: v for k, v in head.extra.items() if k != OPERATING_POINT}
    if OPERATING_POINT in head.extra:
        metrics["recalibrated_from"]["dropped_operating_point"] = head.extra[OPERATING_POINT]
    write_checkpoint(new_head, metrics, Path(out), {**extra, "recalibrated": args})
    adapter = Path(head_dir) / "adapter"
    if adapter.is_dir() and Path(out) != Path(head_dir):
        shutil.copytree(adapter, Path(out) / "adapter", dirs_exist_ok=True)
    return metrics


def train_safety(args: dict, log=print) -> dict:
    """Entry point shared by the CLI and the tests (``args`` mirrors the CLI options)."""
    defaults = {"eval_data": None, "external_eval": None, "mode": "head", "lambda_cls": 0.1,
                "epochs": 30, "lr": None, "head_lr": 1e-3, "batch_size": 16,
                "head_batch_size": 4096, "max_length": 512, "layer": -1, "probe_layers": "",
                "tau": 3, "target_fpr": 0.05, "prompt_offset": True, "seed": 0, "weight_decay": 1e-3,
                "lora_r": 16, "lora_alpha": 32, "head_only": False, "cache_dir": None,
                "max_steps": 0, "taxonomy": None, "dtype": "float32", "lm_targets": "safe",
                "mlp_units": 0, "mlp_gate": False, "init_head": None,
                "keep_thresholds": False}
    args = {**defaults, **{k: v for k, v in args.items() if v is not None}}
    if args["lr"] is None:
        args["lr"] = 2e-3 if args["mode"] == "head" else 2e-4
    taxonomy = Taxonomy.load(args["taxonomy"]) if args["taxonomy"] else Taxonomy.load()
    if args["layer"] != -1:
        log(f"warning: layer {args['layer']} is for probing; the server serves layer -1 only "
            "and refuses to load this head")
    if args["lm_targets"] not in LM_TARGETS:
        raise ValueError(f"lm_targets must be one of {LM_TARGETS}, not {args['lm_targets']!r}")
    if (args["mlp_units"] or args["mlp_gate"] or args["init_head"]) and args["mode"] != "head":
        raise ValueError("--mlp-units, --mlp-gate and --init-head are for head mode; lora/full "
                         "train a linear head")
    if args["mlp_gate"] and not args["mlp_units"]:
        raise ValueError("--mlp-gate gates the MLP: give --mlp-units too")
    if args["keep_thresholds"] and not args["init_head"]:
        raise ValueError("--keep-thresholds keeps --init-head's operating point: give it")
    if args["mode"] == "head":
        return run_head_mode(args, taxonomy, log)
    if args["mode"] in ("lora", "full"):
        return run_adapter_mode(args, taxonomy, log)
    raise ValueError(f"mode must be head, lora or full, not {args['mode']!r}")


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def register(app) -> None:
    """Add ``safety``, ``probe-layers`` and the data builds (``build-safety-data``,
    ``build-hard-negatives``, ``build-question-data``, ``augment-split``) to the ``train``
    group."""
    import typer

    from safeserve.models import augment, hard_negatives, question_data, safety_data

    safety_data.register(app)
    hard_negatives.register(app)
    question_data.register(app)
    augment.register(app)

    def _model(model: Path | None) -> Path:
        if model is not None:
            return model
        from safeserve.models.model_store import ensure_default_model

        return ensure_default_model()

    @app.command("calibrate")
    def calibrate_cmd(
        head: Path = typer.Option(..., help="Checkpoint directory holding safety_head/ "
                                  "(and adapter/ for LoRA heads)."),
        model: Path = typer.Option(None, help="The LM the head reads: the merged model of a "
                                   "LoRA run, or the base model (default: embedded)."),
        eval_data: list[Path] = typer.Option(..., help="Held-out trajectories (repeatable); "
                                             "half calibrate, half are reported."),
        out: Path = typer.Option(..., help="Output directory (safety_head/, adapter/)."),
        target_fpr: float = typer.Option(..., help="Benign conversations flagged, at most."),
        tau: int = typer.Option(3, help="Consecutive unsafe response positions."),
        max_length: int = typer.Option(512, help="Tokens per conversation."),
        seed: int = typer.Option(0, help="Seed of the calibration / report split."),
    ) -> None:
        """Re-threshold a trained head at another benign budget (no retraining)."""
        metrics = recalibrate(_model(model), head, eval_data, out, target_fpr=target_fpr,
                              tau=tau, max_length=max_length, seed=seed, log=typer.echo)
        typer.echo(json.dumps(metrics["thresholded_on_test_half"]["conversation_level"],
                              indent=2))

    @app.command("operating-point")
    def operating_point_cmd(
        head: Path = typer.Option(..., help="Checkpoint directory holding safety_head/."),
        out: Path = typer.Option(..., help="Output directory (safety_head/, adapter/)."),
        prompt_shift: float = typer.Option(0.0, help="Logits added to the prompt-verdict "
                                           "thresholds (+ = flag fewer prompts)."),
        response_shift: float = typer.Option(0.0, help="Logits added to the response-rule "
                                             "thresholds."),
        tau: int = typer.Option(3, help="Consecutive violating steps for requests that do "
                                "not set tau."),
        alert_margin: float = typer.Option(None, help="Alert band: a prompt verdict within this "
                                           "many logits below its thresholds gets the "
                                           "shorter response run --alert-tau (0: no band; "
                                           "default: keep the head's own band)."),
        alert_tau: int = typer.Option(None, help="Consecutive violating steps after a prompt "
                                      "in the alert band."),
    ) -> None:
        """Move a head's operating point (chosen with `eval replay`) without retraining or
        data: exact logit shifts of the prompt verdict and the response rule."""
        from safeserve.models.operating_point import move_operating_point

        point = move_operating_point(head, out, prompt_shift=prompt_shift,
                                     response_shift=response_shift, tau=tau,
                                     alert_margin=alert_margin, alert_tau=alert_tau,
                                     log=typer.echo)
        typer.echo(json.dumps(point, indent=2))

    @app.command("safety")
    def safety_cmd(
        data: list[Path] = typer.Option(..., help="Training trajectories (.jsonl or .csv); "
                                        "repeat to add files (e.g. hard negatives)."),
        out: Path = typer.Option(..., help="Checkpoint directory to write."),
        eval_data: list[Path] = typer.Option(None, help="Held-out trajectories, repeatable; "
                                             "half of their prompt groups calibrate the "
                                             "thresholds (default: 20% of the prompt groups "
                                             "of --data)."),
        external_eval: Path = typer.Option(None, help="Prompt-only rows scored for the report "
                                           "only (never used for any choice)."),
        model: Path = typer.Option(None, help="Base model directory (default: the embedded "
                                   "SmolLM2-135M-Instruct)."),
        mode: str = typer.Option("head", help="head | lora | full."),
        lambda_cls: float = typer.Option(0.1, "--lambda", help="Weight of L_cls in "
                                         "L_lm + lambda * L_cls (lora/full)."),
        epochs: int = typer.Option(30, help="Epochs (head mode: over the cached positions)."),
        lr: float = typer.Option(None, help="Learning rate (head mode: the head's, default "
                                 "2e-3; lora/full: the LM's, default 2e-4)."),
        head_lr: float = typer.Option(1e-3, help="Head learning rate in lora/full mode."),
        batch_size: int = typer.Option(16, help="Conversations per forward batch."),
        head_batch_size: int = typer.Option(4096, help="Positions per step in head mode."),
        max_length: int = typer.Option(512, help="Tokens per conversation (longer responses "
                                       "are cut)."),
        layer: int = typer.Option(-1, help="Hidden state the head reads (-1 = final, "
                                  "the only one the server serves)."),
        probe_layers: str = typer.Option("", help="Head mode: also probe these layers, e.g. "
                                         "'10,15,20,25,30' (same forward pass)."),
        tau: int = typer.Option(3, help="Consecutive unsafe response positions that trigger "
                                "(the server's rule, for calibration and metrics)."),
        target_fpr: float = typer.Option(0.05, help="Benign conversations flagged, at most, "
                                         "when calibrating thresholds."),
        prompt_offset: bool = typer.Option(True, help="Fold separate prompt-verdict "
                                           "thresholds into the head along the prompt-end "
                                           "read-out (see the module docstring). Not "
                                           "the exact operating_point.prompt_logit_offset "
                                           "that `train operating-point` writes."),
        head_only: bool = typer.Option(False, help="Write only safety_head/ (no LM files)."),
        mlp_units: int = typer.Option(0, help="Head mode: hidden units of the residual MLP "
                                      "beside the linear head (0 = linear only)."),
        mlp_gate: bool = typer.Option(False, help="Gate the MLP off at prompt ends (by the "
                                      "prompt-end read-out): the prompt verdict stays linear."),
        init_head: Path = typer.Option(None, help="Keep this linear head's weights as the "
                                       "linear part (frozen); fit only the MLP."),
        keep_thresholds: bool = typer.Option(False, help="With --init-head: keep its "
                                             "thresholds and fold (no calibration)."),
        cache_dir: Path = typer.Option(None, help="Cache extracted features here."),
        lora_r: int = typer.Option(16, help="LoRA rank."),
        lora_alpha: int = typer.Option(32, help="LoRA alpha."),
        max_steps: int = typer.Option(0, help="Stop lora/full training after this many "
                                      "steps (0 = all epochs)."),
        lm_targets: str = typer.Option("safe", help="lora/full: tokens L_lm trains on. "
                                       "safe = benign answers and refusals; benign = only "
                                       "answers to benign prompts (self-distillation: the LM "
                                       "does not learn to refuse by itself)."),
        dtype: str = typer.Option("float32", help="LM weight dtype: float32 | bfloat16 "
                                  "(bfloat16 for 7-8B LoRA on GPUs)."),
        seed: int = typer.Option(0, help="Random seed."),
    ) -> None:
        """Train the explicit safety signal and write a safety checkpoint."""
        args = {k: v for k, v in locals().items() if k != "_model"}  # the CLI options
        from rich.console import Console

        con = Console()
        t0 = time.time()
        args["model"] = _model(model)
        metrics = train_safety(args, log=con.print)
        if metrics:
            from safeserve.models.taxonomy import Taxonomy as _T

            con.print(summary_table(metrics, list(_T.load().output_names)))
            con.print_json(data=metrics["thresholded_on_test_half"]["conversation_level"])
        con.print(f"wrote {out} in {time.time() - t0:.0f}s")

    @app.command("probe-layers")
    def probe_cmd(
        data: list[Path] = typer.Option(..., help="Training trajectories (repeatable)."),
        eval_data: list[Path] = typer.Option(None, help="Held-out trajectories (repeatable)."),
        external_eval: Path = typer.Option(None, help="Prompt-only rows (reported only)."),
        model: Path = typer.Option(None, help="Base model directory."),
        layers: str = typer.Option("10,15,20,25,30", help="Layers to probe (L = final)."),
        epochs: int = typer.Option(30, help="Head epochs per layer."),
        lr: float = typer.Option(2e-3, help="Head learning rate."),
        batch_size: int = typer.Option(16, help="Conversations per forward batch."),
        max_length: int = typer.Option(512, help="Tokens per conversation."),
        cache_dir: Path = typer.Option(None, help="Cache extracted features here."),
        out: Path = typer.Option(None, help="Write the table as JSON here."),
        seed: int = typer.Option(0, help="Random seed."),
    ) -> None:
        """Held-out AUROC of a head-only probe at several layers."""
        from rich.console import Console
        from rich.table import Table

        con = Console()
        tax = Taxonomy.load()
        ls = [int(x) for x in layers.split(",") if x.strip()]
        feats, _ = head_features(data, eval_data, external_eval, _model(model), tax, ls,
                                 max_length, batch_size, cache_dir, seed, con.print)
        rows = probe_layers(feats, ls, tax, epochs, lr, seed, con.print)
        t = Table(title="layer probe: held-out AUROC")
        for c in rows[0]:
            t.add_column(c)
        for r in rows:
            t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
        con.print(t)
        if out:
            Path(out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":  # for `accelerate launch -m safeserve.models.safety_train ...`
    import typer

    _app = typer.Typer()
    register(_app)
    _app()
