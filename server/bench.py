"""``safeserve bench serve``: one run, several servers on the same model, the same load.

Servers (all started at once, then loaded one at a time, so a load never shares the CPU with
another; idle engines cost little):
  plain     vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``)
  ours-off  SafeServe without a safety head (--allow-unsafe): the cost of our HTTP layer
  ours-on   SafeServe with the safety head (annotate, so outputs keep their length): the
            cost of the safety signal in the decoding loop
  ours-off-b  (``--control``) a second ours-off, loaded right before ours-off (as ours-on
            right after it): the ratio ours-off-b / ours-off is the same server measured
            twice, the run's noise floor that every other ratio is to be read against

The load: streaming chat completions at each concurrency, ``ignore_eos`` with a fixed
``max_tokens`` so every server generates the same number of tokens. Reported per server and
concurrency: requests/s, output tokens/s, TTFT and inter-token latency p50/p99, and the ratios
ours/plain and on/off.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import typer
from safeserve.server.bench_leak import bench_leak

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how photosynthesis works.",
    "Give me tips for learning to play the guitar.",
    "Describe the water cycle in detail.",
    "What are the benefits of regular exercise?",
    "Summarise the history of the printing press.",
    "How do I make a good cup of coffee?",
    "Explain the rules of chess to a beginner.",
]


@dataclass
class LoadResult:
    server: str
    concurrency: int
    requests: int
    seconds: float
    output_tokens: int
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    # CPU time the server spent on this load: its HTTP process, and its engine processes
    # (engine core + workers). vLLM's engine processes poll while they wait, so their share
    # follows wall time; the HTTP share is what our layer itself costs per token.
    cpu_http_s: float = 0.0
    cpu_engine_s: float = 0.0

    @property
    def req_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def cpu_ms_per_tok(self) -> float:
        return 1e3 * (self.cpu_http_s + self.cpu_engine_s) / max(1, self.output_tokens)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
               extra: dict) -> tuple[float, list[float], int]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    ttft, last, gaps, tokens = None, None, [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                else:
                    gaps.append(now - last)
                last = now
    return ttft or float("nan"), gaps, tokens


async def run_load(url: str, model: str, name: str, concurrency: int, requests: int,
                   max_tokens: int, extra: dict) -> LoadResult:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await _one(client, model, PROMPTS[0], 4, extra)  # warm-up

        async def task(i):
            async with sem:
                return await _one(client, model, PROMPTS[i % len(PROMPTS)], max_tokens, extra)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(requests)))
        seconds = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    return LoadResult(name, concurrency, requests, seconds, sum(r[2] for r in results),
                      _pct(ttfts, .5), _pct(ttfts, .99), _pct(gaps, .5), _pct(gaps, .99))


class _Proc:
    def __init__(self, cmd: list[str], port: int, log: Path, env: dict | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait(self, path: str, timeout: float = 1200) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready:\n{self.log.read_text()[-3000:]}")

    def cpu_seconds(self) -> tuple[float, float]:
        """(HTTP process, engine processes) user + system CPU seconds so far."""
        import psutil

        def used(p: psutil.Process) -> float:
            try:
                t = p.cpu_times()
                return t.user + t.system
            except psutil.NoSuchProcess:
                return 0.0

        top = psutil.Process(self.proc.pid)
        return used(top), sum(used(c) for c in top.children(recursive=True))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _servers(base: Path, safe: Path | None, port: int, common: list[str],
             control: bool = False) -> list[tuple]:
    py = sys.executable
    safeserve = str(Path(py).with_name("safeserve"))
    plain = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
             "--served-model-name", "bench", "--port", str(port), "--dtype", "float32",
             "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 30),
             "--max-num-seqs", "64"]
    ours = [safeserve, "serve", "--port", str(port), "--served-model-name", "bench",
            "--max-num-seqs", "64", *common]
    out = [("plain", plain, "/health", {}),
           ("ours-off", ours + ["--model", str(base), "--allow-unsafe"], "/ready", {})]
    if safe is not None:
        out.append(("ours-on", ours + ["--model", str(safe)], "/ready",
                    {"safety_config": {"on_violation": "annotate"}}))
    if control:  # next to ours-off in the load order, as ours-on is on its other side
        out.insert(1, ("ours-off-b", ours + ["--model", str(base), "--allow-unsafe"], "/ready",
                       {}))
    return out


def _pass_ratios(raw: dict[tuple[str, int], list[LoadResult]] | None, a: str, b: str,
                 c: int) -> str:
    """Throughput ratio of each pass (a's and b's loads of one pass ran back to back), as
    min-max: how much of the combined ratio is the machine's noise."""
    xs, ys = (raw or {}).get((a, c), []), (raw or {}).get((b, c), [])
    ratios = [x.tok_per_s / y.tok_per_s for x, y in zip(xs, ys) if y.tok_per_s]
    if len(ratios) < 2:
        return "-"
    return f"{min(ratios):.3f}-{max(ratios):.3f}"


