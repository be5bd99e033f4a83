"""Fitting the safety head on cached features: the classification loss of the explicit
signal (class-balanced BCE, prompt ends and response tokens averaged apart) and the head-only
fit of the linear read-out and the optional gated residual MLP. The head's math itself is
``safeserve.kernels.safety_head`` (one place, shared with the server).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from safeserve.kernels.safety_head import head_logits
from safeserve.models.checkpoint import load_safety_head
from safeserve.models.safety_data import MASK_PROMPT, MASK_RESPONSE
from safeserve.models.safety_features import Features


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


# The gate is clamp(1 - GATE_SHARPNESS * read-out, 0, 1): fully closed from a read-out of
# 1 / GATE_SHARPNESS up. Prompt ends read ~0.95, not 1, and an MLP that never had to fit them
# can be large there, so a gate of 1 - read-out would leak it into the prompt verdict.
GATE_SHARPNESS = 2.0


def prompt_end_gate(feats: Features, layer: int = -1) -> tuple[torch.Tensor, float]:
    v, c = prompt_end_direction(feats.hidden[layer], feats.kind)
    return v * GATE_SHARPNESS, c * GATE_SHARPNESS


def frozen_linear(init_head) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The linear part of an existing linear head, kept as it is (``--init-head``)."""
    if not init_head:
        return None
    head = load_safety_head(init_head)
    if head.mlp is not None:
        raise ValueError(f"--init-head {init_head} has an MLP; give a linear head")
    if head.prompt is not None or head.attribution is not None:  # the fit would drop them
        raise ValueError(f"--init-head {init_head} has a separate prompt or attribution "
                         "read-out; give the head it was fitted for")
    return head.weight, head.bias
