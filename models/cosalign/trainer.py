"""SFT on the chosen responses, then DPO on the preference pairs (TRL), optionally through a
LoRA adapter (PEFT) that is merged before saving, so every stage ends as a full HF model
directory the server can load.

Multi-GPU: build the data once (one process; vLLM uses the GPU), then train under accelerate:

    safeserve train cosalign --stage data --prompts P.jsonl --head-checkpoint H --out OUT
    accelerate launch --num_processes 8 -m safeserve.models.cosalign.cli --stage train --out OUT

(``--stage train`` reads OUT/cosalign/{sft,pairs}.jsonl and trains the base model named in
OUT/cosalign/recipe.json, the one that sampled the candidates; a different ``--model`` is an
error. Only the main process writes files.)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from safeserve.models.checkpoint import HEAD_DIR


@dataclass
class TrainOptions:
    sft_epochs: float = 1.0
    sft_lr: float = 1e-5
    dpo_epochs: float = 1.0
    dpo_beta: float = 0.1
    dpo_lr: float = 5e-7
    optim: str = "rmsprop"
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    max_steps: int = -1  # > 0 caps each stage (smoke runs and tests)
    seed: int = 0
    # The weights' dtype while training (and the saved model's). float32 on CPU (bf16 ran ~3x
    # slower here); bfloat16 on GPUs, where a float32 7-8B model and DPO's reference copy
    # would not fit.
    dtype: str = "float32"


def _lora_config(opts: TrainOptions):
    from peft import LoraConfig

    return LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def _common_args(opts: TrainOptions, out: Path, epochs: float, lr: float, optim: str) -> dict:
    return dict(output_dir=str(out), num_train_epochs=epochs, learning_rate=lr, optim=optim,
                per_device_train_batch_size=opts.batch_size,
                gradient_accumulation_steps=opts.grad_accum, max_steps=opts.max_steps,
                max_length=opts.max_length, logging_steps=1, save_strategy="no",
                report_to="none", seed=opts.seed, lr_scheduler_type="constant",
                warmup_steps=0, bf16=opts.dtype == "bfloat16", fp16=False,
                dataloader_pin_memory=torch.cuda.is_available())


def _save_merged(trainer, tokenizer, out: Path) -> None:
    """Write the trained model as a full HF dir (LoRA merged into the weights)."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(model)
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    trainer.accelerator.wait_for_everyone()


def _train_and_save(trainer, tokenizer, out: Path) -> dict:
    """Train, save the merged model to ``out``, drop the trainer's scratch directory."""
    result = trainer.train()
    _save_merged(trainer, tokenizer, out)
    shutil.rmtree(out / "_trainer", ignore_errors=True)
    return {"steps": result.global_step, "loss": result.training_loss}


def run_sft(model_dir: Path, rows: list[dict], out: Path, opts: TrainOptions) -> dict:
    """rows: {prompt: [messages], completion: [assistant message]}."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    args = SFTConfig(**_common_args(opts, out / "_trainer", opts.sft_epochs, opts.sft_lr, "adamw_torch"),
                     completion_only_loss=True, model_init_kwargs={"dtype": opts.dtype})
    trainer = SFTTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=_lora_config(opts) if opts.lora else None)
    return _train_and_save(trainer, tok, out)


def run_dpo(model_dir: Path, rows: list[dict], out: Path, opts: TrainOptions) -> dict:
    """rows: {prompt: [messages], chosen: [assistant message], rejected: [assistant message]}.
    The reference model is ``model_dir`` itself (with LoRA: the adapter switched off)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    args = DPOConfig(**_common_args(opts, out / "_trainer", opts.dpo_epochs, opts.dpo_lr, opts.optim),
                     beta=opts.dpo_beta, model_init_kwargs={"dtype": opts.dtype})
    trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=_lora_config(opts) if opts.lora else None)
    return _train_and_save(trainer, tok, out)


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def check_out(model_dir: Path, out: Path) -> None:
    """``out`` must be neither ``model_dir`` nor inside it: saving there overwrites the weights
    still being read, and copy_head would delete the head it is about to copy."""
    model, target = Path(model_dir).resolve(), Path(out).resolve()
    if target == model or model in target.parents:
        raise ValueError(f"--out {out} is --model {model_dir} or inside it: write the trained "
                         "model to another directory (it would overwrite the model it reads)")


def copy_head(base_dir: Path, out: Path) -> bool:
    """Carry the base checkpoint's safety head over (the head reads hidden states the fine-tune
    moved, so re-check or retrain it on the new model before relying on it). A base without a
    head leaves ``out`` without one: a head of an earlier run there belongs to another model."""
    src, dst = Path(base_dir) / HEAD_DIR, Path(out) / HEAD_DIR
    if src.resolve() == dst.resolve():
        return False  # the same folder: removing dst would remove the source
    if not (src / "head.safetensors").is_file():
        if is_main_process():
            shutil.rmtree(dst, ignore_errors=True)
        return False
    if not is_main_process():
        return True
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    from safeserve.models.head_check import drop_self_check

    drop_self_check(out)  # its record is the base model's: unverified on the fine-tune
    return True


def copy_chat_template(base_dir: Path, out: Path) -> None:
    """Keep the base's chat template file if saving the tokenizer did not write one."""
    src = Path(base_dir) / "chat_template.jinja"
    if is_main_process() and src.is_file() and not (out / "chat_template.jinja").is_file():
        shutil.copy(src, out / "chat_template.jinja")