def _table(results: list[LoadResult],
           raw: dict[tuple[str, int], list[LoadResult]] | None = None) -> str:
    by = {(r.server, r.concurrency): r for r in results}
    lines = ["| server | conc | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
             "ITL p99 ms | CPU ms/tok (HTTP + engine) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        per_tok = 1e3 / max(1, r.output_tokens)
        lines.append(f"| {r.server} | {r.concurrency} | {r.req_per_s:.2f} | {r.tok_per_s:.1f} | "
                     f"{r.ttft_p50*1e3:.0f} | {r.ttft_p99*1e3:.0f} | {r.itl_p50*1e3:.1f} | "
                     f"{r.itl_p99*1e3:.1f} | {r.cpu_ms_per_tok:.1f} "
                     f"({r.cpu_http_s * per_tok:.1f} + {r.cpu_engine_s * per_tok:.1f}) |")
    lines += ["", "| ratio | conc | throughput | per pass | TTFT p50 | ITL p50 | CPU per token |",
              "|---|---|---|---|---|---|---|"]
    for a, b in (("ours-off", "plain"), ("ours-on", "ours-off"), ("ours-on", "plain"),
                 ("ours-off-b", "ours-off")):
        for c in sorted({r.concurrency for r in results}):
            x, y = by.get((a, c)), by.get((b, c))
            if x and y:
                cpu = x.cpu_ms_per_tok / y.cpu_ms_per_tok if y.cpu_ms_per_tok else float("nan")
                lines.append(f"| {a} / {b} | {c} | {x.tok_per_s / y.tok_per_s:.3f} | "
                             f"{_pass_ratios(raw, a, b, c)} | {x.ttft_p50 / y.ttft_p50:.3f} | "
                             f"{x.itl_p50 / y.itl_p50:.3f} | "
                             f"{cpu:.3f} |")
    return "\n".join(lines)


def _mean(results: list[LoadResult]) -> LoadResult:
    """The passes of one server at one level, combined (tokens and time summed)."""
    a = results[0]
    return LoadResult(a.server, a.concurrency, sum(r.requests for r in results),
                      sum(r.seconds for r in results), sum(r.output_tokens for r in results),
                      *(statistics.mean(getattr(r, f) for r in results)
                        for f in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99")),
                      sum(r.cpu_http_s for r in results), sum(r.cpu_engine_s for r in results))


def bench_serve(
    concurrency: str = typer.Option("1,8,32", help="comma-separated concurrency levels"),
    requests_per_level: int = typer.Option(0, help="requests per level and pass (0: 2 x concurrency, min 6)"),
    max_tokens: int = typer.Option(64, help="output tokens per request (ignore_eos)"),
    model: Path = typer.Option(None, help="base model dir (default: embedded SmolLM2)"),
    safe_model: Path = typer.Option(None, help="model dir with a safety head (default: base + default head)"),
    skip_safety: bool = typer.Option(False, help="only plain vs ours-off"),
    port: int = typer.Option(8790, help="first port; servers use port, port+1, ..."),
    out: Path = typer.Option(Path("runs/bench_serve"), help="results folder"),
    passes: int = typer.Option(2, min=1, help="passes per level, alternating server order"),
    control: bool = typer.Option(False, help="add a second ours-off server: the ratio of two "
                                 "identical servers, the run's noise floor"),
):
    """Ours vs plain vLLM, and safety on vs off, measured side by side in one run.

    All servers run at once (idle ones cost little) and are loaded one at a time, level by
    level, in passes of alternating order (A B C, then C B A, ...), so slow drifts of the
    machine's load hit every server alike. Each server's passes are combined."""
    from safeserve.models.checkpoint import has_safety_head
    from safeserve.models.model_store import (
        DEFAULT_HEAD_DIR,
        compose_checkpoint,
        ensure_default_model,
    )

    base = model or ensure_default_model()
    safe = safe_model
    if safe is None and not skip_safety and has_safety_head(DEFAULT_HEAD_DIR):
        safe = compose_checkpoint(base, DEFAULT_HEAD_DIR)
    if safe is None and not skip_safety:
        raise typer.BadParameter("no safety head: pass --safe-model or --skip-safety")
    levels = [int(c) for c in concurrency.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[str, _Proc, dict]] = []
    try:
        for i, (name, cmd, ready, extra) in enumerate(_servers(base, safe, port, [], control)):
            cmd = [c if c != str(port) else str(port + i) for c in cmd]
            typer.echo(f"starting {name} on port {port + i} ...")
            proc = _Proc(cmd, port + i, out / f"{name}.log")
            proc.wait(ready)
            procs.append((name, proc, extra))
        raw: dict[tuple[str, int], list[LoadResult]] = {}
        for c in levels:
            n = requests_per_level or max(6, 2 * c)
            for p in range(passes):
                order = procs if p % 2 == 0 else procs[::-1]
                for name, proc, extra in order:
                    cpu0 = proc.cpu_seconds()
                    r = asyncio.run(run_load(proc.url, "bench", name, c, n, max_tokens, extra))
                    cpu1 = proc.cpu_seconds()
                    r.cpu_http_s, r.cpu_engine_s = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
                    typer.echo(f"  pass {p + 1} {name} c={c}: {r.tok_per_s:.1f} tok/s, TTFT "
                               f"p50 {r.ttft_p50*1e3:.0f} ms, ITL p50 {r.itl_p50*1e3:.1f} ms, "
                               f"CPU {r.cpu_ms_per_tok:.1f} ms/tok")
                    raw.setdefault((name, c), []).append(r)
    finally:
        for _, proc, _ in procs:
            proc.stop()
    results = [_mean(raw[(name, c)]) for c in levels for name, _, _ in procs]
    table = _table(results, raw)
    typer.echo(table)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    (out / "results.md").write_text(table + "\n")


def bench_config(iterations: int = typer.Option(20000, help="requests to time per case")):
    """Per-request cost of safety-config parsing, authorization and compilation."""
    from safeserve.models.taxonomy import Taxonomy
    from safeserve.server.auth import Grant, Principal
    from safeserve.server.safety_config import SafetyPolicy
    from safeserve.server.safety_service import SafetyService
    from safeserve.server.safety_tracker import TelemetryHub

    svc = SafetyService(SafetyPolicy(Taxonomy.load()), TelemetryHub(), lambda: None)
    svc._refusal_ids = list(range(12))  # tokenization happens once per server, not per request
    who = Principal("studio", Grant(presets=["default", "game_development"],
                                    allow=["violence", "weapons"]))
    cases = {
        "no config (default preset)": (None, None),
        "preset in header": ("game_development", None),
        "JSON object in header": ('{"allow": ["violence"], "threshold": {"weapons": 0.3}, '
                                  '"on_violation": "stop", "holdback": true}', None),
        "object in body": (None, {"allow": ["weapons"], "threshold": 0.4, "tau": 2,
                                  "guideline": "Fictional battles are fine."}),
    }
    typer.echo("| case | us / request |\n|---|---|")
    for name, (header, body) in cases.items():
        t0 = time.perf_counter()
        for i in range(iterations):
            req = svc.resolve(header, body)
            svc.authorize(who, req)
            svc.policy.compile(req.config, f"r{i}", svc._refusal_ids, 2)
        us = (time.perf_counter() - t0) / iterations * 1e6
        typer.echo(f"| {name} | {us:.1f} |")


def register(app: typer.Typer) -> None:
    app.command("serve")(bench_serve)
    app.command("config")(bench_config)
    app.command("leak")(bench_leak)
