"""``safeserve bench serve``: one run, several servers on the same model, the same load.

Servers (by default all started at once, then loaded one at a time, so a load never shares
the CPU with another; idle engines cost little):
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
N pairs of instances: its geometric mean with a 95% interval.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
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

# The engine settings every server runs with, on its command line: plain vLLM's CLI and ours
# have different defaults, and the comparison is of the servers, not of their defaults.
ENGINE_DTYPE = "float32"
MAX_MODEL_LEN = 2048
KV_CACHE_GIB = 1
MAX_NUM_SEQS = 64
# Ours pins vLLM's V1 model runner (server/engine.py); plain vLLM must run the same one.
ENGINE_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
# A location, not a setting: kept in the servers' environment.
KEPT_SAFESERVE_ENV = {"SAFESERVE_CACHE_DIR"}
ERROR_EXAMPLES = 5


@dataclass
class LoadResult:
    server: str
    concurrency: int
    requests: int  # sent; `failed` of them did not complete
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
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # the first few failures, as reported
    # The samples behind the percentiles: passes are combined by pooling them, since the
    # mean of per-pass p99s is no p99.
    ttfts: list[float] = field(default_factory=list, repr=False)
    itls: list[float] = field(default_factory=list, repr=False)

    @property
    def completed(self) -> int:
        return self.requests - self.failed

    @property
    def req_per_s(self) -> float:
        return _ratio(self.completed, self.seconds)

    @property
    def tok_per_s(self) -> float:
        return _ratio(self.output_tokens, self.seconds)

    @property
    def cpu_ms_per_tok(self) -> float:
        return 1e3 * (self.cpu_http_s + self.cpu_engine_s) / max(1, self.output_tokens)

    def summary(self) -> dict:
        """The figures, without the samples (what the results files keep)."""
        return {k: v for k, v in asdict(self).items() if k not in ("ttfts", "itls")}


@dataclass
class StreamResult:
    ttft: float
    gaps: list[float]
    tokens: int
    error: str | None = None  # None: the stream completed


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if not math.isnan(x))  # a request without a token has no TTFT
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _ratio(a: float, b: float) -> float:
    """a / b, NaN where b is zero or NaN (a server that produced nothing has no ratio)."""
    if not b or math.isnan(b):
        return float("nan")
    return a / b


def _error_text(err) -> str:
    """The message of an OpenAI-style error body (``{"message": ...}``), else the body."""
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


async def _one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
               extra: dict) -> StreamResult:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    ttft, last, gaps, tokens, done = None, None, [], 0, False
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode("utf-8", "replace")
            try:
                text = _error_text(json.loads(text).get("error", text))
            except (ValueError, AttributeError):
                pass
            return StreamResult(float("nan"), [], 0, f"HTTP {r.status_code}: {text[:300]}")
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            if not line.startswith("data: ") or done:
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # a failure after the 200: the stream ends with this event
                return StreamResult(float("nan"), gaps, tokens,
                                    f"error event: {_error_text(chunk['error'])[:300]}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                else:
                    gaps.append(now - last)
                last = now
    if not done:
        return StreamResult(float("nan"), gaps, tokens, "stream ended without [DONE]")
    return StreamResult(float("nan") if ttft is None else ttft, gaps, tokens)


def _load_result(name: str, concurrency: int, seconds: float, outcomes: list) -> LoadResult:
    """One load's figures from its requests' outcomes (StreamResults, or the exceptions the
    requests raised). Failed requests add no tokens and no latencies."""
    ok = [o for o in outcomes if isinstance(o, StreamResult) and o.error is None]
    errors = [o.error if isinstance(o, StreamResult) else f"{type(o).__name__}: {o}"
              for o in outcomes if not (isinstance(o, StreamResult) and o.error is None)]
    ttfts = [o.ttft for o in ok]
    itls = [g for o in ok for g in o.gaps]
    return LoadResult(name, concurrency, len(outcomes), seconds, sum(o.tokens for o in ok),
                      _pct(ttfts, .5), _pct(ttfts, .99), _pct(itls, .5), _pct(itls, .99),
                      failed=len(errors), errors=errors[:ERROR_EXAMPLES], ttfts=ttfts, itls=itls)


async def run_load(url: str, model: str, name: str, concurrency: int, requests: int,
                   max_tokens: int, extra: dict,
                   transport: httpx.AsyncBaseTransport | None = None) -> LoadResult:
    if concurrency < 1 or requests < 1:
        raise ValueError("concurrency and requests must be >= 1")
    sem = asyncio.Semaphore(concurrency)
    # httpx keeps at most 100 connections by default: enough for every request in flight
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
                                 transport=transport) as client:
        warm = await _one(client, model, PROMPTS[0], 4, extra)
        if warm.error:
            raise RuntimeError(f"{name}: the warm-up request failed: {warm.error}")

        async def task(i):
            async with sem:
                return await _one(client, model, PROMPTS[i % len(PROMPTS)], max_tokens, extra)

        t0 = time.perf_counter()
        # return_exceptions: one broken request is a failure to count, not the end of the load
        outcomes = await asyncio.gather(*(task(i) for i in range(requests)),
                                        return_exceptions=True)
        seconds = time.perf_counter() - t0
    return _load_result(name, concurrency, seconds, list(outcomes))


def _child_env(extra: dict | None = None) -> dict:
    """A server's environment: the bench's, less the operator's ``SAFESERVE_*`` settings
    (they would configure ours and not plain, e.g. SAFESERVE_SAFETY_HEAD would put a head
    on ours-off), plus ``extra`` (the engine settings every server shares)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SAFESERVE_") or k in KEPT_SAFESERVE_ENV}
    return {**env, **(extra or {})}


