"""Per-step cost of the safety kernels: the fused head, the decision (with the prompt offset
and the prompt verdict's thresholds), the decoding strategy and the forcing.

    python -m safeserve.kernels.bench --batch 256 --hidden 4096 --categories 9 --dtype bfloat16
    python -m safeserve.kernels.bench ... --mlp-units 128     # the head with its residual MLP

On CUDA it times the Triton launchers with CUDA events (and the PyTorch references beside
them for comparison). On CPU there is no compiled Triton, so it times the reference path
(what a CPU server runs) with a wall clock, and the report says so.

The head is a skinny GEMM (K is ~10), so its floor is memory traffic, not FLOPs:
    bytes = N*H*elem(hidden) + K*H*4 (weight) + N*K*4 (scores)
and achieved GB/s = bytes / time is the figure to compare with the device's bandwidth: the
report gives bound_us = bytes / peak (``--peak-gbs``; on CUDA a guess from the device's name
when not given) and head_us / bound_us. On CUDA successive launches read different `hidden`
buffers from a pool larger than the L2 cache (``--pool-mib``), as an engine step reads a fresh
batch: one buffer read back to back would be served from L2 and measure the cache. The timed
loop launches each kernel from Python (no CUDA graph): where head_us sits far above bound_us
for a small batch, the launch overhead rather than the bandwidth may be the floor.
The residual MLP adds M*H*4 + M*4 + K*M*4 bytes of weights and 2*N*H*M FLOPs: still a read
of `hidden` plus small weights for M in the hundreds.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Callable, Iterator

import torch
from safeserve.kernels.safety_decision import MASK_ATTRIBUTED, decide, decide_reference
from safeserve.kernels.safety_head import (
    _use_triton,
    safety_scores,
    safety_scores_reference,
)
from safeserve.kernels.safety_strategy import (
    REPORT_COLUMNS,
    advance_strategy,
    advance_strategy_reference,
    force_tokens,
    force_tokens_reference,
)

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Peak DRAM bandwidth (GB/s) by a substring of the device name, first match wins: a guess for
# the usual parts (SXM figures), to be overridden with --peak-gbs.
_PEAK_GBS = (("H200", 4800.0), ("H100", 3350.0), ("A100", 2039.0))
# A pool of `hidden` buffers at least this large outgrows the L2 cache (50 MB on H100 / H200,
# 40 MB on A100), so each timed launch reads its input from DRAM.
DEFAULT_POOL_MIB_CUDA = 256
# Launches captured in one CUDA graph for the overhead-free timing (each reads its own buffer):
# at least this many, and enough that together they read twice the L2 cache.
MIN_GRAPH_LAUNCHES = 128


def _graph_buffers(pool: list[torch.Tensor]) -> list[torch.Tensor]:
    """The first buffers of `pool` that one graph's launches read: past the L2 cache."""
    nbytes = pool[0].numel() * pool[0].element_size()
    l2_bytes = torch.cuda.get_device_properties(pool[0].device).L2_cache_size
    return pool[: max(MIN_GRAPH_LAUNCHES, math.ceil(2 * l2_bytes / max(nbytes, 1)))]


def guess_peak_gbs(device_name: str) -> float | None:
    return next((gbs for key, gbs in _PEAK_GBS if key in device_name), None)


def _hidden_pool(first: torch.Tensor, pool_mib: float, gen_seed: int = 1) -> list[torch.Tensor]:
    """`first` and as many more buffers of its shape as make up `pool_mib` MiB in all."""
    nbytes = first.numel() * first.element_size()
    count = max(1, math.ceil(pool_mib * (1 << 20) / nbytes))
    if count == 1:
        return [first]
    # One allocation, filled in one pass, cut into views: a small batch needs 10^5 buffers,
    # which one randn each would take minutes to make.
    gen = torch.Generator(device=first.device).manual_seed(gen_seed)
    rest = torch.randn((count - 1, *first.shape), generator=gen, device=first.device,
                       dtype=torch.float32).to(first.dtype)
    return [first, *rest.unbind(0)]


