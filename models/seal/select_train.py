"""SEAL selector training (``safeserve train seal-select``): the penalty-based bilevel loop.

Each step pairs one safe batch with one fine-tuning batch (the safe set is cycled). The model
(LoRA on q/v) takes one Adam step on (1-gamma)*safe_loss + gamma*mean(w_j * l_j); then the
selector takes one step with the gradient of ``selector.selector_gradient`` (derivation in
``selector.py``). Algorithm 2 uses d_j = l_j(theta); Algorithm 1 also trains an auxiliary LoRA
model on the weighted fine-tuning loss alone and uses d_j = l_j(theta) - l_j(theta_aux).

By default the selector's d_j are the losses from the model step's own forward pass (the model
before its step: one forward-backward per batch). ``fresh_losses`` re-evaluates them after the
model step (one more forward per step), the strict model-then-selector order.

The loop runs under ``accelerate.Accelerator``; see ``deploy/accelerate/multi_gpu.yaml`` and the
README section in ``models/seal/__init__.py`` for data-parallel launches. Every rank walks the
same seeded global batch order and takes its own contiguous slice of each batch; the selector
update is formed from the gathered (row, w_j*d_j) pairs of the whole global batch.

After every epoch the run writes ``selector.json``/``selector.safetensors`` and
``train_state.pt`` (LoRA weights and optimiser moments), so ``--resume <out>/selector.json``
continues exactly where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from safeserve.models.seal.data import (IGNORE, Dataset, SealInputError, collate, file_sha256,
                                       load_dataset)
from safeserve.models.seal.selector import (HIST_NAME, SELECTOR_OPTIMS, Selector,
                                            SelectorOptimizer, plot_histogram, selector_gradient)

TRAIN_STATE = "train_state.pt"
DTYPES = ("float32", "bfloat16", "float16")


# The settings a saved training state (LoRA weights, optimizer, schedule) depends on: resuming
# it under other values would not continue the run it came from.
_STATE_SETTINGS = ("model", "safe_sha256", "algorithm", "gamma_init", "gamma_step", "lr",
                   "selector_lr", "selector_optim", "batch_size", "lora_r", "lora_alpha",
                   "lora_targets", "max_length", "seed", "fresh_losses", "dtype", "world_size")


@dataclass
class SelectConfig:
    ft_data: str
    safe_data: str
    model: str
    out: str
    algorithm: int = 2
    epochs: int = 3
    gamma_init: float = 0.0
    gamma_step: float = 0.025
    lr: float = 1e-5
    selector_lr: float = 5e-3
    selector_optim: str = "adam"
    omega_init: float = 0.0
    batch_size: int = 64
    micro_batch_size: int = 0  # 0 = the whole local batch in one forward
    lora_r: int = 16
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    max_length: int = 512
    seed: int = 0
    fresh_losses: bool = False
    resume: str | None = None
    keep_preview: float = 0.8  # only for the histogram's cut line
    dtype: str = "float32"


class PerSampleNLL(torch.nn.Module):
    """Wraps a causal LM: forward returns each row's NLL averaged over its response tokens.

    The LM head runs only at positions that predict a response token (prompt positions need
    no logits), which saves the vocabulary projection on the prompt."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def _base(self):
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def forward(self, input_ids, attention_mask, labels):
        base = self._base()
        hidden = base.get_decoder()(input_ids=input_ids,
                                    attention_mask=attention_mask).last_hidden_state
        target = labels[:, 1:]
        mask = target != IGNORE
        logits = base.get_output_embeddings()(hidden[:, :-1][mask]).float()
        nll = F.cross_entropy(logits, target[mask], reduction="none")
        rows = mask.nonzero()[:, 0]
        sums = torch.zeros(input_ids.shape[0], device=nll.device, dtype=nll.dtype)
        sums = sums.index_add(0, rows, nll)
        return sums / mask.sum(1).clamp(min=1)


