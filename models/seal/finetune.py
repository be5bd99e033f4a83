"""SFT on a SEAL-selected subset (``safeserve train seal-finetune``).

Keeps the top ``keep`` fraction of the fine-tuning rows by selector score (or a seeded random
fraction: the baseline), then fine-tunes with TRL's ``SFTTrainer`` on the conversational
prompt-completion form (loss on the answer only), with LoRA (r/alpha 16 on q/v by default) or
all weights. The output is a directory the server loads directly:

    <out>/config.json, model.safetensors, tokenizer files   (LoRA merged into the base)
    <out>/adapter/                                            (the LoRA adapter, LoRA mode)
    <out>/safety_head/                                        (copied, when one is found)
    <out>/seal_metrics.json, kept_ids.json

Safety head: taken from the base model directory when it has ``safety_head/``, else from the
project's default checkpoint (``models/default_checkpoint/``) when the base is the embedded
default model. The head is evaluated before and after fine-tuning (prompt-level AUROC, see
``probe.py``), so a fine-tune that erases the signal the head reads is visible in
``seal_metrics.json``.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from safeserve.models.seal.data import SealInputError, load_dataset
from safeserve.models.seal.selector import Selector, keep_count

METRICS_NAME = "seal_metrics.json"


@dataclass
class FinetuneConfig:
    ft_data: str
    model: str
    out: str
    selector: str | None = None
    keep: float = 0.8
    random_baseline: bool = False
    seed: int = 0
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 16
    lr: float | None = None  # default: 1e-4 with LoRA, 1e-5 full
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    probe_data: str | None = None
    check_head: bool = True


def choose_rows(cfg: FinetuneConfig, ids: list[str]) -> tuple[list[str], str]:
    """The kept sample ids, in data order, and the selection's name."""
    if not ids:
        raise SealInputError(f"no usable rows in {cfg.ft_data}: nothing to fine-tune on")
    k = keep_count(len(ids), cfg.keep)
    order = {sid: i for i, sid in enumerate(ids)}
    if cfg.random_baseline:
        return sorted(random.Random(cfg.seed).sample(ids, k), key=order.__getitem__), "random"
    if cfg.selector is None:
        if cfg.keep < 1.0:
            raise ValueError("--selector is required unless --random-baseline or --keep 1.0")
        return list(ids), "all"
    sel = Selector.load(cfg.selector)
    score = {sid: float(sel.omega[i]) for i, sid in enumerate(sel.ids)}
    missing = [s for s in ids if s not in score]
    if missing:
        raise SealInputError(f"{len(missing)} rows have no selector score (first: {missing[:3]}); "
                             "was the selector trained on this file?")
    ranked = sorted(ids, key=lambda s: (-score[s], order[s]))
    kept = set(ranked[:k])
    return [s for s in ids if s in kept], "seal" if cfg.keep < 1.0 else "all"


def head_source(base: Path) -> tuple[Path | None, str]:
    from safeserve.models.checkpoint import has_safety_head
    from safeserve.models.model_store import DEFAULT_HEAD_DIR, DEFAULT_MODEL_NAME, cache_dir

    if has_safety_head(base):
        return base, f"safety head from the base model ({base})"
    default_model = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if has_safety_head(DEFAULT_HEAD_DIR):
        if base.resolve() == default_model.resolve():
            return DEFAULT_HEAD_DIR, f"default safety head ({DEFAULT_HEAD_DIR})"
        return None, ("skipped the safety-head check: the base model has no safety_head/ and the "
                      "default head belongs to the embedded default model, not this one")
    return None, ("skipped the safety-head check: no safety_head/ in the base model and no "
                  f"default head at {DEFAULT_HEAD_DIR} yet")


def _sft(cfg: FinetuneConfig, model, tok, records: list[dict], out: Path, log):
    from datasets import Dataset as HFDataset
    from trl import SFTConfig, SFTTrainer

    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    lr = cfg.lr if cfg.lr is not None else (1e-4 if cfg.lora else 1e-5)
    use_gpu = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(out / ".trainer"), num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=0.0, max_length=cfg.max_length, completion_only_loss=True,
        # SFTConfig turns these on by default; on CPU they only cost time (bf16 has no fast path
        # on AVX2, checkpointing recomputes the forward for a 135M model that fits anyway).
        bf16=use_gpu and torch.cuda.is_bf16_supported(), gradient_checkpointing=False,
        logging_steps=max(1, len(records) // (cfg.batch_size * cfg.grad_accum * 5)),
        save_strategy="no", report_to="none", seed=cfg.seed, data_seed=cfg.seed,
        dataloader_num_workers=0, disable_tqdm=False,
    )
    ds = HFDataset.from_list(records)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=peft_config)
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    train = {"lr": lr, "epochs": cfg.epochs, "steps": trainer.state.global_step,
             "seconds": round(seconds, 2), "epoch_seconds": round(seconds / cfg.epochs, 2),
             "first_loss": losses[0] if losses else None,
             "last_loss": losses[-1] if losses else None,
             "train_loss": result.training_loss}
    return trainer, train