class _Proc:
    def __init__(self, cmd: list[str], port: int, log: Path, env: dict | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env=_child_env(env))

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


def _servers(base: Path, safe: Path | None, port: int,
             control: bool = False) -> list[tuple[str, list[str], str, dict, dict]]:
    """(name, command, readiness path, request body extras, environment) of each server, in
    load order; server i listens on port + i."""
    py = sys.executable
    safeserve = str(Path(py).with_name("safeserve"))
    plain = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
             "--served-model-name", "bench", "--dtype", ENGINE_DTYPE,
             "--max-model-len", str(MAX_MODEL_LEN),
             "--kv-cache-memory-bytes", str(KV_CACHE_GIB << 30),
             "--max-num-seqs", str(MAX_NUM_SEQS)]
    ours = [safeserve, "serve", "--served-model-name", "bench", "--dtype", ENGINE_DTYPE,
            "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-gib", str(KV_CACHE_GIB),
            "--max-num-seqs", str(MAX_NUM_SEQS)]
    out = [("plain", plain, "/health", {}, ENGINE_ENV),
           ("ours-off", ours + ["--model", str(base), "--allow-unsafe"], "/ready", {},
            ENGINE_ENV)]
    if safe is not None:
        out.append(("ours-on", ours + ["--model", str(safe)], "/ready",
                    {"safety_config": {"on_violation": "annotate"}}, ENGINE_ENV))
    if control:  # next to ours-off in the load order, as ours-on is on its other side
        out.insert(1, ("ours-off-b", ours + ["--model", str(base), "--allow-unsafe"], "/ready",
                       {}, ENGINE_ENV))
    return [(name, cmd + ["--port", str(port + i)], ready, extra, env)
            for i, (name, cmd, ready, extra, env) in enumerate(out)]


# Student's t, two-sided 95%, by degrees of freedom (a larger df reads 1.96)
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def _pair_ratios(raw: dict[tuple[str, int], list[LoadResult]] | None, a: str, b: str,
                 c: int) -> list[float]:
    """a's throughput over b's, pair by pair: a pair is one pass (all servers up, loaded back
    to back) or, with --instances, one round of fresh instances."""
    xs, ys = (raw or {}).get((a, c), []), (raw or {}).get((b, c), [])
    return [x.tok_per_s / y.tok_per_s for x, y in zip(xs, ys) if y.tok_per_s and x.tok_per_s]