def check_config(cfg: SelectConfig) -> None:
    """Choices that would otherwise fail only after the model and data are loaded."""
    if cfg.dtype not in DTYPES:
        raise SealInputError(f"dtype must be one of {', '.join(DTYPES)}, not {cfg.dtype!r}")
    if cfg.selector_optim not in SELECTOR_OPTIMS:
        raise SealInputError(f"selector optimiser must be one of {', '.join(SELECTOR_OPTIMS)}, "
                             f"not {cfg.selector_optim!r}")
    if cfg.algorithm not in (1, 2):
        raise SealInputError("algorithm must be 1 or 2")
    if gamma_at(cfg, cfg.epochs - 1) <= 0.0:
        # the selector steps only where gamma > 0: it would stay uniform, and a "SEAL" top
        # fraction of uniform scores is the file's first rows
        raise SealInputError(f"gamma is 0 in every epoch (gamma init {cfg.gamma_init:g}, step "
                             f"{cfg.gamma_step:g}, {cfg.epochs} epochs): the selector would "
                             "never learn; raise --epochs, --gamma-init or --gamma-step")


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_lm(model_dir: str | Path, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    return lm, tok


def add_lora(lm, cfg: SelectConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
    return get_peft_model(lm, lora)


def gamma_at(cfg: SelectConfig, epoch: int) -> float:
    return min(1.0, cfg.gamma_init + epoch * cfg.gamma_step)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, world: int) -> list[torch.Tensor]:
    """The epoch's global batches of row positions (same on every rank). A last batch smaller
    than the number of ranks is folded into the one before, so no rank gets an empty slice."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    batches = list(torch.split(perm, batch_size))
    if len(batches) > 1 and len(batches[-1]) < world:
        batches[-2] = torch.cat([batches[-2], batches.pop()])
    return batches


def safe_batches(n_safe: int, sizes: list[int], seed: int, epoch: int) -> list[torch.Tensor]:
    """One safe batch per step, cycling through a seeded permutation of the safe set."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_777_777)
    order = torch.randperm(n_safe, generator=g)
    out, pos = [], 0
    for size in sizes:
        size = min(size, n_safe)
        idx = torch.arange(pos, pos + size) % n_safe
        out.append(order[idx])
        pos = (pos + size) % n_safe
    return out


def local_slice(rows: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    return torch.tensor_split(rows, world)[rank]


def _micro(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(torch.split(rows, size)) if size and size < len(rows) else [rows]


def _paired_micro(a: torch.Tensor, b: torch.Tensor, size: int) -> list[tuple]:
    """Split two row lists into the same number of micro-batches (either may be empty)."""
    longest = max(len(a), len(b))
    k = -(-longest // size) if size and longest > size else 1
    return list(zip(torch.tensor_split(a, k), torch.tensor_split(b, k)))


class SealTrainer:
    """Holds the model(s), the selector and their optimisers; ``run`` trains to the end."""

    def __init__(self, cfg: SelectConfig, log=print):
        from accelerate import Accelerator

        self.cfg, self.log = cfg, log
        check_config(cfg)
        self.acc = Accelerator()
        torch.manual_seed(cfg.seed)
        # the data first (it needs only the tokenizer): a bad file fails before the model loads
        self.tok = load_tokenizer(cfg.model)
        self.ft: Dataset = load_dataset(cfg.ft_data, self.tok, cfg.max_length)
        self.safe: Dataset = load_dataset(cfg.safe_data, self.tok, cfg.max_length)
        if self.acc.is_main_process:
            log(f"fine-tuning data  {self.ft.summary()}")
            log(f"safe data         {self.safe.summary()}")
        if not self.ft.samples or not self.safe.samples:
            raise SealInputError("no usable rows in the fine-tuning or safe data (see the counts "
                                 "above)")
        lm, self.tok = load_lm(cfg.model, cfg.dtype)
        self.pad = self.tok.pad_token_id

        aux_lm = None
        if cfg.algorithm == 1:
            import copy

            aux_lm = copy.deepcopy(lm)
        elif cfg.algorithm != 2:
            raise ValueError("algorithm must be 1 or 2")
        self.model = PerSampleNLL(add_lora(lm, cfg))
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad],
                                    lr=cfg.lr)
        self.aux = self.aux_opt = None
        if aux_lm is not None:
            self.aux = PerSampleNLL(add_lora(aux_lm, cfg))
            self.aux_opt = torch.optim.Adam([p for p in self.aux.parameters() if p.requires_grad],
                                            lr=cfg.lr)

        self.selector = self._init_selector()
        self.sel_opt = SelectorOptimizer(self.selector, cfg.selector_lr, cfg.selector_optim)
        if self.aux is not None:
            self.model, self.opt, self.aux, self.aux_opt = self.acc.prepare(
                self.model, self.opt, self.aux, self.aux_opt)
        else:
            self.model, self.opt = self.acc.prepare(self.model, self.opt)

    # ---- setup ---------------------------------------------------------------------------

    def _init_selector(self) -> Selector:
        cfg = self.cfg
        sources = [s.source for s in self.ft.samples]
        meta = dict(data_sha256=self.ft.sha256, config=self._config_doc(),
                    sources=sources if any(sources) else None)
        if not cfg.resume:
            return Selector.new(self.ft.ids, cfg.omega_init,
                                state={"epochs_done": 0, "history": []}, **meta)
        old = Selector.load(cfg.resume)
        if old.data_sha256 and old.data_sha256 != self.ft.sha256 and self.acc.is_main_process:
            self.log(f"warning: {cfg.resume} was trained on a different file "
                     f"(sha256 {old.data_sha256[:12]} vs {self.ft.sha256[:12]}); matching rows by id")
        pos = {sid: i for i, sid in enumerate(old.ids)}
        omega = torch.tensor([float(old.omega[pos[s]]) if s in pos else cfg.omega_init
                              for s in self.ft.ids])
        same_rows = old.ids == self.ft.ids
        sel = Selector(self.ft.ids, omega, state=dict(old.state),
                       optim_state=old.optim_state if same_rows else {}, **meta)
        sel.state.setdefault("history", [])
        state_file = Path(cfg.resume).parent / TRAIN_STATE if Path(cfg.resume).is_file() \
            else Path(cfg.resume) / TRAIN_STATE
        self._resume_state = state_file if state_file.is_file() and same_rows else None
        if self._resume_state is not None:
            changed = {k: (old.config.get(k), v) for k, v in meta["config"].items()
                       if k in _STATE_SETTINGS and k in old.config and old.config[k] != v}
            if changed:  # its LoRA and optimizer state belong to another run: not "exactly"
                raise SealInputError(
                    f"--resume {cfg.resume}: its training state was made with other settings ("
                    + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
                    + f"); use the same ones, or remove {state_file} to warm-start the selector only")
        if self._resume_state is None:
            sel.state["epochs_done"] = 0  # selector-only warm start: the model starts afresh
            if self.acc.is_main_process:
                self.log("resume: no matching train_state.pt; warm-starting the selector only")
        return sel

    def _config_doc(self) -> dict:
        d = asdict(self.cfg)
        d["safe_sha256"] = self.safe.sha256 if hasattr(self, "safe") else file_sha256(self.cfg.safe_data)
        d["world_size"] = self.acc.num_processes
        return d

    def _load_train_state(self) -> None:
        from peft import set_peft_model_state_dict

        st = torch.load(self._resume_state, map_location="cpu", weights_only=False)
        set_peft_model_state_dict(self.acc.unwrap_model(self.model).lm, st["lora"])
        self.opt.load_state_dict(st["opt"])
        if self.aux is not None and "aux_lora" in st:
            set_peft_model_state_dict(self.acc.unwrap_model(self.aux).lm, st["aux_lora"])
            self.aux_opt.load_state_dict(st["aux_opt"])

    # ---- one step ------------------------------------------------------------------------

    def _batch(self, data: Dataset, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        b = collate([data.samples[i] for i in rows.tolist()], self.pad)
        return {k: v.to(self.acc.device) for k, v in b.items()}

    def _train_step(self, module, opt, safe_rows, ft_rows, gamma, w_all, n_safe_g, n_ft_g):
        """One optimiser step of ``module`` on (1-gamma)*safe + gamma*weighted ft.
        Returns the per-row ft NLL (before the step) and the summed safe loss."""
        world = self.acc.num_processes
        ft_nll = torch.zeros(len(ft_rows))
        safe_sum = 0.0
        pairs = _paired_micro(safe_rows, ft_rows, self.cfg.micro_batch_size)
        opt.zero_grad(set_to_none=True)
        done = 0
        for k, (s_rows, f_rows) in enumerate(pairs):
            parts = [self.safe.samples[i] for i in s_rows.tolist()] + \
                    [self.ft.samples[i] for i in f_rows.tolist()]
            batch = {key: v.to(self.acc.device) for key, v in collate(parts, self.pad).items()}
            with self.acc.no_sync(module) if k < len(pairs) - 1 else _nullctx():
                nll = module(**batch)
                ns = len(s_rows)
                # Ranks average gradients, so scale local sums by world / global counts.
                loss = nll.new_zeros(())
                if ns and gamma < 1.0:
                    loss = loss + (1 - gamma) * nll[:ns].sum() * world / n_safe_g
                if len(f_rows) and gamma > 0.0:
                    w = w_all[f_rows].to(nll.device)
                    loss = loss + gamma * (w * nll[ns:]).sum() * world / n_ft_g
                self.acc.backward(loss)
            ft_nll[done:done + len(f_rows)] = nll[ns:].detach().float().cpu()
            safe_sum += float(nll[:ns].detach().sum())
            done += len(f_rows)
        opt.step()
        return ft_nll, safe_sum

    @torch.no_grad()
    def _eval_nll(self, module, rows: torch.Tensor) -> torch.Tensor:
        out = []
        for r in _micro(rows, self.cfg.micro_batch_size):
            out.append(module(**self._batch(self.ft, r)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _gather_pairs(self, rows: torch.Tensor, values: torch.Tensor):
        if self.acc.num_processes == 1:
            return rows, values
        t = torch.stack([rows.double(), values.double()], 1).to(self.acc.device)
        t = self.acc.pad_across_processes(t, dim=0, pad_index=-1)
        t = self.acc.gather(t).cpu()
        t = t[t[:, 0] >= 0]
        return t[:, 0].long(), t[:, 1].float()

    # ---- loop ----------------------------------------------------------------------------

    def run(self) -> Selector:
        cfg, acc = self.cfg, self.acc
        world, rank = acc.num_processes, acc.process_index
        if getattr(self, "_resume_state", None) is not None:
            self._load_train_state()
        start = int(self.selector.state.get("epochs_done", 0))
        n = self.selector.n
        for epoch in range(start, cfg.epochs):
            gamma = gamma_at(cfg, epoch)
            batches = epoch_batches(n, cfg.batch_size, cfg.seed, epoch, world)
            safes = safe_batches(len(self.safe.samples), [len(b) for b in batches], cfg.seed, epoch)
            t0 = time.perf_counter()
            sums = {"safe": 0.0, "ft": 0.0, "n_safe": 0, "n_ft": 0}
            bar = tqdm(zip(batches, safes), total=len(batches), disable=not acc.is_main_process,
                       desc=f"seal epoch {epoch + 1}/{cfg.epochs} gamma={gamma:.3f}", unit="step")
            for ft_g, safe_g in bar:
                w_all = self.selector.weights()
                ft_l, safe_l = local_slice(ft_g, world, rank), local_slice(safe_g, world, rank)
                # At gamma == 0 the model ignores the fine-tuning rows and the selector gradient
                # is zero (Algorithm 2), so their forward pass is skipped.
                ft_in = ft_l if gamma > 0.0 else ft_l[:0]
                ft_nll, safe_sum = self._train_step(self.model, self.opt, safe_l, ft_in, gamma,
                                                    w_all, len(safe_g), len(ft_g))
                if self.aux is not None:
                    aux_nll, _ = self._train_step(self.aux, self.aux_opt, safe_l[:0], ft_l, 1.0,
                                                  w_all, 1, len(ft_g))
                if cfg.fresh_losses and gamma > 0.0:
                    ft_nll = self._eval_nll(self.model, ft_l)
                    if self.aux is not None:
                        aux_nll = self._eval_nll(self.aux, ft_l)
                if gamma > 0.0:
                    d = ft_nll - aux_nll if self.aux is not None else ft_nll
                    rows, vals = self._gather_pairs(ft_l, d)
                    self.sel_opt.step(selector_gradient(self.sel_opt.param, rows, vals, gamma))
                    sums["ft"] += float((w_all[ft_l] * ft_nll).sum())
                    sums["n_ft"] += len(ft_l)
                sums["safe"] += safe_sum
                sums["n_safe"] += len(safe_l)
                bar.set_postfix(safe=f"{sums['safe'] / max(1, sums['n_safe']):.3f}",
                                ft=f"{sums['ft'] / max(1, sums['n_ft']):.3f}")
            elapsed = time.perf_counter() - t0
            self.selector.state["epochs_done"] = epoch + 1
            self.selector.state["history"].append({
                "epoch": epoch + 1, "gamma": gamma, "seconds": round(elapsed, 2),
                "safe_loss": sums["safe"] / max(1, sums["n_safe"]),
                "weighted_ft_loss": sums["ft"] / max(1, sums["n_ft"]) if sums["n_ft"] else None,
                "steps": len(batches)})
            self.save()
        if start >= cfg.epochs:
            self.save()
        return self.selector

    # ---- files ---------------------------------------------------------------------------

    def _synced_omega(self) -> torch.Tensor:
        omega = self.sel_opt.param.detach().clone()
        if self.acc.num_processes == 1:
            return omega
        local = omega.to(self.acc.device)
        mean = self.acc.reduce(local.clone(), reduction="mean")
        dev = self.acc.gather((local - mean).abs().max().reshape(1)).max().item()
        if dev > 1e-4:
            raise RuntimeError(f"selector logits diverged across ranks (max deviation {dev:.2e})")
        return mean.cpu()

    def save(self) -> None:
        from peft import get_peft_model_state_dict

        omega = self._synced_omega()
        self.sel_opt.export_state()
        self.selector.omega = omega
        self.selector.config = self._config_doc()
        if not self.acc.is_main_process:
            self.acc.wait_for_everyone()
            return
        out = Path(self.cfg.out)
        self.selector.save(out)
        state = {"lora": get_peft_model_state_dict(self.acc.unwrap_model(self.model).lm),
                 "opt": self.opt.state_dict()}
        if self.aux is not None:
            state["aux_lora"] = get_peft_model_state_dict(self.acc.unwrap_model(self.aux).lm)
            state["aux_opt"] = self.aux_opt.state_dict()
        torch.save(state, out / (TRAIN_STATE + ".tmp"))
        (out / (TRAIN_STATE + ".tmp")).replace(out / TRAIN_STATE)
        plot_histogram(self.selector, out / HIST_NAME, keep=self.cfg.keep_preview)
        self.acc.wait_for_everyone()


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_select(cfg: SelectConfig, log=print) -> Selector:
    trainer = SealTrainer(cfg, log)
    sel = trainer.run()
    if trainer.acc.is_main_process:
        log(f"selector saved to {Path(cfg.out) / 'selector.json'}")
    return sel
