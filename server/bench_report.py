"""The report of ``safeserve bench serve``: the results table (per server and concurrency, and
the ratios ours/plain, on/off and the control's), the pair-by-pair ratio statistics behind it
(min-max and a geometric mean with a 95% t-interval: over fresh instances with --instances,
else over passes on the same instances, labelled pass-to-pass, as it leaves the spread between
instances out) and the summary of failed requests.
"""

from __future__ import annotations

import math

from safeserve.server.bench_load import LoadResult, _ratio

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


# What the pairs' interval covers: with --instances, fresh instances (their spread included);
# without, passes on the one instance of each server (the spread between instances left out).
CI_FRESH = "95% CI"
CI_PASSES = "95% CI, pass-to-pass"
CI_PASSES_NOTE = ("95% CI, pass-to-pass: passes on one instance pair; instance spread not "
                  "included (--instances N starts fresh instances and includes it)")


def _table(results: list[LoadResult],
           raw: dict[tuple[str, int], list[LoadResult]] | None = None,
           fresh: bool = False) -> str:
    """The results and ratio tables; ``fresh``: the pairs in ``raw`` are rounds of fresh
    instances (--instances), not passes on the same ones."""
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
    ci = CI_FRESH if fresh else CI_PASSES
    lines += ["", f"| ratio | conc | throughput | pairs: min-max | pairs: geo-mean [{ci}] | "
              "TTFT p50 | ITL p50 | CPU per token |",
              "|---|---|---|---|---|---|---|---|"]
    intervals = False
    for a, b in (("ours-off", "plain"), ("ours-on", "ours-off"), ("ours-on", "plain"),
                 ("ours-off-b", "ours-off")):
        for c in sorted({r.concurrency for r in results}):
            x, y = by.get((a, c)), by.get((b, c))
            if x and y:
                intervals |= len(_pair_ratios(raw, a, b, c)) >= 2
                lines.append(f"| {a} / {b} | {c} | {_ratio(x.tok_per_s, y.tok_per_s):.3f} | "
                             f"{_pass_ratios(raw, a, b, c)} | "
                             f"{_pair_interval(raw, a, b, c)} | "
                             f"{_ratio(x.ttft_p50, y.ttft_p50):.3f} | "
                             f"{_ratio(x.itl_p50, y.itl_p50):.3f} | "
                             f"{_ratio(x.cpu_ms_per_tok, y.cpu_ms_per_tok):.3f} |")
    if intervals and not fresh:
        lines += ["", CI_PASSES_NOTE]
    return "\n".join(lines)


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