def geometric_interval(ratios: list[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high) of ratios, the bounds a 95% t-interval on their logs: a
    ratio and its inverse are the same distance from 1."""
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean = sum(logs) / n
    if n < 2:
        return math.exp(mean), float("nan"), float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = (_T95[n - 2] if n - 2 < len(_T95) else 1.96) * sd / math.sqrt(n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def _pass_ratios(raw: dict[tuple[str, int], list[LoadResult]] | None, a: str, b: str,
                 c: int) -> str:
    """The pairs' ratios as min-max: how much of the combined ratio is the machine's noise."""
    ratios = _pair_ratios(raw, a, b, c)
    if len(ratios) < 2:
        return "-"
    return f"{min(ratios):.3f}-{max(ratios):.3f}"


def _pair_interval(raw: dict[tuple[str, int], list[LoadResult]] | None, a: str, b: str,
                   c: int) -> str:
    ratios = _pair_ratios(raw, a, b, c)
    if len(ratios) < 2:
        return "-"
    mean, lo, hi = geometric_interval(ratios)
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}] (n={len(ratios)})"


def _table(results: list[LoadResult],
           raw: dict[tuple[str, int], list[LoadResult]] | None = None) -> str:
    by = {(r.server, r.concurrency): r for r in results}
    lines = ["| server | conc | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
             "ITL p99 ms | CPU ms/tok (HTTP + engine) | failed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        per_tok = 1e3 / max(1, r.output_tokens)
        lines.append(f"| {r.server} | {r.concurrency} | {r.req_per_s:.2f} | {r.tok_per_s:.1f} | "
                     f"{r.ttft_p50*1e3:.0f} | {r.ttft_p99*1e3:.0f} | {r.itl_p50*1e3:.1f} | "
                     f"{r.itl_p99*1e3:.1f} | {r.cpu_ms_per_tok:.1f} "
                     f"({r.cpu_http_s * per_tok:.1f} + {r.cpu_engine_s * per_tok:.1f}) | "
                     f"{r.failed} / {r.requests} |")
    lines += ["", "| ratio | conc | throughput | pairs: min-max | pairs: geo-mean [95% CI] | "
              "TTFT p50 | ITL p50 | CPU per token |",
              "|---|---|---|---|---|---|---|---|"]
    for a, b in (("ours-off", "plain"), ("ours-on", "ours-off"), ("ours-on", "plain"),
                 ("ours-off-b", "ours-off")):
        for c in sorted({r.concurrency for r in results}):
            x, y = by.get((a, c)), by.get((b, c))
            if x and y:
                lines.append(f"| {a} / {b} | {c} | {_ratio(x.tok_per_s, y.tok_per_s):.3f} | "
                             f"{_pass_ratios(raw, a, b, c)} | "
                             f"{_pair_interval(raw, a, b, c)} | "
                             f"{_ratio(x.ttft_p50, y.ttft_p50):.3f} | "
                             f"{_ratio(x.itl_p50, y.itl_p50):.3f} | "
                             f"{_ratio(x.cpu_ms_per_tok, y.cpu_ms_per_tok):.3f} |")
    return "\n".join(lines)


def _mean(results: list[LoadResult]) -> LoadResult:
    """The passes of one server at one level, combined: requests, tokens, time and CPU
    summed, percentiles over all passes' samples pooled."""
    a = results[0]
    ttfts = [x for r in results for x in r.ttfts]
    itls = [x for r in results for x in r.itls]
    return LoadResult(a.server, a.concurrency, sum(r.requests for r in results),
                      sum(r.seconds for r in results), sum(r.output_tokens for r in results),
                      _pct(ttfts, .5), _pct(ttfts, .99), _pct(itls, .5), _pct(itls, .99),
                      sum(r.cpu_http_s for r in results), sum(r.cpu_engine_s for r in results),
                      failed=sum(r.failed for r in results),
                      errors=[e for r in results for e in r.errors][:ERROR_EXAMPLES],
                      ttfts=ttfts, itls=itls)


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


def _failure_report(results: list[LoadResult]) -> str | None:
    """A loud summary of the failed requests, or None when every request completed."""
    failed = [r for r in results if r.failed]
    if not failed:
        return None
    lines = [f"FAILED: {sum(r.failed for r in failed)} of {sum(r.requests for r in results)} "
             "requests did not complete; their servers' figures count only the rest:"]
    for r in failed:
        lines.append(f"  {r.server} c={r.concurrency}: {r.failed} / {r.requests} failed, e.g. "
                     f"{r.errors[0] if r.errors else '?'}")
    return "\n".join(lines)


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


def _run_kept(servers, levels, passes, max_tokens, requests_per_level, out, raw) -> None:
    """Every server up at once, loaded one at a time, passes of alternating order."""
    procs: list[tuple[str, _Proc, dict]] = []
    try:
        for name, cmd, ready, extra, env in servers:
            port = int(cmd[cmd.index("--port") + 1])
            procs.append((name, _start(name, cmd, port, ready, env, out / f"{name}.log"), extra))
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
                top = max(levels)  # not measured: the first batches of a fresh engine
                asyncio.run(run_load(proc.url, "bench", name, top, max(6, top), 16, extra))
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
    table = _table(results, raw)
    typer.echo(table)
    (out / "results.md").write_text(table + "\n")
    if failures := _failure_report(results):
        typer.secho(failures, err=True, fg=typer.colors.RED, bold=True)
        raise typer.Exit(1)


def _config_cases() -> dict[str, tuple[str | None, dict | None]]:
    """(X-Safety-Config header, body safety_config) of each timed case."""
    return {
        "no config (default preset)": (None, None),
        "preset in header": ("game_development", None),
        "JSON object in header": ('{"allow": ["violence"], "threshold": {"weapons": 0.3}, '
                                  '"on_violation": "stop", "holdback": true}', None),
        "object in body": (None, {"allow": ["weapons"], "threshold": 0.4, "tau": 2,
                                  "guideline": "Fictional battles are fine."}),
    }


def config_timings(iterations: int) -> list[tuple[str, float]]:
    """(case, microseconds per request) of parsing, authorizing and compiling each case's
    config, as a key with a grant that allows every case."""
    from safeserve.models.taxonomy import Taxonomy
    from safeserve.server.auth import Grant, Principal
    from safeserve.server.safety_config import SafetyPolicy
    from safeserve.server.safety_service import SafetyService
    from safeserve.server.safety_tracker import TelemetryHub

    svc = SafetyService(SafetyPolicy(Taxonomy.load()), TelemetryHub(), lambda: None)
    svc._refusal_ids = list(range(12))  # tokenization happens once per server, not per request
    # guideline: the body case brings its own, which a grant must allow (server/auth.py)
    who = Principal("studio", Grant(presets=["default", "game_development"],
                                    allow=["violence", "weapons"], guideline=True))
    rows = []
    for name, (header, body) in _config_cases().items():
        t0 = time.perf_counter()
        for i in range(iterations):
            req = svc.resolve(header, body)
            svc.authorize(who, req)
            svc.policy.compile(req.config, f"r{i}", svc._refusal_ids, 2)
        rows.append((name, (time.perf_counter() - t0) / iterations * 1e6))
    return rows


def bench_config(iterations: int = typer.Option(20000, min=1, help="requests to time per case")):
    """Per-request cost of safety-config parsing, authorization and compilation."""
    typer.echo("| case | us / request |\n|---|---|")
    for name, us in config_timings(iterations):
        typer.echo(f"| {name} | {us:.1f} |")


def register(app: typer.Typer) -> None:
    app.command("serve")(bench_serve)
    app.command("config")(bench_config)
    app.command("leak")(bench_leak)
