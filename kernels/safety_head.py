"""Fused safety head: per-category scores from the hidden states of the sampled rows.

Math (the one place it is defined; training and serving both call these functions):

    logits[n, k] = sum_h hidden[n, h] * weight[k, h] + bias[k]      (k < K = categories + 1)
                 + sum_m down[k, m] * relu(sum_h hidden[n, h] * up[m, h] + up_bias[m])
    scores[n, k] = sigmoid(logits[n, k])                            (float32)

At the rows that read a prompt end (the prompt verdict), every logit also moves by the
head's prompt offset o (logits; a checkpoint's ``operating_point.prompt_logit_offset``):

    logits[n, k] += o                  (n reads a prompt end; applied to the scores as
    scores[n, k]  = s e^o / (1 - s + s e^o),   s the score above: ``offset_prompt_rows``)

(The server applies the offset inside the decision kernel, kernels/safety_decision.py, in
the same order of float32 operations; a test holds the two to bit equality.)

So the prompt verdict and the response rule run at their own operating points against one set
of thresholds, exactly: only the rows the decision treats as prompt rows move.

The second line is an optional residual MLP (``mlp = (up [M, H], up_bias [M], down [K, M])``,
M hidden units): a linear head alone reads topic more than intent from a small model's
hidden state, and the per-token signal gains most from the non-linear term. An optional
fourth tensor ``gate [H + 1]`` (v, then c) scales the MLP term per row by
clamp(1 - (v.h + c), 0, 1): with the prompt-end read-out as (v, c) the MLP is off where the
prompt verdict is read and on for generated tokens, so the prompt verdict stays the linear
head's. The linear part
stays, so everything that acts on the head linearly (the prompt-verdict fold in training)
works on both kinds.

`head_logits` is the differentiable PyTorch form used by training; `safety_scores_reference`
is the reference the Triton kernel is tested against; `safety_scores` is the launcher the
server calls once per engine step.

The Triton kernel is one launch per call: the grid runs over blocks of BLOCK_N rows and,
when those are too few to fill the device, slices of H (SPLIT); each program walks its H in
BLOCK_H tiles and accumulates [BLOCK_N, BLOCK_K] in float32 (tensor-core tf32x3 dots:
fp32-level error). Split programs store partial sums, and the last of a row block to take its
ticket adds them in split order; that program (or the only one) applies the MLP, bias and
sigmoid before one masked store. On an H200 at 256 rows x 4096 the split made the head 5x
faster (README, Benchmarks). K is padded to a power of two (at least 16, the
smallest tile `tl.dot` accepts) and masked, so any K and H work. The same kernel serves the
linear head and the residual MLP: the constexprs HAS_MLP and HAS_GATE add the [BLOCK_N, M]
pre-activations (and the gate's dot) to that one pass over H, so the linear head compiles
without any of it.

When the Triton path runs: CUDA tensors always (if triton is importable), CPU tensors only
with SAFESERVE_FORCE_TRITON=1, which needs TRITON_INTERPRET=1 (the tests use this).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch

try:  # Guarded: CPU-only installs may lack triton; the reference path then serves alone.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

FORCE_TRITON_ENV = "SAFESERVE_FORCE_TRITON"

_HIDDEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# (up [M, H], up_bias [M], down [K, M][, gate [H + 1]]) of the optional residual MLP.
ResidualMLP = tuple[torch.Tensor, ...]
MAX_MLP_UNITS = 512  # the kernel keeps a [BLOCK_N, M] tile of activations in registers
# How the kernel's fp32 dots use the tensor cores. Plain "tf32" (10-bit mantissa) misses the
# 1e-5 agreement with the float32 reference at H in the thousands; "ieee" is exact but runs on
# the FMA units, where Triton's dot layouts hold a row of each operand per thread and spill
# (H200: 85 us per step at any batch, 2026-12-04); "tf32x3" splits each operand into two
# tf32 halves and sums three tensor-core products: fp32-level error at tensor-core speed.
HEAD_DOT_PRECISION = "tf32x3"


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                mlp: ResidualMLP | None = None) -> torch.Tensor:
    """[N, H] x [K, H] + [K] (+ the residual MLP) -> [N, K] logits in float32 (differentiable)."""
    x = hidden.float()
    logits = torch.nn.functional.linear(x, weight.float(), bias.float())
    if mlp is not None:
        up, up_bias, down = mlp[:3]
        act = torch.relu(torch.nn.functional.linear(x, up.float(), up_bias.float()))
        if len(mlp) == 4:
            act = act * mlp_gate(x, mlp[3])[:, None]
        logits = logits + torch.nn.functional.linear(act, down.float())
    return logits


def mlp_gate(hidden: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """[N, H], [H + 1] -> [N]: clamp(1 - (v.h + c), 0, 1)."""
    gate = gate.float()
    return (1.0 - (hidden.float() @ gate[:-1] + gate[-1])).clamp(0.0, 1.0)


def safety_scores_reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    mlp: ResidualMLP | None = None,
) -> torch.Tensor:
    """[N, H] -> [N, K] sigmoid scores, float32."""
    return torch.sigmoid(head_logits(hidden, weight, bias, mlp))


def select_prompt_rows(scores: torch.Tensor, is_prompt: torch.Tensor, k: int,
                       either: bool = False, no_allowlist: torch.Tensor | None = None,
                       own_overall_only: bool = False, readout_shift: float = 0.0,
                       veto: torch.Tensor | None = None) -> torch.Tensor:
    """[N, 2K] scores of a head with a separate prompt read-out (its K outputs after the
    head's K; checkpoint formats 4 and 5) -> [N, K]: at the rows where ``is_prompt`` ([N],
    nonzero = a prompt end) the read-out's scores (format 4) or, with ``either`` (format 5),
    the larger of the read-out's and the head's own per output, so a prompt is flagged when
    either verdict flags it (both are folded against the same thresholds); the head's
    elsewhere.

    ``no_allowlist`` ([N], nonzero = a request without an allow-list; format 10) selects the
    rows judged by that rule instead: the read-out's scores moved by ``readout_shift`` logits
    (+ = act less), beside the head's own outputs, or with ``own_overall_only`` its overall
    output alone.

    ``veto`` ([N, K]; format 11): the prompt veto's columns, each already at its output's
    threshold (models/checkpoint.SafetyHead.veto_logits): the prompt verdict is the smaller
    of it and the verdict above, so a prompt the veto clears is flagged by no output. No host
    sync."""
    if scores.shape[1] == k and veto is None:
        return scores
    if scores.shape[1] not in (k, 2 * k):  # e.g. a format-7 head's attribution columns left on
        raise ValueError(f"select_prompt_rows takes [N, {k}] or [N, {2 * k}] scores, "
                         f"not {tuple(scores.shape)}")
    own, readout = scores[:, :k], scores[:, k:]
    prompt = own if readout.shape[1] == 0 else torch.maximum(readout, own) if either else readout
    if no_allowlist is not None:
        moved = shift_scores(readout, -readout_shift)
        judges = own
        if own_overall_only:  # scores are >= 0: a zero never wins the maximum
            judges = torch.cat([torch.zeros_like(own[:, :-1]), own[:, -1:]], 1)
        plain = torch.maximum(moved.to(own.dtype), judges)
        prompt = torch.where(no_allowlist.reshape(-1, 1).to(torch.bool), plain, prompt)
    if veto is not None:
        prompt = torch.minimum(prompt, veto.to(prompt.dtype))
    return torch.where(is_prompt.reshape(-1, 1).to(torch.bool), prompt, own)


def offset_prompt_rows(scores: torch.Tensor, is_prompt: torch.Tensor,
                       offset: float) -> torch.Tensor:
    """[N, K] scores with the head's prompt offset applied at the rows where ``is_prompt``
    ([N], nonzero = a prompt end): sigmoid(logit(s) + offset), computed without the logit so
    a score of exactly 0 or 1 stays there. A new tensor; no host synchronisation."""
    if offset == 0.0:
        return scores
    return torch.where(is_prompt.reshape(-1, 1).to(torch.bool), shift_scores(scores, offset),
                       scores.float())


def shift_scores(scores: torch.Tensor, offset: float) -> torch.Tensor:
    """sigmoid(logit(s) + offset) for every score, computed without the logit so a score of
    exactly 0 or 1 stays there (float32; ``scores`` itself when the offset is 0)."""
    if offset == 0.0:
        return scores
    lift = math.exp(offset)
    s = scores.float()
    return s * lift / (1.0 - s + s * lift)


# --------------------------------------------------------------------------------------
# Shared launch plumbing (also used by safety_decision.py)
# --------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(tensor: torch.Tensor) -> bool:
    """Whether a launcher should take the Triton path for data living where `tensor` lives."""
    forced = os.environ.get(FORCE_TRITON_ENV, "0") == "1"
    if triton is None:
        if forced:
            raise RuntimeError(f"{FORCE_TRITON_ENV}=1 but triton is not importable")
        return False
    if tensor.is_cuda:
        return True
    if forced and not _interpreting():
        # Compiled Triton cannot read host memory; fail loudly rather than with a driver error.
        raise RuntimeError(
            f"{FORCE_TRITON_ENV}=1 on CPU tensors needs TRITON_INTERPRET=1 set before triton runs"
        )
    return forced


_jitted: dict[tuple[Callable[..., Any], bool], Any] = {}


def _jit(body: Callable[..., Any]) -> Any:
    """`triton.jit(body)`, decorated at first launch rather than at import.

    Triton decides between compiled and interpreted functions when `triton.jit` runs, so
    decorating at import would freeze whatever TRITON_INTERPRET was then (a test module that
    sets it after another module imported this one would get a compiled kernel on CPU).
    The cache key carries the interpreter flag for the same reason.
    """
    key = (body, _interpreting())
    kernel = _jitted.get(key)
    if kernel is None:
        kernel = triton.jit(body)
        _jitted[key] = kernel
    return kernel


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------


def _safety_head_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    up_ptr,
    up_bias_ptr,
    down_ptr,
    gate_ptr,
    out_ptr,
    part_ptr,
    ticket_ptr,
    n_rows,
    n_hidden,
    n_cats,
    n_units,
    split_h,
    n_splits,
    stride_hn,
    stride_hh,
    stride_wk,
    stride_wh,
    stride_um,
    stride_uh,
    stride_dk,
    stride_dm,
    stride_on,
    stride_ok,
    stride_ps,
    stride_pn,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_MLP: tl.constexpr,
    HAS_GATE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One pass over the hidden state feeds the linear logits and, with HAS_MLP, the MLP's
    # pre-activations (the step is bound by reading `hidden`); the [BLOCK_N, M] activations
    # then meet `down` in registers: no intermediate in memory. HAS_MLP and HAS_GATE are
    # constexprs, so the linear head compiles with no MLP load, tile or loop-carried value.
    # With SPLIT, program (i, j) covers rows block i over hidden slice j (split_h columns):
    # a few hundred rows are only ~16 row blocks, too few programs to keep the memory system
    # busy. Each writes its partial sums to `part` [n_splits, N, BLOCK_K + BLOCK_M + 1]; the
    # last of a row block to finish (a ticket per row block) adds them up in split order (so, for a given batch size and device,
    # the result does not depend on arrival order), runs the epilogue and resets its ticket.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cats = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    cat_ok = cats < n_cats
    # 64-bit row offsets: a row view into a large activation buffer can pass 2**31 elements.
    hidden_rows = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    units = tl.arange(0, BLOCK_M)
    unit_ok = units < n_units
    if HAS_MLP:
        pre = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if HAS_GATE:
            gate_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    h_end = tl.minimum(split * split_h + split_h, n_hidden)
    for h_start in range(split * split_h, h_end, BLOCK_H):
        hs = h_start + tl.arange(0, BLOCK_H)
        h_ok = hs < h_end
        x = tl.load(
            hidden_rows + hs[None, :] * stride_hh,
            mask=row_ok[:, None] & h_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        # Load the weight tile already transposed ([BLOCK_H, BLOCK_K]) so no tl.trans is needed.
        w_t = tl.load(
            weight_ptr + cats[None, :] * stride_wk + hs[:, None] * stride_wh,
            mask=h_ok[:, None] & cat_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(x, w_t, acc, input_precision=DOT_PRECISION)
        if HAS_MLP:
            u_t = tl.load(
                up_ptr + units[None, :] * stride_um + hs[:, None] * stride_uh,
                mask=h_ok[:, None] & unit_ok[None, :],
                other=0.0,
            )
            pre = tl.dot(x, u_t, pre, input_precision=DOT_PRECISION)
            if HAS_GATE:
                gv = tl.load(gate_ptr + hs, mask=h_ok, other=0.0)
                gate_dot += tl.sum(x * gv[None, :], axis=1)
    finish = row_ok
    if SPLIT:
        # Partials out; then every program of the row block takes a ticket, and only the
        # last one's loads and stores below are unmasked (no data-dependent control flow).
        part_rows = part_ptr + split * stride_ps + rows.to(tl.int64)[:, None] * stride_pn
        tl.store(part_rows + cats[None, :], acc, mask=row_ok[:, None])
        if HAS_MLP:
            tl.store(part_rows + BLOCK_K + units[None, :], pre, mask=row_ok[:, None])
            if HAS_GATE:
                tl.store(part_ptr + split * stride_ps + rows.to(tl.int64) * stride_pn
                         + BLOCK_K + BLOCK_M, gate_dot, mask=row_ok)
        tl.debug_barrier()  # every thread's partial stored before the ticket releases them
        ticket = tl.atomic_add(ticket_ptr + pid, 1, sem="acq_rel", scope="gpu")
        # As a [BLOCK_N] vector: a scalar mask is not accepted everywhere (the interpreter).
        last = (tl.zeros((BLOCK_N,), dtype=tl.int32) + ticket) == n_splits - 1
        finish = row_ok & last
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if HAS_MLP:
            pre = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            if HAS_GATE:
                gate_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s in range(0, n_splits):
            # .cg: read L2, where the other programs' stores are, not a stale L1 line.
            part_rows = part_ptr + s * stride_ps + rows.to(tl.int64)[:, None] * stride_pn
            acc += tl.load(part_rows + cats[None, :], mask=finish[:, None], other=0.0,
                           cache_modifier=".cg")
            if HAS_MLP:
                pre += tl.load(part_rows + BLOCK_K + units[None, :], mask=finish[:, None],
                               other=0.0, cache_modifier=".cg")
                if HAS_GATE:
                    gate_dot += tl.load(part_ptr + s * stride_ps + rows.to(tl.int64) * stride_pn
                                        + BLOCK_K + BLOCK_M, mask=finish, other=0.0,
                                        cache_modifier=".cg")
        # The next launch starts from zero (ordered after this one on the stream).
        first_lane = tl.arange(0, BLOCK_N) == 0
        tl.store(ticket_ptr + pid + tl.zeros((BLOCK_N,), dtype=tl.int32), 0,
                 mask=last & first_lane)
    if HAS_MLP:
        ub = tl.load(up_bias_ptr + units, mask=unit_ok, other=0.0)
        act = tl.maximum(pre + ub[None, :], 0.0)  # padded units: relu(0 + 0) = 0, no effect
        if HAS_GATE:
            gate = 1.0 - (gate_dot + tl.load(gate_ptr + n_hidden))
            gate = tl.minimum(tl.maximum(gate, 0.0), 1.0)
            act = act * gate[:, None]
        d_t = tl.load(
            down_ptr + cats[None, :] * stride_dk + units[:, None] * stride_dm,
            mask=unit_ok[:, None] & cat_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(act, d_t, acc, input_precision=DOT_PRECISION)
    b = tl.load(bias_ptr + cats, mask=cat_ok, other=0.0)
    scores = tl.sigmoid(acc + b[None, :])
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * stride_on + cats[None, :] * stride_ok,
        scores,
        mask=finish[:, None] & cat_ok[None, :],
    )


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------


def _head_blocks(n_hidden: int, n_cats: int, n_units: int = 0) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_H, BLOCK_K, BLOCK_M): 16 is the smallest tile `tl.dot` takes on every dim.

    BLOCK_M only matters with the residual MLP (n_units > 0); without it BLOCK_M is 16, which
    never exceeds BLOCK_K and so leaves BLOCK_H as the linear head alone would pick it.
    """
    block_k = max(16, _next_pow2(n_cats))
    block_m = max(16, _next_pow2(n_units))
    # Keep the widest fp32 weight tile ([BLOCK_H, BLOCK_K], or the MLP's [BLOCK_H, BLOCK_M])
    # near 16 KiB, so K=64 or M in the hundreds does not spill registers.
    block_h = max(16, min(128, 4096 // max(block_k, block_m), _next_pow2(max(n_hidden, 1))))
    return 16, block_h, block_k, block_m


def _check_head_args(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor | None
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or bias.dim() != 1:
        raise ValueError(
            f"expected hidden [N, H], weight [K, H], bias [K]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(bias.shape)}"
        )
    if weight.shape[1] != hidden.shape[1] or bias.shape[0] != weight.shape[0]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"bias {tuple(bias.shape)}"
        )
    if weight.device != hidden.device or bias.device != hidden.device:
        raise ValueError(
            f"hidden, weight, bias must share a device; got {hidden.device}, {weight.device}, "
            f"{bias.device}"
        )
    if hidden.dtype not in _HIDDEN_DTYPES:
        raise ValueError(f"hidden dtype {hidden.dtype} not in {_HIDDEN_DTYPES}")
    if out is not None:
        expected = (hidden.shape[0], weight.shape[0])
        if tuple(out.shape) != expected or out.dtype != torch.float32:
            raise ValueError(
                f"out must be float32 {expected}; got {out.dtype} {tuple(out.shape)}"
            )


def _check_mlp_args(hidden: torch.Tensor, weight: torch.Tensor, mlp: ResidualMLP) -> None:
    if len(mlp) not in (3, 4):
        raise ValueError("mlp must be (up [M, H], up_bias [M], down [K, M][, gate [H + 1]])")
    up, up_bias, down = mlp[:3]
    if len(mlp) == 4 and mlp[3].shape != (hidden.shape[1] + 1,):
        raise ValueError(f"mlp gate has shape {tuple(mlp[3].shape)}, want ({hidden.shape[1] + 1},)")
    n_hidden, n_cats = hidden.shape[1], weight.shape[0]
    if up.dim() != 2 or up.shape[1] != n_hidden or up_bias.shape != (up.shape[0],) \
            or down.shape != (n_cats, up.shape[0]):
        raise ValueError(
            f"mlp shapes up {tuple(up.shape)}, up_bias {tuple(up_bias.shape)}, down "
            f"{tuple(down.shape)} do not fit hidden {n_hidden} and {n_cats} outputs"
        )
    if not 1 <= up.shape[0] <= MAX_MLP_UNITS:
        raise ValueError(f"mlp has {up.shape[0]} units; 1..{MAX_MLP_UNITS} are supported")
    if any(t.device != hidden.device for t in mlp):
        raise ValueError("mlp tensors must live on the hidden state's device")


# Programs a split head launch aims for, per multiprocessor (CUDA) or in all (interpreter,
# where it only makes the CPU tests walk the split path).
_PROGRAMS_PER_SM = 2
_INTERPRETER_PROGRAMS = 8


def _split_plan(n_rows: int, n_hidden: int, block_n: int, block_h: int,
                device: torch.device) -> tuple[int, int]:
    """(n_splits, split_h): how many hidden slices each row block is cut into, and the slice
    width (a multiple of BLOCK_H, so no tile straddles two slices; no slice is empty)."""
    row_blocks = -(-n_rows // block_n)
    tiles = -(-n_hidden // block_h)
    if tiles <= 1:  # one tile (or H = 0): nothing to split
        return 1, max(n_hidden, 1)
    if device.type == "cuda":
        target = _PROGRAMS_PER_SM * _sm_count(device)
    else:
        target = _INTERPRETER_PROGRAMS
    splits = max(1, min(tiles, -(-target // row_blocks)))
    split_h = -(-tiles // splits) * block_h
    return -(-n_hidden // split_h), split_h


_sm_counts: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


# Scratch of the split launch, per device and stream: partial sums [n_splits, N, cols] and
# one int32 ticket per row block, grown on demand. The tickets are zero between launches (each
# launch's last program resets its own), so launches on one stream never share them while
# running. A CUDA graph bakes in the addresses it captured, so a buffer that was ever handed out
# is kept alive when a larger one replaces it (`_retired`: the growth is rare and bounded by
# the largest batch), and none is allocated during a capture: the launcher then runs unsplit.
_scratch: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}
_retired: list[torch.Tensor] = []


def _scratch_key(device: torch.device) -> tuple[torch.device, int]:
    if device.type != "cuda":
        return device, 0
    return device, torch.cuda.current_stream(device).cuda_stream


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _split_scratch(device: torch.device, n_splits: int, n_rows: int, cols: int,
                   row_blocks: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Views of this stream's scratch, or None when it would have to be allocated during a
    CUDA graph capture (the caller then launches unsplit)."""
    key = _scratch_key(device)
    parts, tickets = _scratch.get(key, (None, None))
    need_parts = parts is None or parts.numel() < n_splits * n_rows * cols
    need_tickets = tickets is None or tickets.numel() < row_blocks
    if need_parts or need_tickets:
        if _capturing(device):
            return None
        if need_parts:
            _retired.extend([parts] if parts is not None else [])
            parts = torch.empty(max(n_splits * n_rows * cols, 1 << 16), dtype=torch.float32,
                                device=device)
        if need_tickets:
            _retired.extend([tickets] if tickets is not None else [])
            tickets = torch.zeros(max(row_blocks, 256), dtype=torch.int32, device=device)
        _scratch[key] = (parts, tickets)
    return parts[: n_splits * n_rows * cols].view(n_splits, n_rows, cols), tickets


def _safety_scores_triton(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
    mlp: ResidualMLP | None = None, *, blocks: tuple[int, int] | None = None,
    num_warps: int = 4, precision: str = HEAD_DOT_PRECISION, split: bool = True,
) -> None:
    """`blocks` = (BLOCK_N, BLOCK_H), `num_warps`, `precision` and `split` (cut H across
    programs when the row blocks alone are too few) override the launcher's choices (the
    bench's sweep)."""
    n_rows, n_hidden = hidden.shape
    n_cats = weight.shape[0]
    if n_rows == 0:
        return
    weight = weight.float()
    # The biases are read with unit stride; .contiguous() is a no-op for the usual parameter.
    bias = bias.float().contiguous()
    if hidden.dtype == torch.bfloat16 and _interpreting():
        # The numpy interpreter has no bfloat16; widening is exact (bf16 is a prefix of fp32).
        hidden = hidden.float()
    if mlp is None:
        # Placeholders for the kernel's MLP arguments: with HAS_MLP=False none of them is read.
        up, up_bias, down, gate = weight, bias, weight, bias
        n_units = 0
    else:
        up, up_bias, down = (t.float() for t in mlp[:3])
        up_bias = up_bias.contiguous()
        gate = mlp[3].float().contiguous() if len(mlp) == 4 else up_bias  # any pointer when unused
        n_units = up.shape[0]
    block_n, block_h, block_k, block_m = _head_blocks(n_hidden, n_cats, n_units)
    if blocks is not None:
        block_n, block_h = blocks
    row_blocks = triton.cdiv(n_rows, block_n)
    n_splits, split_h = (
        _split_plan(n_rows, n_hidden, block_n, block_h, hidden.device) if split
        else (1, n_hidden)
    )
    # Partial row: BLOCK_K logits, then (MLP) BLOCK_M pre-activations and the gate's dot,
    # padded to a multiple of 16 floats so the stores and loads vectorise.
    cols = block_k + (block_m + 16 if mlp is not None else 0)
    scratch = None
    if n_splits > 1:
        scratch = _split_scratch(hidden.device, n_splits, n_rows, cols, row_blocks)
    if scratch is not None:
        parts, tickets = scratch
    else:  # never read: SPLIT=False compiles the partials and tickets out
        n_splits, parts, tickets, split_h = 1, out, out, n_hidden
    _jit(_safety_head_kernel)[(row_blocks, n_splits)](
        hidden, weight, bias, up, up_bias, down, gate, out, parts, tickets,
        n_rows, n_hidden, n_cats, n_units, split_h, n_splits,
        hidden.stride(0), hidden.stride(1),
        weight.stride(0), weight.stride(1),
        up.stride(0), up.stride(1),
        down.stride(0), down.stride(1),
        out.stride(0), out.stride(1),
        parts.stride(0), parts.stride(1),
        BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_M=block_m,
        HAS_MLP=mlp is not None, HAS_GATE=mlp is not None and len(mlp) == 4,
        SPLIT=n_splits > 1, DOT_PRECISION=precision, num_warps=num_warps,
    )


def safety_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    out: torch.Tensor | None = None,
    mlp: ResidualMLP | None = None,
) -> torch.Tensor:
    """Launcher used by the server (Triton on CUDA, reference elsewhere).

    hidden [N, H] fp32/fp16/bf16 (any strides), weight [K, H], bias [K] (+ the residual
    ``mlp``) -> out [N, K] float32. One kernel launch per call, none for N == 0; no host
    synchronisation.
    """
    if not _use_triton(hidden):
        scores = safety_scores_reference(hidden, weight, bias, mlp)
        if out is not None:
            out.copy_(scores)
            return out
        return scores
    _check_head_args(hidden, weight, bias, out)
    if out is None:
        out = torch.empty(
            (hidden.shape[0], weight.shape[0]), dtype=torch.float32, device=hidden.device
        )
    if mlp is not None:
        _check_mlp_args(hidden, weight, mlp)
    _safety_scores_triton(hidden, weight, bias, out, mlp)
    return out
