"""Fused safety head: per-category scores from the hidden states of the sampled rows.

Math (the one place it is defined; training and serving both call these functions):

    logits[n, k] = sum_h hidden[n, h] * weight[k, h] + bias[k]      (k < K = categories + 1)
                 + sum_m down[k, m] * relu(sum_h hidden[n, h] * up[m, h] + up_bias[m])
    scores[n, k] = sigmoid(logits[n, k])                            (float32)

At the rows that read a prompt end (the prompt verdict), every logit also moves by the
head's prompt offset o (logits; a checkpoint's ``operating_point.prompt_logit_offset``):

    logits[n, k] += o                  (n reads a prompt end; applied to the scores as
    scores[n, k]  = s e^o / (1 - s + s e^o),   s the score above: ``offset_prompt_rows``)

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

The Triton kernel is one launch per call: the grid runs over blocks of BLOCK_N rows, each
program walks H in BLOCK_H tiles, accumulates [BLOCK_N, BLOCK_K] in float32 and applies
bias + sigmoid before one masked store. K is padded to a power of two (at least 16, the
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


def offset_prompt_rows(scores: torch.Tensor, is_prompt: torch.Tensor,
                       offset: float) -> torch.Tensor:
    """[N, K] scores with the head's prompt offset applied at the rows where ``is_prompt``
    ([N], nonzero = a prompt end): sigmoid(logit(s) + offset), computed without the logit so
    a score of exactly 0 or 1 stays there. A new tensor; no host synchronisation."""
    if offset == 0.0:
        return scores
    lift = math.exp(offset)
    s = scores.float()
    moved = s * lift / (1.0 - s + s * lift)
    return torch.where(is_prompt.reshape(-1, 1).to(torch.bool), moved, s)


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
    n_rows,
    n_hidden,
    n_cats,
    n_units,
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
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_MLP: tl.constexpr,
    HAS_GATE: tl.constexpr,
):
    # One pass over the hidden state feeds the linear logits and, with HAS_MLP, the MLP's
    # pre-activations (the step is bound by reading `hidden`); the [BLOCK_N, M] activations
    # then meet `down` in registers: no intermediate in memory. HAS_MLP and HAS_GATE are
    # constexprs, so the linear head compiles with no MLP load, tile or loop-carried value.
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cats = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    cat_ok = cats < n_cats
    # 64-bit row offsets: a row view into a large activation buffer can pass 2**31 elements.
    hidden_rows = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if HAS_MLP:
        units = tl.arange(0, BLOCK_M)
        unit_ok = units < n_units
        pre = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if HAS_GATE:
            gate_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for h_start in range(0, n_hidden, BLOCK_H):
        hs = h_start + tl.arange(0, BLOCK_H)
        h_ok = hs < n_hidden
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
        # "ieee": the default fp32 dot on NVIDIA is TF32 (10-bit mantissa), which misses the
        # 1e-5 agreement with the float32 reference at H in the thousands.
        acc = tl.dot(x, w_t, acc, input_precision="ieee")
        if HAS_MLP:
            u_t = tl.load(
                up_ptr + units[None, :] * stride_um + hs[:, None] * stride_uh,
                mask=h_ok[:, None] & unit_ok[None, :],
                other=0.0,
            )
            pre = tl.dot(x, u_t, pre, input_precision="ieee")
            if HAS_GATE:
                gv = tl.load(gate_ptr + hs, mask=h_ok, other=0.0)
                gate_dot += tl.sum(x * gv[None, :], axis=1)
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
        acc = tl.dot(act, d_t, acc, input_precision="ieee")
    b = tl.load(bias_ptr + cats, mask=cat_ok, other=0.0)
    scores = tl.sigmoid(acc + b[None, :])
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * stride_on + cats[None, :] * stride_ok,
        scores,
        mask=row_ok[:, None] & cat_ok[None, :],
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


def _safety_scores_triton(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
    mlp: ResidualMLP | None = None,
) -> None:
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
    grid = (triton.cdiv(n_rows, block_n),)
    _jit(_safety_head_kernel)[grid](
        hidden, weight, bias, up, up_bias, down, gate, out,
        n_rows, n_hidden, n_cats, n_units,
        hidden.stride(0), hidden.stride(1),
        weight.stride(0), weight.stride(1),
        up.stride(0), up.stride(1),
        down.stride(0), down.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_M=block_m,
        HAS_MLP=mlp is not None, HAS_GATE=mlp is not None and len(mlp) == 4, num_warps=4,
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
