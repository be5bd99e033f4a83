r"""The SEAL data selector: one logit per fine-tuning sample, and its exact gradient.

Notation. N fine-tuning samples with per-sample losses l_i(theta) (NLL averaged over the
sample's response tokens), selector logits omega in R^N (initialised to a constant, so all
weights start at 1), sigma = softmax(omega), weights w = N * sigma.

Bilevel problem (upper: safety; lower: the selected fine-tuning loss)::

    min_omega  f(theta*(omega))      f(theta)        = loss on the SAFE set
    s.t.       theta*(omega) = argmin_theta g(theta, omega),
                                      g(theta, omega) = sum_i sigma_i(omega) l_i(theta)

Penalty reformulation, with g*(omega) = min_theta g(theta, omega)::

    min_{theta, omega}  F = (1 - gamma) f(theta) + gamma (g(theta, omega) - g*(omega))

gamma starts at 0 and grows by ``gamma_step`` each epoch (epoch e uses gamma_0 + e*step).

Model gradient. grad_theta F = (1-gamma) grad f + gamma sum_i sigma_i grad l_i. For a
minibatch B of b fine-tuning rows drawn uniformly, (N/b) sum_{j in B} sigma_j l_j
= (1/b) sum_{j in B} w_j l_j is unbiased for g, so the model step minimises
(1-gamma) mean_safe(l) + gamma mean_{j in B}(w_j l_j) with w held fixed.

Selector gradient. By the envelope (Danskin) theorem,
grad_omega g*(omega) = sum_i l_i(theta*) grad_omega sigma_i, hence::

    grad_omega F = gamma sum_i d_i grad_omega sigma_i,
    d_i = l_i(theta) - l_i(theta*)      Algorithm 1 (theta* tracked by an auxiliary model
                                        that takes one step on g per step)
    d_i = l_i(theta)                    Algorithm 2 (memory-efficient: the g* term dropped)

The softmax Jacobian is d sigma_i / d omega_k = sigma_i (delta_ik - sigma_k), so::

    dF/d omega_k = gamma sigma_k (d_k - sum_i sigma_i d_i).

Replacing sum_i by (N/b) sum_{j in B} gives the unbiased minibatch estimate used here::

    G_k = (gamma / b) [ w_k d_k [k in B]  -  sigma_k sum_{j in B} w_j d_j ].

The first term touches only the rows in the batch; the second is one scalar times sigma (the
softmax couples every logit). Forming G is O(N) time and memory; the selector's state is
omega plus the optimiser's moments: O(N) floats, independent of the model size.

Data parallel: each rank computes (row, w_j d_j) for its own rows; the pairs are gathered so
every rank forms the same G for the global batch and applies the same update, keeping the
replicated omega identical (checked before saving). Gathering pairs costs O(global batch),
not O(N), per step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "seal-selector/1"
JSON_NAME = "selector.json"
TENSORS_NAME = "selector.safetensors"
HIST_NAME = "selector_hist.png"


def selector_gradient(omega: torch.Tensor, rows: torch.Tensor, d: torch.Tensor,
                      gamma: float) -> torch.Tensor:
    """G (module docstring) for a batch of row indices ``rows`` with per-row values ``d``."""
    sigma = torch.softmax(omega.detach().float(), dim=0)
    n, b = omega.numel(), rows.numel()
    if b == 0 or gamma == 0.0:
        return torch.zeros_like(sigma)
    wd = n * sigma[rows] * d.detach().float()
    grad = -sigma * wd.sum()
    grad.index_add_(0, rows, wd)
    return grad * (gamma / b)


@dataclass
class Selector:
    ids: list[str]
    omega: torch.Tensor  # [N] float32
    data_sha256: str = ""
    config: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # epochs_done, history, timings
    optim_state: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: list[str | None] | None = None

    @classmethod
    def new(cls, ids: list[str], init: float = 0.0, **kw) -> "Selector":
        if len(set(ids)) != len(ids):
            raise ValueError("selector sample ids must be unique")
        return cls(list(ids), torch.full((len(ids),), float(init)), **kw)

    @property
    def n(self) -> int:
        return len(self.ids)

    def sigma(self) -> torch.Tensor:
        return torch.softmax(self.omega.float(), dim=0)

    def weights(self) -> torch.Tensor:
        return self.n * self.sigma()

    def ranking(self) -> list[int]:
        """Row positions from highest to lowest score; ties keep file order."""
        return torch.argsort(-self.omega, stable=True).tolist()

    def top_ids(self, keep: float) -> list[str]:
        return [self.ids[i] for i in self.ranking()[:keep_count(self.n, keep)]]

    # ---- files -----------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        w = self.weights()
        rank_of = {pos: r for r, pos in enumerate(self.ranking())}
        doc = {
            "format": FORMAT,
            "data_sha256": self.data_sha256,
            "n": self.n,
            "config": self.config,
            "state": self.state,
            "samples": [
                {"id": sid, "omega": float(self.omega[i]), "weight": float(w[i]),
                 "rank": rank_of[i], **({"source": self.sources[i]}
                                         if self.sources and self.sources[i] else {})}
                for i, sid in enumerate(self.ids)
            ],
        }
        tmp = out / (JSON_NAME + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out / JSON_NAME)
        tensors = {"omega": self.omega.float().contiguous()}
        tensors.update({f"optim.{k}": v.float().contiguous() for k, v in self.optim_state.items()})
        save_file(tensors, str(out / TENSORS_NAME),
                  metadata={"format": FORMAT, "data_sha256": self.data_sha256})
        return out / JSON_NAME

    @classmethod
    def load(cls, path: str | Path) -> "Selector":
        """From ``selector.json`` (or its directory); omega and optimiser moments are read from
        ``selector.safetensors`` beside it when present (exact), else from the JSON."""
        path = Path(path)
        if path.is_dir():
            path = path / JSON_NAME
        if path.suffix == ".safetensors":
            path = path.with_name(JSON_NAME)
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path}: not a SEAL selector (format {doc.get('format')!r})")
        samples = doc["samples"]
        ids = [s["id"] for s in samples]
        omega = torch.tensor([s["omega"] for s in samples], dtype=torch.float32)
        optim: dict[str, torch.Tensor] = {}
        tfile = path.with_name(TENSORS_NAME)
        if tfile.is_file():
            t = load_file(str(tfile))
            omega = t["omega"]
            optim = {k[len("optim."):]: v for k, v in t.items() if k.startswith("optim.")}
        sources = [s.get("source") for s in samples]
        return cls(ids, omega, doc.get("data_sha256", ""), doc.get("config", {}),
                   doc.get("state", {}), optim, sources if any(sources) else None)


def keep_count(n: int, keep: float) -> int:
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    # At least one row of a non-empty set; none of an empty one (callers reject that first).
    return min(n, max(1, int(round(keep * n))))


SELECTOR_OPTIMS = ("adam", "sgd")


class SelectorOptimizer:
    """Adam (the paper's choice) or plain SGD over omega, with state that round-trips through
    ``Selector.optim_state`` so a resumed run continues exactly."""

    def __init__(self, selector: Selector, lr: float, kind: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.selector = selector
        self.param = torch.nn.Parameter(selector.omega.detach().clone().float())
        if kind == "adam":
            self.opt = torch.optim.Adam([self.param], lr=lr, betas=betas, eps=eps)
        elif kind == "sgd":
            self.opt = torch.optim.SGD([self.param], lr=lr)
        else:
            raise ValueError(f"unknown selector optimiser {kind!r}")
        self.kind = kind
        if selector.optim_state and kind == "adam":
            st = selector.optim_state
            self.opt.state[self.param] = {
                "step": st["step"].reshape(()).clone(),
                "exp_avg": st["exp_avg"].clone(),
                "exp_avg_sq": st["exp_avg_sq"].clone(),
            }

    def step(self, grad: torch.Tensor) -> None:
        self.param.grad = grad.to(self.param.dtype)
        self.opt.step()
        self.selector.omega = self.param.detach().clone()

    @property
    def last_grad(self) -> torch.Tensor | None:
        return self.param.grad

    def export_state(self) -> None:
        st = self.opt.state.get(self.param)
        if self.kind == "adam" and st:
            self.selector.optim_state = {
                "step": torch.as_tensor(st["step"], dtype=torch.float32).reshape(1),
                "exp_avg": st["exp_avg"].detach().clone(),
                "exp_avg_sq": st["exp_avg_sq"].detach().clone(),
            }
        self.selector.omega = self.param.detach().clone()


def plot_histogram(selector: Selector, path: str | Path, keep: float | None = None,
                   title: str = "SEAL selector scores") -> Path:
    """Histogram of omega, one colour per ``source`` when the data has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    omega = selector.omega.float().numpy()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    groups: dict[str, list[float]] = {}
    for i, v in enumerate(omega):
        src = (selector.sources[i] if selector.sources else None) or "all"
        groups.setdefault(src, []).append(float(v))
    lo, hi = float(omega.min()), float(omega.max())
    bins = 40 if hi > lo else 1
    for name, vals in sorted(groups.items()):
        ax.hist(vals, bins=bins, range=(lo, hi if hi > lo else lo + 1e-6), alpha=0.6,
                label=f"{name} ({len(vals)})")
    if keep is not None and selector.n:
        cut = sorted(omega, reverse=True)[keep_count(selector.n, keep) - 1]
        ax.axvline(cut, color="black", linestyle="--", label=f"top {keep:.0%} cut")
    ax.set_xlabel("selector logit omega (higher = kept first)")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
