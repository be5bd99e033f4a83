"""``safeserve train seal-select | seal-finetune | seal-experiment`` (typer commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _choice(value: str, choices, option: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=option)
    return value


def _keep(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value} is not a fraction in (0, 1]", param_hint="--keep")
    return value


def _selector_file(path: Optional[Path], option: str) -> Optional[Path]:
    """A selector.json (or its folder) that really is one, checked before any model loads."""
    if path is None:
        return None
    from safeserve.models.seal.selector import Selector

    try:
        Selector.load(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file (a JSON list, a corrupt
        # safetensors) is the same bad option, not a traceback
        raise typer.BadParameter(f"not a readable SEAL selector: {type(exc).__name__}: {exc}",
                                 param_hint=option) from None
    return path


def _fail(exc: Exception) -> None:
    """Input the job cannot use, found after the options were checked: one red line."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[red]{escape(str(exc))}[/red]")
    raise typer.Exit(1)


def _default_model(model: Optional[Path]) -> Path:
    if model is not None:
        return model
    from safeserve.models.model_store import ensure_default_model

    return ensure_default_model()


def register(app: typer.Typer) -> None:
    @app.command("seal-select")
    def seal_select(
        ft_data: Path = typer.Option(..., "--ft-data", exists=True, dir_okay=False,
                                     help="fine-tuning data (JSONL/JSON/CSV: prompt+response or messages; optional id, source)"),
        safe_data: Path = typer.Option(..., "--safe-data", exists=True, dir_okay=False,
                                       help="safe data set for the upper level (same formats)"),
        model: Optional[Path] = typer.Option(None, help="HF model directory (default: the embedded default model)"),
        out: Path = typer.Option(..., help="output directory (selector.json, selector.safetensors, histogram)"),
        algorithm: int = typer.Option(2, min=1, max=2, help="2 = memory-efficient (paper's experiments), 1 = with auxiliary model"),
        gamma_step: float = typer.Option(0.025, help="penalty weight gamma added per epoch"),
        gamma_init: float = typer.Option(0.0, help="gamma in the first epoch"),
        epochs: int = typer.Option(3, min=1, help="selector epochs"),
        lr: float = typer.Option(1e-5, help="model (LoRA) learning rate, Adam"),
        selector_lr: float = typer.Option(5e-3, help="selector learning rate"),
        selector_optim: str = typer.Option("adam", help="adam (paper) | sgd"),
        batch_size: int = typer.Option(64, min=1, help="global batch size (fine-tuning rows per step; same for safe rows)"),
        micro_batch_size: int = typer.Option(0, min=0, help="rows per forward pass on each rank (0 = whole local batch)"),
        lora_r: int = typer.Option(16, min=1, help="LoRA rank (q/v projections)"),
        lora_alpha: int = typer.Option(16, help="LoRA alpha"),
        max_length: int = typer.Option(512, min=8, help="rows longer than this many tokens are dropped"),
        fresh_losses: bool = typer.Option(False, help="re-evaluate the batch losses after the model step for the selector step (+1 forward per step)"),
        seed: int = typer.Option(0),
        dtype: str = typer.Option("float32", help="model weight dtype: float32 | bfloat16 | float16 (LoRA and the losses stay float32)"),
        resume: Optional[Path] = typer.Option(None, exists=True, help="selector.json of an earlier run to continue (exactly, when its train_state.pt is beside it)"),
    ):
        """Learn a SEAL data selector (one logit per fine-tuning row) by penalty-based bilevel optimisation."""
        from safeserve.models.seal.data import SealInputError
        from safeserve.models.seal.select_train import DTYPES, SelectConfig, run_select
        from safeserve.models.seal.selector import SELECTOR_OPTIMS

        _choice(dtype, DTYPES, "--dtype")
        _choice(selector_optim, SELECTOR_OPTIMS, "--selector-optim")
        _selector_file(resume, "--resume")
        cfg = SelectConfig(ft_data=str(ft_data), safe_data=str(safe_data),
                           model=str(_default_model(model)), out=str(out), algorithm=algorithm,
                           epochs=epochs, gamma_init=gamma_init, gamma_step=gamma_step, lr=lr,
                           selector_lr=selector_lr, selector_optim=selector_optim,
                           batch_size=batch_size, micro_batch_size=micro_batch_size,
                           lora_r=lora_r, lora_alpha=lora_alpha, max_length=max_length,
                           seed=seed, fresh_losses=fresh_losses, dtype=dtype,
                           resume=str(resume) if resume else None)
        try:
            run_select(cfg, log=typer.echo)
        except SealInputError as exc:
            _fail(exc)

    @app.command("seal-finetune")
    def seal_finetune(
        ft_data: Path = typer.Option(..., "--ft-data", exists=True, dir_okay=False, help="fine-tuning data (the file the selector was trained on)"),
        selector: Optional[Path] = typer.Option(None, exists=True, help="selector.json from seal-select"),
        keep: float = typer.Option(0.8, help="fraction of rows to keep (top by score)"),
        random_baseline: bool = typer.Option(False, "--random-baseline", help="keep a random fraction instead (baseline)"),
        seed: int = typer.Option(0, help="seed for the random baseline and training"),
        model: Optional[Path] = typer.Option(None, help="base HF model directory (default: the embedded default model)"),
        out: Path = typer.Option(..., help="output checkpoint directory"),
        lora: bool = typer.Option(True, "--lora/--full", help="LoRA (merged into the saved model) or full fine-tuning"),
        lora_r: int = typer.Option(16, min=1), lora_alpha: int = typer.Option(16),
        lr: Optional[float] = typer.Option(None, help="learning rate (default 1e-4 LoRA, 1e-5 full)"),
        epochs: float = typer.Option(1.0, min=0.01, help="SFT epochs"),
        batch_size: int = typer.Option(8, min=1, help="per-device batch size"),
        grad_accum: int = typer.Option(1, min=1, help="gradient accumulation steps"),
        max_length: int = typer.Option(512, min=8, help="rows longer than this are dropped (as in seal-select)"),
        probe_data: Optional[Path] = typer.Option(None, help="probe prompts for the safety-head check (prompt, harmful)"),
    ):
        """Fine-tune on the top-scored (or a random) fraction of the data; save a servable checkpoint."""
        from safeserve.models.seal.data import SealInputError
        from safeserve.models.seal.finetune import FinetuneConfig, run_finetune

        _keep(keep)
        if not random_baseline:
            _selector_file(selector, "--selector")
        if selector is None and not random_baseline and keep < 1.0:
            raise typer.BadParameter("--selector is required unless --random-baseline or --keep 1.0")
        cfg = FinetuneConfig(ft_data=str(ft_data), selector=str(selector) if selector else None,
                             keep=keep, random_baseline=random_baseline, seed=seed,
                             model=str(_default_model(model)), out=str(out), lora=lora,
                             lora_r=lora_r, lora_alpha=lora_alpha, lr=lr, epochs=epochs,
                             batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
                             probe_data=str(probe_data) if probe_data else None)
        try:
            run_finetune(cfg, log=typer.echo)
        except SealInputError as exc:
            _fail(exc)

    @app.command("seal-experiment")
    def seal_experiment(
        data_root: Path = typer.Option(..., exists=True, file_okay=False, help="folder of the public data sets (e.g. ../shared/data)"),
        out: Path = typer.Option(Path("runs/seal/exp"), help="experiment directory (report.md, plots, checkpoints)"),
        n_benign: int = typer.Option(120, help="benign fine-tuning rows"),
        n_harmful: int = typer.Option(30, help="harmful (compliant-answer) fine-tuning rows"),
        n_safe_refusals: int = typer.Option(36, help="safe set: harmful prompts with refusals"),
        n_safe_benign: int = typer.Option(12, help="safe set: benign pairs"),
        n_eval_harmful: int = typer.Option(64, help="held-out HarmBench prompts for ASR"),
        n_eval_benign: int = typer.Option(40, min=1, help="held-out benign prompts for the utility NLL"),
        answer_tokens: int = typer.Option(32, help="max tokens of generated answers"),
        keep: float = typer.Option(0.8, help="fraction kept by SEAL and random selection"),
        algorithm: int = typer.Option(2, min=1, max=2),
        selector_epochs: int = typer.Option(3, min=1), sft_epochs: float = typer.Option(1.0, min=0.01),
        batch_size: int = typer.Option(8, min=1, help="selector and SFT batch size"),
        select_lr: float = typer.Option(2e-4, help="model lr in the selector loop (paper: 1e-5 at 8B scale, many more steps)"),
        sft_lr: float = typer.Option(3e-4, help="LoRA SFT learning rate"),
        selector_lr: float = typer.Option(5e-3), gamma_step: float = typer.Option(0.025),
        selector_optim: str = typer.Option("adam", help="selector optimiser: adam (paper) | sgd"),
        seed: int = typer.Option(0),
        threads: int = typer.Option(1, help="torch intra-op threads for training (0 = torch default); 1 is fastest on a busy 2-core machine"),
        model: Optional[Path] = typer.Option(None, help="base model (default: the embedded default model)"),
        align: bool = typer.Option(True, "--align/--no-align", help="first safety-align the base (LoRA SFT on refusals + benign self-answers); the selector and all runs start from it"),
        n_align_harmful: int = typer.Option(96, help="alignment set: held-back harmful_train requests with refusals"),
        n_align_benign: int = typer.Option(96, help="alignment set: Alpaca instructions with the base model's answers"),
        align_epochs: float = typer.Option(2.0, help="alignment SFT epochs"),
        align_lr: float = typer.Option(3e-4, help="alignment LoRA SFT learning rate"),
        gen_backend: str = typer.Option("hf", help="greedy generation: hf (transformers, merged checkpoints) | vllm (offline engine, LoRA adapters)"),
        stop_after: Optional[str] = typer.Option(None, help="end after this step: data | align | selector | sft"),
    ):
        """Small-scale reproduction of SEAL's comparison (all data vs random vs SEAL) on CPU."""
        from safeserve.models.seal.data import SealInputError
        from safeserve.models.seal.experiment import run_experiment
        from safeserve.models.seal.experiment_config import STAGES, ExperimentConfig
        from safeserve.models.seal.select_train import SelectConfig, check_config
        from safeserve.models.seal.selector import SELECTOR_OPTIMS

        _choice(gen_backend, ("hf", "vllm"), "--gen-backend")
        _choice(selector_optim, SELECTOR_OPTIMS, "--selector-optim")
        _keep(keep)
        if stop_after is not None:
            _choice(stop_after, STAGES[:-1], "--stop-after")

        cfg = ExperimentConfig(data_root=str(data_root), out=str(out), n_benign=n_benign,
                               n_harmful=n_harmful, n_safe_refusals=n_safe_refusals,
                               n_safe_benign=n_safe_benign, n_eval_harmful=n_eval_harmful,
                               n_eval_benign=n_eval_benign, answer_tokens=answer_tokens,
                               keep=keep, algorithm=algorithm, selector_epochs=selector_epochs,
                               sft_epochs=sft_epochs, batch_size=batch_size, select_lr=select_lr,
                               sft_lr=sft_lr, selector_lr=selector_lr, gamma_step=gamma_step,
                               selector_optim=selector_optim,
                               seed=seed, threads=threads, model=str(model) if model else None,
                               align=align, n_align_harmful=n_align_harmful,
                               n_align_benign=n_align_benign, align_epochs=align_epochs,
                               align_lr=align_lr, gen_backend=gen_backend, stop_after=stop_after)
        try:
            # the selector's settings, checked now rather than after data and alignment
            check_config(SelectConfig(ft_data="", safe_data="", model="", out="",
                                      algorithm=algorithm, epochs=selector_epochs,
                                      gamma_step=gamma_step, selector_optim=selector_optim))
            run_experiment(cfg, log=typer.echo)
        except SealInputError as exc:
            _fail(exc)
