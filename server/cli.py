"""The ``safeserve`` command: ``serve``, and the ``train``, ``eval``, ``bench`` and ``model`` groups."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

app = typer.Typer(help="SafeServe: LLM serving with an explicit safety signal in the decoding loop.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
train_app = typer.Typer(help="Offline training jobs that produce servable checkpoints.",
                        no_args_is_help=True)
eval_app = typer.Typer(help="Evaluations against a running OpenAI-compatible server.",
                       no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (printed side by side, with ratios).", no_args_is_help=True)
model_app = typer.Typer(help="Model files: the embedded default and safety checkpoints.",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")
app.add_typer(model_app, name="model")


@app.command()
def serve(
    model: Path | None = typer.Option(None, help="HF model directory (default: embedded SmolLM2 + default safety head)"),
    host: str | None = typer.Option(None, help="bind address [SAFESERVE_HOST, 127.0.0.1]"),
    port: int | None = typer.Option(None, help="port [SAFESERVE_PORT, 8000]"),
    served_model_name: str | None = typer.Option(None, help="model id clients send"),
    dtype: str | None = typer.Option(None, help="float32 | bfloat16 | float16 | auto"),
    max_model_len: int | None = typer.Option(None, help="context length"),
    kv_cache_gib: float | None = typer.Option(None, help="KV-cache size in GiB"),
    max_num_seqs: int | None = typer.Option(None, help="max concurrent sequences in the engine"),
    api_key: list[str] | None = typer.Option(None, help="bearer token (repeatable) [SAFESERVE_API_KEYS, comma-separated]"),
    enforce_eager: bool | None = typer.Option(None, help="skip torch.compile (faster start)"),
    allow_unsafe: bool | None = typer.Option(None, "--allow-unsafe", help="serve a model without a safety head"),
    safety_head: str | None = typer.Option(None, help="compose the model with this safety head: bundled 'default', 'guarded' or 'strict', or a directory with safety_head/ (+ adapter/) [SAFESERVE_SAFETY_HEAD]"),
    presets: Path | None = typer.Option(None, help="safety presets YAML [SAFESERVE_PRESETS]"),
    grants: Path | None = typer.Option(None, help="API keys and their safety grants YAML [SAFESERVE_GRANTS]"),
    default_preset: str | None = typer.Option(None, help="preset for requests without a config"),
    refusal_explain_sentences: int | None = typer.Option(None, help="sentences the model may write after a spliced refusal before the response ends (0: none, -1: no limit) [SAFESERVE_REFUSAL_EXPLAIN_SENTENCES, 1]"),
    max_request_body_bytes: int | None = typer.Option(None, help="largest request body; larger ones get a 413 [SAFESERVE_MAX_REQUEST_BODY_BYTES, 8 MiB]"),
    max_moderation_tokens: int | None = typer.Option(None, help="most prompt tokens one /v1/moderations request may send, all inputs together [SAFESERVE_MAX_MODERATION_TOKENS, 16384]"),
    head_check: str | None = typer.Option(None, help="the head's startup self-check: error (refuse to serve on a mismatch) | warn (log it, serve) | off [SAFESERVE_HEAD_CHECK, error]"),
    head_check_tolerance: float | None = typer.Option(None, help="largest allowed self-check difference in logits [SAFESERVE_HEAD_CHECK_TOLERANCE; 0.1 float32, 1.0 half precision]"),
    shutdown_grace_s: float | None = typer.Option(None, help="on SIGTERM / Ctrl-C, seconds requests in flight may run on before they are cut [SAFESERVE_SHUTDOWN_GRACE_S, 5]"),
    log_level: str | None = typer.Option(None),
):
    """Run the OpenAI-compatible server."""
    from safeserve.server.launch import load_settings, run_server

    overrides = {k: v for k, v in dict(
        model=model, host=host, port=port, served_model_name=served_model_name, dtype=dtype,
        max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, max_num_seqs=max_num_seqs,
        api_keys=api_key or None, enforce_eager=enforce_eager, allow_unsafe=allow_unsafe,
        safety_head=safety_head,
        presets=presets, default_preset=default_preset, grants=grants,
        refusal_explain_sentences=refusal_explain_sentences,
        max_request_body_bytes=max_request_body_bytes, max_moderation_tokens=max_moderation_tokens,
        head_check=head_check, head_check_tolerance=head_check_tolerance,
        shutdown_grace_s=shutdown_grace_s, log_level=log_level).items() if v is not None}
    run_server(load_settings(**overrides))


@model_app.command("prepare")
def model_prepare():
    """Convert the embedded default model (once) and print its directory."""
    from safeserve.models.model_store import ensure_default_model

    logging.basicConfig(level=logging.INFO)
    typer.echo(ensure_default_model())


@model_app.command("cache")
def model_cache():
    """List the composed checkpoints in the cache (a base model plus a safety head, one per
    head and base): size, last use, and whether their base model is still there."""
    import datetime

    from safeserve.models.model_store import cache_dir, composed_copies

    copies = composed_copies()
    for c in copies:
        used = datetime.datetime.fromtimestamp(c.last_used).strftime("%Y-%m-%d %H:%M")
        state = "orphaned (base gone)" if c.orphaned else ("adapter merged" if c.adapter_merged
                                                          else "ok")
        typer.echo(f"{c.path.name}  {c.bytes / 2**20:8.1f} MiB  last used {used}  {state}")
    total = sum(c.bytes for c in copies)
    typer.echo(f"{len(copies)} composed copies, {total / 2**20:.1f} MiB, in {cache_dir() / 'models'}")


@model_app.command("prune")
def model_prune(
    older_than: float = typer.Option(None, "--older-than", min=0,
                                     help="Also remove copies not used for this many days."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would go; remove nothing."),
):
    """Remove composed checkpoints whose base model is gone (and, with --older-than, unused
    ones). The converted default model is kept; a serve recomposes what it needs."""
    from safeserve.models.model_store import prune_composed

    removed = prune_composed(older_than, dry_run=dry_run)
    for path in removed:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    typer.echo(f"{len(removed)} {'would be ' if dry_run else ''}removed")


def _register_plugins() -> None:
    """Commands contributed by the training/evaluation modules (each owns its options)."""
    import importlib

    for module, group in (
        ("safeserve.models.safety_train_cli", train_app),
        ("safeserve.models.evaluation.cli", eval_app),
        ("safeserve.models.seal.cli", train_app),
        ("safeserve.models.cosalign.cli", train_app),
        ("safeserve.models.evaluation.cosa_cli", eval_app),
        ("safeserve.server.bench", bench_app),
    ):
        importlib.import_module(module).register(group)


# What bad input (a path, a file's content, an option's value) raises in the jobs: one line
# that says what, exit 2, instead of a traceback. SAFESERVE_TRACEBACK=1 shows the traceback.
_INPUT_ERRORS = (OSError, ValueError, KeyError, OverflowError)


def main() -> None:
    _register_plugins()
    try:
        app()
    except _INPUT_ERRORS as e:
        if os.environ.get("SAFESERVE_TRACEBACK"):
            raise
        what = f"missing field or key {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        print(f"error: {type(e).__name__}: {what} (SAFESERVE_TRACEBACK=1 shows where)",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