def check_out(cfg: FinetuneConfig) -> None:
    """``out`` must be neither the base model's directory nor inside it: saving there
    overwrites the weights being read, and replacing ``out/safety_head`` deletes the head
    that is to be copied."""
    model, target = Path(cfg.model).resolve(), Path(cfg.out).resolve()
    if target == model or model in target.parents:
        raise SealInputError(f"--out {cfg.out} is --model {cfg.model} or inside it: write the "
                             "fine-tune to another directory (it would overwrite the model it reads)")


def run_finetune(cfg: FinetuneConfig, log=print) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safeserve.models.checkpoint import HEAD_DIR, load_safety_head
    from safeserve.models.seal.probe import head_auroc

    check_out(cfg)
    base, out = Path(cfg.model), Path(cfg.out)
    tok = AutoTokenizer.from_pretrained(str(base))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    data = load_dataset(cfg.ft_data, tok, cfg.max_length)
    log(data.summary())
    if not data.samples:
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(data.dropped.items())) or "the file is empty"
        raise SealInputError(f"no usable rows in {cfg.ft_data} ({drops}); nothing to fine-tune on")
    kept_ids, selection = choose_rows(cfg, data.ids)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.selector and not cfg.random_baseline:
        sel_hash = Selector.load(cfg.selector).data_sha256
        if sel_hash and sel_hash != data.sha256:
            log("warning: the selector was trained on a different version of this file; "
                "rows are matched by id")
    kept = set(kept_ids)
    samples = [s for s in data.samples if s.id in kept]
    log(f"{selection}: keeping {len(samples)} of {len(data.samples)} rows")
    records = [{"prompt": s.prompt_messages,
                "completion": [{"role": "assistant", "content": s.response}]} for s in samples]

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    head_dir, head_msg = head_source(base) if cfg.check_head else (None, "check disabled")
    log(head_msg)
    head = load_safety_head(head_dir) if head_dir is not None else None
    head_before = head_auroc(model, tok, head, cfg.probe_data) if head is not None else None

    trainer, train = _sft(cfg, model, tok, records, out, log)
    final = trainer.model
    if cfg.lora:
        final.save_pretrained(str(out / "adapter"))
        final = final.merge_and_unload()
    final.eval()
    final.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    gen_cfg = base / "generation_config.json"
    if gen_cfg.is_file() and not (out / "generation_config.json").is_file():
        shutil.copy(gen_cfg, out / "generation_config.json")
    shutil.rmtree(out / ".trainer", ignore_errors=True)

    head_after = None
    # A head left in out by an earlier run belongs to another model: the server would load it
    # with this one. Replaced by the copied head, or removed when none is copied (but never
    # when out is the head's own folder: that would delete the source).
    if head_dir is None or Path(head_dir).resolve() != out.resolve():
        shutil.rmtree(out / HEAD_DIR, ignore_errors=True)
        if head is not None:
            shutil.copytree(Path(head_dir) / HEAD_DIR, out / HEAD_DIR)
    if head is not None:
        from safeserve.models.head_check import drop_self_check

        drop_self_check(out)  # its record is the base model's: unverified on the fine-tune
        head_after = head_auroc(final, tok, head, cfg.probe_data)

    by_source = Counter(s.source or "unlabelled" for s in samples)
    all_source = Counter(s.source or "unlabelled" for s in data.samples)
    metrics = {
        "selection": selection, "keep": cfg.keep, "n_rows": len(data.samples),
        "n_kept": len(samples), "kept_by_source": dict(by_source),
        "rows_by_source": dict(all_source), "dropped_rows": dict(data.dropped),
        "data_sha256": data.sha256, "config": asdict(cfg), "train": train,
        "safety_head": {"source": str(head_dir) if head_dir else None, "note": head_msg,
                        "before": head_before, "after": head_after,
                        "probe": cfg.probe_data or "built-in (16 harmful + 16 benign)"},
    }
    (out / METRICS_NAME).write_text(json.dumps(metrics, indent=2))
    (out / "kept_ids.json").write_text(json.dumps(kept_ids))
    if head_before and head_after:
        fmt = lambda v: "n/a (one class in the probe)" if v is None else f"{v:.3f}"  # noqa: E731
        log(f"safety head AUROC before {fmt(head_before['auroc'])} after "
            f"{fmt(head_after['auroc'])}")
    log(f"checkpoint written to {out}")
    return metrics