def _time_cuda_us(step: Callable[[], object], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000.0 / iters


def _time_cuda_graph_us(launches: list[Callable[[], object]], iters: int) -> float:
    """Per-launch GPU time with no launch overhead: `launches` captured once into a CUDA graph
    (each may read a different buffer), replayed `iters` times."""
    for launch in launches[:2]:  # compile and warm outside the capture
        launch()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for launch in launches:
                launch()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000.0 / (iters * len(launches))


def _time_cpu_us(step: Callable[[], object], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - started) * 1e6 / iters


def _head_params(hidden: int, n_cats: int, mlp_units: int, mlp_gate: bool,
                 gen: torch.Generator, device: torch.device) -> tuple:
    """Random head weights at a served head's scale: (weight, bias, mlp or None); with
    ``mlp_gate`` the MLP carries a gate (the default head's form, gated by a prompt-end
    read-out)."""
    weight = (torch.randn(n_cats, hidden, generator=gen) / hidden**0.5).to(device)
    bias = torch.randn(n_cats, generator=gen).to(device)
    if not mlp_units:
        return weight, bias, None
    mlp = ((torch.randn(mlp_units, hidden, generator=gen) / hidden**0.5).to(device),
           torch.randn(mlp_units, generator=gen).to(device),
           (torch.randn(n_cats, mlp_units, generator=gen) / mlp_units**0.5).to(device))
    if mlp_gate:
        mlp += ((torch.randn(hidden + 1, generator=gen) / hidden**0.5).to(device),)
    return weight, bias, mlp


def _strategy_tables(batch: int, gen: torch.Generator, device: torch.device):
    """Strategy state for ``batch`` rows, as a busy server holds it: most rows watching, some
    forcing a refusal or explaining one (kernels/safety_strategy.StrategyTables)."""
    from types import SimpleNamespace

    def ints(low: int, high: int) -> torch.Tensor:
        return torch.randint(low, high, (batch,), generator=gen, dtype=torch.int32).to(device)

    phase = torch.where(torch.rand(batch, generator=gen) < 0.8, 0, 2).to(torch.int32)
    return SimpleNamespace(
        action=torch.ones(batch, dtype=torch.int32, device=device), phase=phase.to(device),
        origin=ints(0, 40), counter=ints(0, 3), refusal_len=ints(8, 16),
        refusal_start=ints(0, 2), query_cats=torch.zeros(batch, dtype=torch.int32, device=device),
        query_alert=torch.zeros(batch, dtype=torch.int32, device=device), alert=ints(0, 2),
        explain_left=ints(-1, 3), explain_cap=ints(-1, 120), seen_word=ints(0, 2),
        read_len=ints(0, 40), active=torch.ones(batch, dtype=torch.int8, device=device),
        eos=torch.full((batch,), 2, dtype=torch.int64, device=device),
        refusal=torch.randint(3, 1000, (batch, 48), generator=gen).to(device),
    )


def run_benchmark(
    batch: int = 256,
    hidden: int = 4096,
    categories: int = 9,
    dtype: str = "bfloat16",
    iters: int = 200,
    mlp_units: int = 0,
    mlp_gate: bool = False,
    peak_gbs: float | None = None,
    pool_mib: float | None = None,
) -> dict:
    """Time one engine step of each kernel; returns a flat dict of results.

    `categories` excludes the overall 'unsafe' column, so the head has K = categories + 1.
    `peak_gbs`: the device's DRAM bandwidth (None: guessed from a CUDA device's name; none on
    CPU). `pool_mib`: size of the pool of `hidden` buffers the head cycles through (None:
    256 MiB on CUDA, one buffer on CPU).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
    if batch < 1 or hidden < 1 or categories < 0 or iters < 1 or mlp_units < 0:
        raise ValueError("batch, hidden and iters must be >= 1, categories and mlp_units >= 0")
    if (peak_gbs is not None and peak_gbs <= 0) or (pool_mib is not None and pool_mib < 0):
        raise ValueError("peak_gbs must be > 0 and pool_mib >= 0")
    torch_dtype = _DTYPES[dtype]
    n_cats = categories + 1
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    gen = torch.Generator(device="cpu").manual_seed(0)

    hidden_states = torch.randn(batch, hidden, generator=gen).to(device=device, dtype=torch_dtype)
    if pool_mib is None:
        pool_mib = DEFAULT_POOL_MIB_CUDA if on_cuda else 0
    pool = _hidden_pool(hidden_states, pool_mib)
    next_hidden = itertools.cycle(pool).__next__
    weight, bias, mlp = _head_params(hidden, n_cats, mlp_units, mlp_gate, gen, device)
    scores = torch.empty(batch, n_cats, device=device)

    # Decision state sized to the batch (R = N), a realistic prompt/decode mix.
    thresholds = torch.rand(batch, n_cats, generator=gen).to(device)
    masked = (torch.rand(batch, n_cats, generator=gen) < 0.2).to(torch.int8).to(device)
    # Rows with an allow-list run the overall column "attributed" (the server's MASK_ATTRIBUTED)
    masked[:, -1] = torch.where(masked[:, :-1].any(dim=1), MASK_ATTRIBUTED, 0).to(torch.int8)
    counter = torch.zeros(batch, dtype=torch.int32, device=device)
    tau = torch.full((batch,), 3, dtype=torch.int32, device=device)
    is_prompt = (torch.rand(batch, generator=gen) < 0.1).to(torch.int8).to(device)
    active = torch.ones(batch, dtype=torch.int8, device=device)
    event = torch.empty(batch, dtype=torch.int32, device=device)
    cats = torch.empty(batch, dtype=torch.int32, device=device)
    decide_args = (scores, thresholds, masked, counter, tau, is_prompt, active)
    # The alert band as the server runs it (every row carries one; the default head's width)
    band = dict(alert=torch.zeros(batch, dtype=torch.int32, device=device),
                alert_tau=torch.full((batch,), 2, dtype=torch.int32, device=device),
                alert_scale=torch.full((batch,), math.exp(0.5), device=device))

    def head_step():  # each launch reads the next buffer of the pool: DRAM, not L2
        return safety_scores(next_hidden(), weight, bias, out=scores, mlp=mlp)

    prompt_thresholds = torch.rand(batch, n_cats, generator=gen).to(device)

    # As the server runs it, with the default head's prompt offset (+2 logits). The lift moves
    # `scores` in place, so prompt rows saturate over the iterations; the kernel does not
    # branch on values, so the time per step holds.
    def decide_step():
        return decide(*decide_args, event=event, cats=cats, **band,
                      prompt_thresholds=prompt_thresholds, prompt_lift=math.exp(2.0))

    tables = _strategy_tables(batch, gen, device)
    out_len = torch.where(is_prompt.bool(), 0, torch.randint(1, 96, (batch,), generator=gen)
                          .to(device)).to(torch.int32)
    last = torch.stack([torch.randint(0, 1000, (batch,), generator=gen).to(device),
                        out_len.long()])  # (last token, known tokens)
    vocab = tuple((torch.rand(1000, generator=gen) < p).to(device) for p in (0.1, 0.8))
    report = torch.zeros(batch, n_cats + REPORT_COLUMNS, dtype=torch.float64, device=device)

    # Forcing (GPU form) over a 32k vocabulary with 5% of the rows forced (a refusal or a stop).
    logits = torch.randn(batch, 32000, generator=gen).to(device)
    forced = torch.where(torch.rand(batch, generator=gen) < 0.05,
                         torch.randint(0, 32000, (batch,), generator=gen), -1).to(device)

    def strategy_step(advance=advance_strategy):  # the worker's strategy after the decision
        decide_step()
        return advance(tables, event, cats, out_len, last, vocab, report)

    warmup = max(3, min(20, iters // 10))
    timer = _time_cuda_us if on_cuda else _time_cpu_us
    head_step()  # fills `scores` for the decision and compiles on first use
    head_us = timer(head_step, iters, warmup)
    decide_us = timer(decide_step, iters, warmup)
    # decision + strategy, minus the decision alone: the strategy's own share of the step
    strategy_us = max(0.0, timer(strategy_step, iters, warmup) - decide_us)
    # (CUDA only: off-GPU the server forces through a host sync, touching forced rows only)
    force_us = timer(lambda: force_tokens(logits, forced), iters, warmup) if on_cuda else 0.0

    elem = hidden_states.element_size()
    head_bytes = batch * hidden * elem + n_cats * hidden * 4 + batch * n_cats * 4
    head_bytes += (mlp_units * hidden + mlp_units + n_cats * mlp_units) * 4
    head_bytes += (hidden + 1) * 4 if mlp_units and mlp_gate else 0
    device_name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    if peak_gbs is None and on_cuda:
        peak_gbs = guess_peak_gbs(device_name)
    result = {
        "device": device_name,
        "path": "triton" if _use_triton(hidden_states) else "reference (PyTorch; no Triton on CPU)",
        "timer": "cuda events" if on_cuda else "wall clock",
        "batch": batch,
        "hidden": hidden,
        "categories": n_cats,
        "mlp_units": mlp_units,
        "mlp_gate": bool(mlp_units and mlp_gate),
        "dtype": dtype,
        "iters": iters,
        "hidden_buffers": len(pool),
        "hidden_pool_mib": len(pool) * hidden_states.numel() * elem / (1 << 20),
        "head_us": head_us,
        "head_bytes": head_bytes,
        "head_gb_s": head_bytes / (head_us * 1e-6) / 1e9,
        "decide_us": decide_us,
        "strategy_us": strategy_us,
        "force_us": force_us,
        "step_us": head_us + decide_us + strategy_us + force_us,
    }
    if peak_gbs:
        bound_us = head_bytes / (peak_gbs * 1e9) * 1e6  # the head's memory-traffic floor
        result.update(peak_gb_s=peak_gbs, bound_us=bound_us, head_over_bound=head_us / bound_us)
    if on_cuda:
        # The kernels' own GPU time, launch overhead taken out (a CUDA graph of launches over
        # distinct pool buffers): what the step costs where launches queue ahead of the GPU.
        graph_pool = _graph_buffers(pool)
        head_graph_us = _time_cuda_graph_us(
            [lambda h=h: safety_scores(h, weight, bias, out=scores, mlp=mlp) for h in graph_pool],
            max(1, iters // 10),
        )
        decide_graph_us = _time_cuda_graph_us([decide_step] * 64, max(1, iters // 10))
        strategy_graph_us = _time_cuda_graph_us(
            [lambda: advance_strategy(tables, event, cats, out_len, last, vocab, report)] * 64,
            max(1, iters // 10))
        result.update(
            head_graph_us=head_graph_us,
            head_graph_pool_mib=len(graph_pool) * hidden_states.numel() * elem / (1 << 20),
            head_graph_gb_s=head_bytes / (head_graph_us * 1e-6) / 1e9,
            decide_graph_us=decide_graph_us,
            strategy_graph_us=strategy_graph_us,
        )
        if peak_gbs:
            result.update(head_graph_over_bound=head_graph_us / result["bound_us"])
        # The PyTorch references on the same device: what the kernels are meant to beat.
        ref_head_us = timer(
            lambda: safety_scores_reference(next_hidden(), weight, bias, mlp), iters, warmup
        )
        ref_decide_args = (scores, thresholds, masked, counter.clone(), tau, is_prompt, active,
                           band["alert"].clone(), band["alert_tau"], band["alert_scale"],
                           prompt_thresholds, math.exp(2.0))
        ref_decide_us = timer(lambda: decide_reference(*ref_decide_args), iters, warmup)
        # the strategy as the ~60 tensor ops it was before its kernel (each a launch)
        ref_strategy_us = max(0.0, timer(lambda: strategy_step(advance_strategy_reference),
                                         iters, warmup) - decide_us)
        result.update(
            ref_head_us=ref_head_us,
            ref_head_gb_s=head_bytes / (ref_head_us * 1e-6) / 1e9,
            ref_decide_us=ref_decide_us,
            ref_strategy_us=ref_strategy_us,
            ref_force_us=timer(lambda: force_tokens_reference(logits, forced), iters, warmup),
            ref_over_head=ref_head_us / head_us,
        )
    return result


def sweep_head(
    batch: int = 256,
    hidden: int = 4096,
    categories: int = 9,
    dtype: str = "bfloat16",
    mlp_units: int = 0,
    mlp_gate: bool = False,
    replays: int = 5,
) -> Iterator[dict]:
    """CUDA only: the head kernel split over H or not, at each tile shape (BLOCK_N, BLOCK_H)
    and warp count it can take at this shape, each checked against the reference (max abs error) and
    timed in a CUDA graph over a pool beyond L2. Yields one row per configuration as measured."""
    if not torch.cuda.is_available():
        raise RuntimeError("the sweep times compiled kernels: it needs a CUDA device")
    from safeserve.kernels.safety_head import (
        HEAD_DOT_PRECISION,
        _head_blocks,
        _next_pow2,
        _safety_scores_triton,
    )

    device = torch.device("cuda")
    n_cats = categories + 1
    gen = torch.Generator(device="cpu").manual_seed(0)
    first = torch.randn(batch, hidden, generator=gen).to(device=device, dtype=_DTYPES[dtype])
    pool = _graph_buffers(_hidden_pool(first, DEFAULT_POOL_MIB_CUDA))
    weight, bias, mlp = _head_params(hidden, n_cats, mlp_units, mlp_gate, gen, device)
    expected = safety_scores_reference(first, weight, bias, mlp)
    out = torch.empty(batch, n_cats, device=device)
    _, default_h, block_k, block_m = _head_blocks(hidden, n_cats, mlp_units)
    default = (True, HEAD_DOT_PRECISION, 16, default_h, 4)
    # "ieee" (exact fp32 on the FMA units) ran 2-5x slower than "tf32x3" at every tile on an
    # H200 (2026-12-04), and 64-row tiles with the MLP hit an illegal address in Triton 3.6's
    # code: neither is swept.
    shapes = itertools.product((True, False), (HEAD_DOT_PRECISION,), (16, 32), (32, 64, 128),
                               (4, 8))
    for split, precision, block_n, block_h, warps in shapes:
        # Register budget: the hidden tile and the widest weight tile stay <= 64 KiB of fp32.
        if block_n * block_h > 16384 or block_h * max(block_k, block_m) > 16384:
            continue
        if block_h > max(16, _next_pow2(hidden)):
            continue

        def launch(h, blocks=(block_n, block_h), warps=warps, precision=precision,
                   split=split):
            _safety_scores_triton(h, weight, bias, out, mlp, blocks=blocks, num_warps=warps,
                                  precision=precision, split=split)

        launch(first)
        error = (out - expected).abs().max().item()
        graph_us = _time_cuda_graph_us([lambda h=h: launch(h) for h in pool], replays)
        yield dict(split=split, precision=precision, block_n=block_n, block_h=block_h,
                   num_warps=warps,
                   launcher_default=(split, precision, block_n, block_h, warps) == default,
                   graph_us=graph_us, max_abs_err=error)


_LABELS = {
    "device": "device",
    "path": "path",
    "timer": "timer",
    "batch": "batch (N)",
    "hidden": "hidden (H)",
    "categories": "head outputs (K)",
    "mlp_units": "residual MLP units (M)",
    "dtype": "hidden dtype",
    "iters": "iterations",
    "hidden_buffers": "hidden buffers the head cycles through",
    "hidden_pool_mib": "hidden pool MiB",
    "head_us": "head us/step",
    "head_bytes": "head bytes moved",
    "head_gb_s": "head achieved GB/s",
    "decide_us": "decision us/step",
    "strategy_us": "strategy us/step (decision + strategy, less the decision)",
    "force_us": "forcing us/step (32k vocabulary, 5% of rows forced; CUDA only)",
    "step_us": "head + decision + strategy + forcing us/step",
    "peak_gb_s": "peak DRAM GB/s (--peak-gbs or guessed)",
    "bound_us": "head bound us (bytes / peak)",
    "head_over_bound": "head us / bound us",
    "head_graph_us": "head us/step in a CUDA graph (no launch overhead)",
    "head_graph_pool_mib": "hidden MiB the graph's launches read",
    "head_graph_gb_s": "head achieved GB/s in a CUDA graph",
    "decide_graph_us": "decision us/step in a CUDA graph",
    "strategy_graph_us": "strategy us/step in a CUDA graph",
    "head_graph_over_bound": "head graph us / bound us",
    "ref_head_us": "reference head us/step",
    "ref_head_gb_s": "reference head GB/s",
    "ref_decide_us": "reference decision us/step",
    "ref_strategy_us": "reference strategy us/step (tensor ops)",
    "ref_force_us": "reference forcing us/step (a pass over all the logits)",
    "ref_over_head": "reference head us / head us",
}


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _print_table(result: dict, plain: bool) -> None:
    rows = [(_LABELS.get(key, key), _format(value)) for key, value in result.items()]
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            plain = True
    if plain:
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            print(f"{label:<{width}}  {value}")
        return
    table = Table(title="SafeServe safety kernels")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value in rows:
        table.add_row(label, value)
    Console().print(table)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="sampled rows per step (N)")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (H)")
    parser.add_argument(
        "--categories", type=int, default=9, help="harm categories; the head has one more (unsafe)"
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--mlp-units", type=int, default=0, help="residual MLP units (0: linear head)")
    parser.add_argument("--mlp-gate", action="store_true",
                        help="gate the MLP by a prompt-end read-out (the default head's form)")
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="device DRAM bandwidth in GB/s, for the bound (CUDA default: "
                        "guessed from the name, H200 4800, H100 3350, A100 2039)")
    parser.add_argument("--pool-mib", type=float, default=None,
                        help="MiB of hidden buffers the head cycles through (CUDA default: "
                        f"{DEFAULT_POOL_MIB_CUDA}, beyond L2; CPU: one buffer)")
    parser.add_argument("--plain", action="store_true", help="plain text instead of a rich table")
    parser.add_argument("--sweep", action="store_true",
                        help="CUDA: time every head tile shape and warp count (graph-timed, "
                        "checked against the reference) instead of the step report")
    args = parser.parse_args(argv)
    if args.sweep:
        print(f"head sweep: batch {args.batch}, hidden {args.hidden}, {args.categories + 1} "
              f"outputs, mlp {args.mlp_units}{' gated' if args.mlp_gate else ''}, {args.dtype}; "
              "graph-timed us per step, * = the launcher's choice")
        print("split precision BLOCK_N BLOCK_H warps   graph_us  max_abs_err")
        rows = []
        for row in sweep_head(batch=args.batch, hidden=args.hidden, categories=args.categories,
                              dtype=args.dtype, mlp_units=args.mlp_units, mlp_gate=args.mlp_gate):
            rows.append(row)
            print(f"{'yes' if row['split'] else 'no':>5} {row['precision']:>9} "
                  f"{row['block_n']:>7} {row['block_h']:>7} "
                  f"{row['num_warps']:>5} {row['graph_us']:>10.2f}  {row['max_abs_err']:.2e} "
                  f"{'*' if row['launcher_default'] else ''}", flush=True)
        best = min(rows, key=lambda row: row["graph_us"])
        print(f"fastest: {best}")
        return {"sweep": rows}
    result = run_benchmark(
        batch=args.batch,
        hidden=args.hidden,
        categories=args.categories,
        dtype=args.dtype,
        iters=args.iters,
        mlp_units=args.mlp_units,
        mlp_gate=args.mlp_gate,
        peak_gbs=args.peak_gbs,
        pool_mib=args.pool_mib,
    )
    _print_table(result, args.plain)
    return result


if __name__ == "__main__":
    main()
