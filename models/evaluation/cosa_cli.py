"""``safeserve eval cosa``: CoSA-Score of a running server. The lead's CLI calls
``register(eval_app)``."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from safeserve.models.evaluation.cli import parse_safety_config

console = Console()


def cosa(
    base_url: str = typer.Option(..., "--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1"),
    model: str = typer.Option(..., "--model", help="Model name the server serves."),
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False, help="CoSAlign-Test TSV or JSONL {prompt, allow, expect}."),
    fmt: Optional[str] = typer.Option(None, "--format", help="tsv | jsonl (default: from the file name)."),
    mode: str = typer.Option("enforce", "--mode", help="enforce (safety_config allow) | prompt-only (config text as safety_config guideline: the server's system-prompt template; annotate unless --base-config) | both | none."),
    base_config: Optional[str] = typer.Option(None, "--base-config", help="Preset name or JSON object sent as safety_config in every mode (enforce/both/prompt-only add allow or guideline to it, so there only a JSON object: a preset's fields live on the server), e.g. annotate_only or '{\"on_violation\": \"annotate\"}'."),
    out: Path = typer.Option(..., "--out", help="Output folder: results.jsonl, summary.json, summary.md."),
    limit: int = typer.Option(0, "--limit", min=0, help="Seeded sample of N items per config (0 = all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --limit sample."),
    exclude_sample: int = typer.Option(0, "--exclude-sample", min=0, help="Leave out the seeded "
                                       "sample of N items per config (what --limit N --seed "
                                       "<--exclude-seed> sends): the development split beside "
                                       "a reported sample."),
    exclude_seed: int = typer.Option(0, "--exclude-seed", help="Seed of the sample "
                                     "--exclude-sample leaves out (the reported run's --seed)."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Requests in flight at once."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Generation length per request."),
    head_checkpoint: Optional[Path] = typer.Option(None, "--head-checkpoint", help="Safety checkpoint whose head labels response risks when the server reports none."),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible LLM judge: adds its categories and its helpfulness replaces the refusal judge's."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="Model at --judge-url (default: first listed)."),
    judge_api_key: str = typer.Option("EMPTY", "--judge-api-key", help="API key of the judge endpoint.", show_default=False),
    seen_configs: Optional[Path] = typer.Option(None, "--seen-configs", help="configs_seen.json of a CoSAlign training run: splits results into seen/unseen configs."),
    api_key: str = typer.Option(os.environ.get("OPENAI_API_KEY", "EMPTY"), "--api-key", help="API key if the server wants one.", show_default=False),
    retries: int = typer.Option(3, "--retries", help="Retries per request."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds per request attempt."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """CoSA-Score, helpful+safe and helpful+unsafe rates per safety config."""
    from safeserve.models.evaluation import cosa_eval as ce

    if mode not in ce.MODES:
        raise typer.BadParameter(f"--mode must be one of {', '.join(ce.MODES)}")
    base = parse_safety_config(base_config)
    if isinstance(base, str) and mode in ("enforce", "both", "prompt-only"):
        # these send {base..., allow and/or guideline}: a preset's name cannot be merged with
        # them (its fields are the server's), and dropping it would change what runs
        raise typer.BadParameter(f"--mode {mode} adds to --base-config, which must then "
                                 f"be a JSON object; write out the fields of preset {base!r}")
    # read before any request is sent: a bad file must not cost the run
    seen = None
    if seen_configs:
        try:
            listed = json.loads(seen_configs.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise typer.BadParameter(f"{seen_configs}: {e}", param_hint="--seen-configs") from None
        if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed):
            raise typer.BadParameter(f"{seen_configs}: want a JSON list of config names (what "
                                     "`train cosalign` writes as configs_seen.json)",
                                     param_hint="--seen-configs")
        seen = set(listed)
    items = ce.sample_per_config(ce.development_split(ce.load_items(data, fmt), exclude_sample,
                                                     exclude_seed), limit, seed)
    if not items:
        raise typer.BadParameter(f"no items in {data}")
    console.print(f"{len(items)} items over {len({i.config for i in items})} configs, mode {mode}")
    head = judge = None
    if head_checkpoint is not None:
        from safeserve.models.cosalign.head_labeller import HeadLabeller

        head = HeadLabeller(head_checkpoint)
    if judge_url:
        from safeserve.models.cosalign.llm_judge import LLMJudge

        # Its own key: --api-key is the served model's and must not go to another endpoint.
        # Reached now, so a wrong URL, key or model is one line before any request is sent.
        try:
            judge = LLMJudge(judge_url, judge_model, judge_api_key, concurrency=concurrency)
            judge.check()
        except Exception as exc:  # the client's connection, auth, HTTP and empty-list errors
            raise typer.BadParameter(f"cannot use the judge ({type(exc).__name__}: "
                                     f"{' '.join(str(exc).split())})", param_hint="--judge-url") from None
    started = time.perf_counter()
    rows = asyncio.run(ce.query(items, base_url=base_url, model=model, mode=mode,
                                base_config=base, concurrency=concurrency,
                                max_tokens=max_tokens, api_key=api_key, timeout=timeout,
                                retries=retries, progress=progress))
    duration = time.perf_counter() - started
    ce.score_rows(rows, head=head, llm_judge=judge)
    meta = {"model": model, "base_url": base_url, "data": str(data), "mode": mode,
            "base_config": base, "limit_per_config": limit, "seed": seed,
            "exclude_sample_per_config": exclude_sample, "exclude_seed": exclude_seed,
            "max_tokens": max_tokens, "temperature": 0.0, "duration_s": round(duration, 1),
            "head_checkpoint": str(head_checkpoint) if head_checkpoint else None,
            "judge_url": judge_url}
    summary = ce.summarise(rows, seen, meta)
    ce.write_outputs(rows, summary, out)
    console.print(ce.render_markdown(summary))
    console.print(f"[green]wrote {out}[/green]")
    if rows and all(r["error"] is not None for r in rows):
        console.print(f"[red]every request failed (first: {rows[0]['error']})[/red]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("cosa")(cosa)
