"""``safeserve bench serve``: one run, several servers on the same model, the same load.

Servers (by default all started at once, each warmed up by an unmeasured load as it starts,
then loaded one at a time, so a load never shares the CPU with another; idle engines cost
little):
  plain     vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``)
  ours-off  SafeServe without a safety head (--allow-unsafe): the cost of our HTTP layer
  ours-on   SafeServe with the safety head (annotate, so outputs keep their length): the
            cost of the safety signal in the decoding loop
  ours-off-b  (``--control``) a second ours-off, loaded right before ours-off (as ours-on
            right after it): the ratio ours-off-b / ours-off is the same server measured
            twice, the run's noise floor that every other ratio is to be read against

Every server gets the same engine settings (dtype, context length, KV-cache bytes, batch size,
vLLM's V1 model runner) on the command line, and an environment without the operator's
``SAFESERVE_*`` settings, so neither arm is configured differently by accident.

The load: streaming chat completions at each concurrency, ``ignore_eos`` with a fixed
``max_tokens`` so every server generates the same number of tokens. Reported per server and
concurrency: requests/s, output tokens/s, TTFT and inter-token latency p50/p99 (over the
samples of all passes pooled), failed requests, and the ratios ours/plain and on/off. A
request that fails (an HTTP error, an error event in its stream, a stream cut short) counts as
failed, not as a fast success; a run with failures says so and exits non-zero.

Two servers started the same way differ by a few percent in throughput for as long as they run
(measured here: about 5% from one instance to the next at 8 streams), which a run that keeps
one instance per server puts into every ratio. ``--instances N`` starts every server afresh N
times instead, one server at a time (nothing else running), and reports each ratio over those
N pairs of instances: its geometric mean with a 95% interval. Without it the pairs are passes
on the same instances, and their interval is the pass-to-pass noise only (so labelled): it
leaves the instance-to-instance spread out.

This module runs the command (servers started, loaded, stopped; results written); the load
is ``bench_load``, the servers ``bench_servers``, the table and its statistics ``bench_report``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer
from safeserve.server.bench_config import bench_config
from safeserve.server.bench_leak import bench_leak
from safeserve.server.bench_load import LoadResult, _mean, run_load
from safeserve.server.bench_report import _failure_report, _table
from safeserve.server.bench_servers import _Proc, _servers


def _levels(concurrency: str) -> list[int]:
    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise typer.BadParameter(f"want comma-separated integers, got {concurrency!r}",
                                 param_hint="--concurrency") from None
    if not levels or min(levels) < 1:
        raise typer.BadParameter(f"every level must be >= 1, got {concurrency!r}",
                                 param_hint="--concurrency")
    return levels


def _safe_model(base: Path, safe_model: Path | None, skip_safety: bool) -> Path | None:
    """The ours-on server's model: none with --skip-safety (whatever else is given), else
    --safe-model, else the base with the default head."""
    from safeserve.models.checkpoint import has_safety_head
    from safeserve.models.model_store import DEFAULT_HEAD_DIR, compose_checkpoint

    if skip_safety:
        return None
    if safe_model is not None:
        return safe_model
    if not has_safety_head(DEFAULT_HEAD_DIR):
        raise typer.BadParameter("no safety head: pass --safe-model or --skip-safety")
    return compose_checkpoint(base, DEFAULT_HEAD_DIR)


def _measure(name: str, proc: _Proc, extra: dict, c: int, n: int, max_tokens: int,
             label: str) -> LoadResult:
    """One load of one server, with the CPU its processes spent on it."""
    cpu0 = proc.cpu_seconds()
    r = asyncio.run(run_load(proc.url, "bench", name, c, n, max_tokens, extra))
    cpu1 = proc.cpu_seconds()
    r.cpu_http_s, r.cpu_engine_s = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    typer.echo(f"  {label} {name} c={c}: {r.tok_per_s:.1f} tok/s, TTFT "
               f"p50 {r.ttft_p50*1e3:.0f} ms, ITL p50 {r.itl_p50*1e3:.1f} ms, "
               f"CPU {r.cpu_ms_per_tok:.1f} ms/tok"
               + (f", {r.failed} / {r.requests} FAILED" if r.failed else ""))
    return r


def _start(name: str, cmd: list[str], port: int, ready: str, env: dict, log: Path) -> _Proc:
    typer.echo(f"starting {name} on port {port} ...")
    proc = _Proc(cmd, port, log, env)
    try:
        proc.wait(ready)
    except BaseException:
        proc.stop()
        raise
    return proc


def _warm_up(name: str, proc: _Proc, extra: dict, levels: list[int]) -> None:
    """An unmeasured load at the highest level: the first batches of a fresh engine (and
    whatever it compiles or allocates for them) are no part of any measurement."""
    top = max(levels)
    asyncio.run(run_load(proc.url, "bench", name, top, max(6, top), 16, extra))


def _run_kept(servers, levels, passes, max_tokens, requests_per_level, out, raw) -> None:
    """Every server up at once, each warmed up once started, loaded one at a time, passes of
    alternating order."""
    procs: list[tuple[str, _Proc, dict]] = []
    try:
        for name, cmd, ready, extra, env in servers:
            port = int(cmd[cmd.index("--port") + 1])
            procs.append((name, _start(name, cmd, port, ready, env, out / f"{name}.log"), extra))
            _warm_up(name, procs[-1][1], extra, levels)
        for c in levels:
            n = requests_per_level or max(6, 2 * c)
            for p in range(passes):
                for name, proc, extra in (procs if p % 2 == 0 else procs[::-1]):
                    raw.setdefault((name, c), []).append(
                        _measure(name, proc, extra, c, n, max_tokens, f"pass {p + 1}"))
    finally:
        for _, proc, _ in procs:
            proc.stop()


def _run_fresh(servers, levels, passes, max_tokens, requests_per_level, out, raw,
               instances: int) -> None:
    """Round after round, every server started afresh, one at a time: warmed up at the
    highest level, loaded at every level (``passes`` loads each, combined), stopped."""
    for i in range(instances):
        for name, cmd, ready, extra, env in (servers if i % 2 == 0 else servers[::-1]):
            port = int(cmd[cmd.index("--port") + 1])
            proc = _start(f"{name} (instance {i + 1})", cmd, port, ready, env,
                          out / f"{name}.{i + 1}.log")
            try:
                _warm_up(name, proc, extra, levels)
                for c in levels:
                    n = requests_per_level or max(6, 2 * c)
                    runs = [_measure(name, proc, extra, c, n, max_tokens,
                                     f"instance {i + 1} pass {p + 1}") for p in range(passes)]
                    raw.setdefault((name, c), []).append(_mean(runs))
            finally:
                proc.stop()


def bench_serve(
    concurrency: str = typer.Option("1,8,32", help="comma-separated concurrency levels (>= 1)"),
    requests_per_level: int = typer.Option(
        0, min=0, help="requests per level and pass (0: 2 x concurrency, min 6)"),
    max_tokens: int = typer.Option(64, min=1, help="output tokens per request (ignore_eos)"),
    model: Path = typer.Option(None, help="base model dir (default: embedded SmolLM2)"),
    safe_model: Path = typer.Option(None, help="model dir with a safety head (default: base + default head)"),
    skip_safety: bool = typer.Option(
        False, help="only plain vs ours-off (even with --safe-model)"),
    port: int = typer.Option(
        8790, min=1, max=65535, help="first port; servers use port, port+1, ..."),
    out: Path = typer.Option(Path("runs/bench_serve"), help="results folder"),
    passes: int = typer.Option(2, min=1, help="passes per level (per instance with "
                               "--instances), alternating server order"),
    control: bool = typer.Option(False, help="add a second ours-off server: the ratio of two "
                                 "identical servers, the run's noise floor"),
    instances: int = typer.Option(
        0, min=0, help="start every server afresh this many times, one server at a time, and "
        "report each ratio over the rounds (0: one instance each, all up at once)"),
    no_plain: bool = typer.Option(False, help="leave plain vLLM out (ours-off vs ours-on)"),
):
    """Ours vs plain vLLM, and safety on vs off, measured side by side in one run.

    By default all servers run at once (idle ones cost little) and are loaded one at a time,
    level by level, in passes of alternating order (A B C, then C B A, ...), so slow drifts of
    the machine's load hit every server alike. With --instances N every server is instead
    started N times, one at a time, so the spread between instances enters the interval
    rather than bias the ratio. Each server's passes are combined."""
    from safeserve.models.model_store import ensure_default_model

    levels = _levels(concurrency)
    if no_plain and skip_safety and not control:
        raise typer.BadParameter("nothing to compare: --no-plain with --skip-safety leaves "
                                 "one server")
    base = model or ensure_default_model()
    safe = _safe_model(base, safe_model, skip_safety)
    servers = [s for s in _servers(base, safe, port, control)
               if not (no_plain and s[0] == "plain")]
    out.mkdir(parents=True, exist_ok=True)
    raw: dict[tuple[str, int], list[LoadResult]] = {}
    try:
        if instances:
            _run_fresh(servers, levels, passes, max_tokens, requests_per_level, out, raw,
                       instances)
        else:
            _run_kept(servers, levels, passes, max_tokens, requests_per_level, out, raw)
    finally:
        # every load measured so far, before anything else can go wrong (a server that died
        # mid-run, the table): the measurements are kept
        (out / "passes.json").write_text(json.dumps(
            [r.summary() for rs in raw.values() for r in rs], indent=2))
    results = [_mean(raw[(name, c)]) for c in levels for name, *_ in servers]
    (out / "results.json").write_text(json.dumps([r.summary() for r in results], indent=2))
    table = _table(results, raw, fresh=bool(instances))
    typer.echo(table)
    (out / "results.md").write_text(table + "\n")
    if failures := _failure_report(results):
        typer.secho(failures, err=True, fg=typer.colors.RED, bold=True)
        raise typer.Exit(1)

def register(app: typer.Typer) -> None:
    app.command("serve")(bench_serve)
    app.command("config")(bench_config)
    app.command("leak")(bench_leak)
