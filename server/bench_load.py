"""The HTTP load of ``safeserve bench serve``: streaming chat completions sent at a fixed
concurrency to one OpenAI-compatible server, and the figures of a load (``LoadResult``):
throughput, TTFT and inter-token latency percentiles, failed requests. A request that fails (an
HTTP error, an error event in its stream, a stream cut short, a stream without its usage chunk,
or, under ``ignore_eos``, fewer or more tokens than ``max_tokens``) counts as failed, not as a
fast success; failed requests add no tokens and no latencies.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field

import httpx

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
    ttft, last, gaps, tokens, done = None, None, [], None, False
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
                return StreamResult(float("nan"), gaps, tokens or 0,
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
        return StreamResult(float("nan"), gaps, tokens or 0, "stream ended without [DONE]")
    if tokens is None:  # asked for (include_usage): without it the tokens are unknown
        return StreamResult(float("nan"), gaps, 0, "stream without a usage chunk")
    if body.get("ignore_eos") and tokens != max_tokens:
        # every request is to generate max_tokens: a shorter one is no fast success
        return StreamResult(float("nan"), gaps, tokens,
                            f"{tokens} of {max_tokens} tokens under ignore_eos")
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
