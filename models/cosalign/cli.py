"""``safeserve train cosalign`` and ``safeserve train cosalign-prompts``.

The lead's CLI calls ``register(train_app)``. ``python -m safeserve.models.cosalign.cli``
runs the same ``cosalign`` command alone (for ``accelerate launch``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def cosalign(
    prompts: Optional[Path] = typer.Option(None, "--prompts", exists=True, dir_okay=False, help="Training prompts JSONL: {prompt, categories} with categories a list of taxonomy ids (see `train cosalign-prompts`)."),
    model: Optional[Path] = typer.Option(None, "--model", exists=True, file_okay=False, help="Base HF model directory (default: the embedded SmolLM2; --stage train: the model the data was built from)."),
    out: Path = typer.Option(..., "--out", help="Output model directory (full HF dir; data under cosalign/)."),
    head_checkpoint: Optional[Path] = typer.Option(None, "--head-checkpoint", help="Safety checkpoint whose head labels the risk categories in candidates."),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible endpoint of an LLM judge for addressed/categories labels."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="Model name at --judge-url (default: the first it lists)."),
    judge_api_key: str = typer.Option("EMPTY", "--judge-api-key", help="API key of the judge endpoint.", show_default=False),
    alpha: float = typer.Option(0.1, "--alpha", help="Error per allowed category present."),
    beta: float = typer.Option(3.0, "--beta", help="Error per disallowed category present."),
    gamma: float = typer.Option(1.0, "--gamma", help="Error when the response did not address the prompt."),
    num_candidates: int = typer.Option(4, "--num-candidates", min=1, help="Sampled responses per prompt-config."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Generation length of each candidate."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature of candidates."),
    modes: str = typer.Option("exact,safe,superset,not_superset", "--modes", help="Config synthesis modes, comma-separated."),
    holdout: list[str] = typer.Option([], "--holdout", help="Allow-set never used in training (ids joined by '+', or 'safe'); stays an unseen config. Repeatable."),
    refusal_candidates: int = typer.Option(1, "--refusal-candidates", help="Written refusals added to each prompt-config's candidates (0 = only sampled ones)."),
    max_pairs: int = typer.Option(4, "--max-pairs", help="Preference pairs kept per prompt-config (0 = all)."),
    limit: int = typer.Option(0, "--limit", min=0, help="Seeded sample of N prompts (0 = all)."),
    lora: bool = typer.Option(False, "--lora/--full", help="Train a LoRA adapter (merged into the saved weights) instead of all weights."),
    sft_epochs: float = typer.Option(1.0, "--sft-epochs", help="SFT epochs on the chosen responses (0 skips SFT)."),
    sft_lr: float = typer.Option(1e-5, "--sft-lr", help="SFT learning rate."),
    dpo_epochs: float = typer.Option(1.0, "--dpo-epochs", help="DPO epochs."),
    dpo_beta: float = typer.Option(0.1, "--dpo-beta", help="DPO beta."),
    dpo_lr: float = typer.Option(5e-7, "--dpo-lr", help="DPO learning rate."),
    optim: str = typer.Option("rmsprop", "--optim", help="DPO optimizer (transformers name)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Per-device batch size."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Gradient accumulation steps."),
    max_length: int = typer.Option(1024, "--max-length", help="Token limit of a training sequence."),
    max_steps: int = typer.Option(-1, "--max-steps", help="Cap on optimizer steps per stage (-1 = epochs decide)."),
    kv_cache_gib: float = typer.Option(1.0, "--kv-cache-gib", help="vLLM KV cache for candidate generation."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (CPU) | bfloat16 (GPUs: large models): the weights' dtype in candidate generation and training."),
    stage: str = typer.Option("all", "--stage", help="all | data (stop after pairs) | train (reuse out/cosalign data)."),
    keep_sft: bool = typer.Option(False, "--keep-sft", help="Keep the intermediate SFT model under out/cosalign/sft_model."),
    seed: int = typer.Option(0, "--seed", help="Seed of sampling, config synthesis and training."),
) -> None:
    """Controllable safety alignment (CoSAlign): train a model to follow the safety config in its system prompt."""
    from safeserve.models.cosalign.configs import MODES
    from safeserve.models.cosalign.pipeline import JobInputError, JobOptions, holdout_keys, run
    from safeserve.models.cosalign.preferences import Weights, check_weights
    from safeserve.models.cosalign.trainer import TrainOptions
    from safeserve.models.taxonomy import Taxonomy

    if dtype not in ("float32", "bfloat16"):
        raise typer.BadParameter("--dtype must be float32 or bfloat16", param_hint="--dtype")
    if stage not in ("all", "data", "train"):
        raise typer.BadParameter("--stage must be all, data or train", param_hint="--stage")
    if stage != "train" and prompts is None:
        raise typer.BadParameter(f"--stage {stage} builds the data and needs the training prompts",
                                 param_hint="--prompts")
    mode_list = tuple(m.strip() for m in modes.split(",") if m.strip())
    if not mode_list or (unknown := sorted(set(mode_list) - set(MODES))):
        raise typer.BadParameter(f"known modes: {', '.join(MODES)}"
                                 + (f" (not {', '.join(unknown)})" if mode_list else ""),
                                 param_hint="--modes")
    try:
        holdout_keys(holdout, Taxonomy.load())
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--holdout") from None
    try:
        # A disallowed risk must cost more than any answer without one (see check_weights).
        check_weights(Weights(alpha, beta, gamma), len(Taxonomy.load().ids))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--beta") from None
    logging.basicConfig(level=logging.INFO)
    opts = JobOptions(limit=limit, seed=seed, modes=mode_list,
                      holdout=tuple(holdout), num_candidates=num_candidates, max_tokens=max_tokens,
                      temperature=temperature, kv_cache_gib=kv_cache_gib, dtype=dtype,
                      weights=Weights(alpha, beta, gamma), max_pairs=max_pairs,
                      refusal_candidates=refusal_candidates,
                      head_checkpoint=str(head_checkpoint) if head_checkpoint else None,
                      judge_url=judge_url, judge_model=judge_model, judge_api_key=judge_api_key)
    topts = TrainOptions(sft_epochs=sft_epochs, sft_lr=sft_lr, dpo_epochs=dpo_epochs,
                         dpo_beta=dpo_beta, dpo_lr=dpo_lr, optim=optim, batch_size=batch_size,
                         grad_accum=grad_accum, max_length=max_length, lora=lora,
                         max_steps=max_steps, seed=seed, dtype=dtype)
    try:
        recipe = run(prompts, model, out, opts, topts, stage=stage, keep_sft=keep_sft)
    except JobInputError as exc:
        err_console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    console.print_json(json.dumps({k: recipe.get(k) for k in ("data", "train")}))
    console.print(f"[green]wrote {out}[/green]")


def cosalign_prompts(
    out: Path = typer.Option(..., "--out", help="Output JSONL {prompt, categories, source}."),
    beavertails: list[Path] = typer.Option([], "--beavertails", help="BeaverTails/CoSAlign JSONL (prompt + category map or categories list). Repeatable."),
    harmbench: list[Path] = typer.Option([], "--harmbench", help="HarmBench behaviours CSV (SemanticCategory mapped). Repeatable."),
    harmful: list[Path] = typer.Option([], "--harmful", help="Harmful instruction JSON/JSONL (instruction[, category]); keyword-labelled. Repeatable."),
    benign: list[Path] = typer.Option([], "--benign", help="Benign instruction JSON/JSONL (Alpaca style). Repeatable."),
    benign_limit: int = typer.Option(200, "--benign-limit", help="Benign prompts sampled per file (0 = all)."),
    exclude: list[Path] = typer.Option([], "--exclude", help="Evaluation files whose prompts must not be trained on (CoSAlign-Test TSV, JSONL). Repeatable."),
    seed: int = typer.Option(0, "--seed", help="Seed of sampling and shuffling."),
) -> None:
    """Build CoSAlign training prompts labelled with our taxonomy ids from public sources."""
    from safeserve.models.cosalign.prompts import build_prompt_set, write_prompts

    rows, stats = build_prompt_set(beavertails=beavertails, harmbench=harmbench, harmful=harmful,
                                   benign=benign, benign_limit=benign_limit, exclude=exclude, seed=seed)
    if not rows:
        raise typer.BadParameter("no prompts read: give at least one source")
    write_prompts(rows, out)
    console.print_json(json.dumps(stats))
    console.print(f"[green]wrote {len(rows)} prompts to {out}[/green]")


def register(app: typer.Typer) -> None:
    app.command("cosalign")(cosalign)
    app.command("cosalign-prompts")(cosalign_prompts)


if __name__ == "__main__":
    standalone = typer.Typer(pretty_exceptions_show_locals=False)
    standalone.command()(cosalign)
    standalone()
