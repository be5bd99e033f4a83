"""Triton kernels against their PyTorch references (head scores and per-row decision).

Without a GPU the kernels run in Triton's numpy interpreter. The interpreter is chosen when
`triton` is first imported (its `tl.*` helpers are bound then), so TRITON_INTERPRET must be
in the environment before that import; it is set here at module level, before anything
imports triton. Both variables are restored right after the imports so that processes the
rest of the suite spawns (vLLM engine cores) do not inherit them, and set again only while
this module's tests run (autouse fixture below).

On a CUDA machine nothing is interpreted: the same tests run the compiled kernels on the GPU,
and triton is imported in its normal mode so other test modules can still compile kernels.

If some earlier test module already imported triton in compiled mode on a CPU-only machine,
the in-process interpreter cannot be had; the comparisons then re-run this file in a fresh
interpreter (test_kernels_in_fresh_process) instead of silently skipping.
"""

from __future__ import annotations

import math
import os
import sys

import torch

_ON_CUDA = torch.cuda.is_available()
VETO_OPS = 10  # ops a format-11 step adds in the sync-free form (measured: 9)
_INTERPRETER_ENV = {} if _ON_CUDA else {"TRITON_INTERPRET": "1"}
_INTERPRETER_ENV["SAFESERVE_FORCE_TRITON"] = "1"
# True when triton got imported (compiled mode) before this module could ask for the interpreter.
_TRITON_PREIMPORTED = (
    not _ON_CUDA and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
)
_saved_env = {name: os.environ.get(name) for name in _INTERPRETER_ENV}


def _restore_env() -> None:
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


os.environ.update(_INTERPRETER_ENV)
try:
    import pytest

    from safeserve.kernels import safety_head
    from safeserve.kernels.safety_decision import (
        EVENT_OK,
        EVENT_TRIGGER,
        EVENT_VIOLATION,
        decide,
        decide_reference,
    )
    from safeserve.kernels.safety_head import safety_scores, safety_scores_reference
    from safeserve.kernels.safety_strategy import (
        REPORT_COLUMNS,
        advance_strategy,
        advance_strategy_reference,
        force_tokens,
        force_tokens_reference,
    )
finally:
    _restore_env()

HAS_TRITON = safety_head.triton is not None
DEVICE = torch.device("cuda" if _ON_CUDA else "cpu")

needs_triton = pytest.mark.skipif(
    not HAS_TRITON or _TRITON_PREIMPORTED,
    reason="triton missing, or imported in compiled mode before this module on a CPU-only "
    "machine (covered by test_kernels_in_fresh_process)",
)


@pytest.fixture(autouse=True, scope="module")
def _triton_env():
    """Interpreter + forced Triton path for this module's tests only."""
    saved = {name: os.environ.get(name) for name in _INTERPRETER_ENV}
    os.environ.update(_INTERPRETER_ENV)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------
# Head: Triton vs reference
# --------------------------------------------------------------------------------------


def _head_inputs(n_rows: int, n_hidden: int, n_cats: int, seed: int):
    g = _gen(seed)
    hidden = torch.randn(n_rows, n_hidden, generator=g)
    # Scale so logits spread over the sigmoid's sensitive range instead of saturating.
    weight = torch.randn(n_cats, n_hidden, generator=g) / max(n_hidden, 1) ** 0.5
    bias = torch.randn(n_cats, generator=g)
    return hidden.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE)


HEAD_SHAPES = [
    (n, h, k)
    for n in (0, 1, 7, 33)
    for h in (1, 7, 576, 1000)
    for k in (1, 3, 10, 31)
]


@needs_triton
@pytest.mark.parametrize("n_rows,n_hidden,n_cats", HEAD_SHAPES)
def test_head_fp32_matches_reference(n_rows, n_hidden, n_cats):
    seed = n_rows * 7919 + n_hidden + n_cats
    hidden, weight, bias = _head_inputs(n_rows, n_hidden, n_cats, seed=seed)
    got = safety_scores(hidden, weight, bias)
    want = safety_scores_reference(hidden, weight, bias)
    assert got.dtype == torch.float32 and got.shape == (n_rows, n_cats)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@needs_triton
@pytest.mark.parametrize("n_rows,n_hidden,n_cats", HEAD_SHAPES[::3])
def test_head_fp16_matches_reference_on_same_values(n_rows, n_hidden, n_cats):
    hidden, weight, bias = _head_inputs(n_rows, n_hidden, n_cats, seed=n_hidden * 31 + n_cats)
    hidden = hidden.half()
    got = safety_scores(hidden, weight, bias)
    # The reference widens the same fp16 values, so only summation order differs.
    want = safety_scores_reference(hidden, weight, bias)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@needs_triton
def test_head_bf16_matches_reference_on_same_values():
    hidden, weight, bias = _head_inputs(9, 576, 10, seed=3)
    hidden = hidden.bfloat16()
    want = safety_scores_reference(hidden, weight, bias)
    torch.testing.assert_close(safety_scores(hidden, weight, bias), want, atol=1e-4, rtol=0)


@needs_triton
def test_head_large_hidden_and_64_categories():
    hidden, weight, bias = _head_inputs(5, 4096, 64, seed=11)
    want = safety_scores_reference(hidden, weight, bias)
    torch.testing.assert_close(safety_scores(hidden, weight, bias), want, atol=1e-5, rtol=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_non_contiguous_row_views(dtype):
    g = _gen(5)
    n_rows, n_hidden, n_cats = 13, 576, 10
    weight = (torch.randn(n_cats, n_hidden, generator=g) / n_hidden**0.5).to(DEVICE)
    bias = torch.randn(n_cats, generator=g).to(DEVICE)
    buffer = torch.randn(2 * n_rows, n_hidden + 40, generator=g).to(dtype).to(DEVICE)
    # Every other row of a wider activation buffer, offset into the row: both strides matter.
    strided_rows = buffer[::2, 17 : 17 + n_hidden]
    assert not strided_rows.is_contiguous()
    # Column-major view: unit stride along rows, not along H.
    column_major = torch.randn(n_hidden, n_rows, generator=g).to(dtype).to(DEVICE).t()
    assert column_major.stride(1) != 1
    for hidden in (strided_rows, column_major):
        want = safety_scores_reference(hidden, weight, bias)
        torch.testing.assert_close(safety_scores(hidden, weight, bias), want, atol=1e-4, rtol=0)


@needs_triton
def test_head_writes_into_strided_out():
    hidden, weight, bias = _head_inputs(7, 100, 3, seed=8)
    wide = torch.full((7, 8), -1.0, device=DEVICE)
    out = wide[:, 2:5]
    returned = safety_scores(hidden, weight, bias, out=out)
    assert returned.data_ptr() == out.data_ptr()
    want = safety_scores_reference(hidden, weight, bias)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    # Columns outside the view are untouched.
    assert torch.all(wide[:, :2] == -1.0) and torch.all(wide[:, 5:] == -1.0)


@needs_triton
def test_head_empty_batch_is_a_no_op():
    hidden, weight, bias = _head_inputs(0, 576, 10, seed=1)
    assert safety_scores(hidden, weight, bias).shape == (0, 10)
    out = torch.empty(0, 10, device=DEVICE)
    assert safety_scores(hidden, weight, bias, out=out) is out


@needs_triton
def test_head_rejects_mismatched_shapes():
    hidden, weight, bias = _head_inputs(3, 16, 4, seed=2)
    with pytest.raises(ValueError):
        safety_scores(hidden, weight[:, :15], bias)
    with pytest.raises(ValueError):
        safety_scores(hidden, weight, bias, out=torch.empty(3, 5, device=DEVICE))


def _mlp_inputs(n_hidden: int, n_units: int, n_cats: int, seed: int):
    g = _gen(seed)
    up = torch.randn(n_units, n_hidden, generator=g) / max(n_hidden, 1) ** 0.5
    up_bias = torch.randn(n_units, generator=g) * 0.5  # about half the units active
    down = torch.randn(n_cats, n_units, generator=g) / max(n_units, 1) ** 0.5
    return up.to(DEVICE), up_bias.to(DEVICE), down.to(DEVICE)


@needs_triton
@pytest.mark.parametrize("n_rows,n_hidden,n_units,n_cats", [
    (1, 576, 128, 10), (33, 576, 128, 10), (7, 1000, 5, 3), (17, 7, 300, 31), (5, 4096, 256, 9),
])
def test_head_with_residual_mlp_matches_reference(n_rows, n_hidden, n_units, n_cats):
    hidden, weight, bias = _head_inputs(n_rows, n_hidden, n_cats, seed=n_units + n_cats)
    mlp = _mlp_inputs(n_hidden, n_units, n_cats, seed=n_hidden + n_units)
    want = safety_scores_reference(hidden, weight, bias, mlp)
    # the MLP term matters: the scores differ from the linear head's
    assert (want - safety_scores_reference(hidden, weight, bias)).abs().max() > 1e-2
    torch.testing.assert_close(safety_scores(hidden, weight, bias, mlp=mlp), want, atol=1e-5, rtol=0)
    # row views of a wider buffer, half precision, and a preallocated out
    buffer = torch.randn(2 * n_rows, n_hidden + 8, generator=_gen(1)).half().to(DEVICE)
    rows = buffer[::2, 3:3 + n_hidden]
    out = torch.empty(n_rows, n_cats, device=DEVICE)
    got = safety_scores(rows, weight, bias, out=out, mlp=mlp)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, safety_scores_reference(rows, weight, bias, mlp), atol=1e-4, rtol=0)


@needs_triton
@pytest.mark.parametrize("n_rows,n_hidden", [(33, 576), (40, 1000)])
def test_head_with_gated_mlp_matches_reference(n_rows, n_hidden):
    hidden, weight, bias = _head_inputs(n_rows, n_hidden, 10, seed=n_hidden)
    up, up_bias, down = _mlp_inputs(n_hidden, 128, 10, seed=n_rows)
    g = _gen(9)
    # a gate that is 0 on some rows, 1 on others and in between elsewhere
    gate = torch.cat([2 * torch.randn(n_hidden, generator=g) / n_hidden**0.5, torch.tensor([0.2])]).to(DEVICE)
    mlp = (up, up_bias, down, gate)
    want = safety_scores_reference(hidden, weight, bias, mlp)
    gates = safety_head.mlp_gate(hidden, gate)
    assert (gates == 0).any() and (gates == 1).any() and ((gates > 0) & (gates < 1)).any()
    ungated = safety_scores_reference(hidden, weight, bias, mlp[:3])
    linear = safety_scores_reference(hidden, weight, bias)
    torch.testing.assert_close(want[gates == 0], linear[gates == 0])
    torch.testing.assert_close(want[gates == 1], ungated[gates == 1])
    torch.testing.assert_close(safety_scores(hidden, weight, bias, mlp=mlp), want, atol=1e-5, rtol=0)


@needs_triton
@pytest.mark.parametrize("n_rows,n_hidden,n_units", [(3, 576, 0), (40, 1000, 24), (17, 4096, 128)])
def test_head_split_over_hidden_matches_unsplit_and_leaves_tickets_at_zero(
    n_rows, n_hidden, n_units
):
    # The launcher cuts H across programs when the row blocks are few (here, always): each
    # writes partials and the last of a row block sums them. Same scores as one pass, the
    # same on every launch (tickets reset), and exact on a gated MLP too.
    hidden, weight, bias = _head_inputs(n_rows, n_hidden, 10, seed=n_units)
    mlp = None
    if n_units:
        gate = torch.cat([torch.randn(n_hidden, generator=_gen(4)) / n_hidden, torch.tensor([0.3])])
        mlp = (*_mlp_inputs(n_hidden, n_units, 10, seed=5), gate.to(DEVICE))
    block_n, block_h, _, _ = safety_head._head_blocks(n_hidden, 10, n_units)
    n_splits, split_h = safety_head._split_plan(n_rows, n_hidden, block_n, block_h, DEVICE)
    assert n_splits > 1 and split_h % block_h == 0 and (n_splits - 1) * split_h < n_hidden
    whole = torch.empty(n_rows, 10, device=DEVICE)
    safety_head._safety_scores_triton(hidden, weight, bias, whole, mlp, split=False)
    for _ in range(3):
        got = safety_scores(hidden, weight, bias, mlp=mlp)
        torch.testing.assert_close(got, whole, atol=1e-6, rtol=0)
        _, tickets = safety_head._scratch[safety_head._scratch_key(hidden.device)]
        assert int(tickets.abs().sum()) == 0
    torch.testing.assert_close(got, safety_scores_reference(hidden, weight, bias, mlp),
                               atol=1e-5, rtol=0)


@needs_triton
def test_head_split_scratch_grows_and_keeps_what_it_handed_out():
    # A CUDA graph keeps the addresses it captured: a grown scratch must not free the old one.
    key = safety_head._scratch_key(DEVICE)
    safety_head._scratch.pop(key, None)  # start from the first, smallest scratch
    small = safety_scores(*_head_inputs(2, 1000, 10, seed=1))
    assert small.shape == (2, 10)
    parts_before, _ = safety_head._scratch[key]
    # 100 rows with a 512-unit MLP: 2 splits x 100 rows x 544 columns outgrow the first scratch
    hidden, weight, bias = _head_inputs(100, 1000, 10, seed=2)
    mlp = _mlp_inputs(1000, 512, 10, seed=3)
    assert safety_head._split_plan(100, 1000, 16, 16, DEVICE)[0] > 1
    got = safety_scores(hidden, weight, bias, mlp=mlp)
    parts_after, _ = safety_head._scratch[key]
    assert parts_after.numel() > parts_before.numel()
    assert any(t is parts_before for t in safety_head._retired)
    torch.testing.assert_close(got, safety_scores_reference(hidden, weight, bias, mlp),
                               atol=1e-5, rtol=0)


@needs_triton
def test_head_with_zero_hidden_is_the_bias():
    hidden, weight, bias = _head_inputs(3, 0, 10, seed=3)
    torch.testing.assert_close(safety_scores(hidden, weight, bias),
                               torch.sigmoid(bias).expand(3, 10), atol=1e-6, rtol=0)


@needs_triton
def test_head_mlp_rejects_bad_shapes():
    hidden, weight, bias = _head_inputs(3, 16, 4, seed=2)
    up, up_bias, down = _mlp_inputs(16, 8, 4, seed=3)
    with pytest.raises(ValueError, match="mlp shapes"):
        safety_scores(hidden, weight, bias, mlp=(up, up_bias, down[:3]))
    with pytest.raises(ValueError, match="mlp shapes"):
        safety_scores(hidden, weight, bias, mlp=(up[:, :15], up_bias, down))
    with pytest.raises(ValueError, match="gate"):
        safety_scores(hidden, weight, bias, mlp=(up, up_bias, down, torch.zeros(16, device=DEVICE)))
    big = _mlp_inputs(16, 513, 4, seed=4)
    with pytest.raises(ValueError, match="units"):
        safety_scores(hidden, weight, bias, mlp=big)


# --------------------------------------------------------------------------------------
# Decision: semantics oracle, Triton vs reference
# --------------------------------------------------------------------------------------


def _oracle_bits(row_scores, row_thresholds, row_masked):
    bits = 0
    for k, score in enumerate(row_scores):
        if row_masked[k] == 0 and score >= row_thresholds[k]:
            bits |= 1 << k
    plain = [k for k, score in enumerate(row_scores) if row_masked[k] != 2 and score == score]
    fired = any(row_masked[k] == 2 and row_scores[k] >= row_thresholds[k]
                for k in range(len(row_scores)))
    if plain and fired:
        top = max(plain, key=lambda k: (row_scores[k], -k))  # first maximum on ties
        if row_masked[top] == 0:
            bits |= 1 << top
    return bits


def _decide_oracle(scores, thresholds, masked, counter, tau, is_prompt, active,
                   alert=None, alert_tau=None, alert_margin=None,
                   clear=None, clear_margin=None, sampled_overall=None):
    """Row-by-row statement of the decision rules on Python lists (independent of both
    implementations); mutates the `counter` (and `alert`) lists like the kernels mutate
    theirs. The alert band is stated in logits here, as the README states it."""
    events, cats = [], []
    for i, row_scores in enumerate(scores):
        if not active[i]:
            events.append(EVENT_OK)
            cats.append(0)
            continue
        row_thresholds = list(thresholds[i])
        if clear is not None and clear[i] and not is_prompt[i]:
            row_thresholds[-1] = sampled_overall[i]  # a clear request's generated tokens
        bits = _oracle_bits(row_scores, row_thresholds, masked[i])
        if is_prompt[i]:
            counter[i] = 0
            events.append(EVENT_TRIGGER if bits else EVENT_OK)
            if alert is not None:
                lowered = [1 / (1 + math.exp(-(math.log(t / (1 - t)) - alert_margin[i])))
                           for t in thresholds[i]]
                alert[i] = int(not bits and _oracle_bits(row_scores, lowered, masked[i]) != 0)
            if clear is not None:
                lowered = [1 / (1 + math.exp(-(math.log(t / (1 - t)) - clear_margin[i])))
                           for t in thresholds[i]]
                clear[i] = int(not bits and _oracle_bits(row_scores, lowered, masked[i]) == 0)
        else:
            counter[i] = counter[i] + 1 if bits else 0
            run = alert_tau[i] if alert is not None and alert[i] else tau[i]
            if bits:
                events.append(EVENT_TRIGGER if counter[i] >= run else EVENT_VIOLATION)
            else:
                events.append(EVENT_OK)
        cats.append(bits)
    return events, cats


def _decision_state(capacity: int, n_cats: int, g: torch.Generator):
    thresholds = torch.rand(capacity, n_cats, generator=g) * 0.8 + 0.1
    masked = (torch.rand(capacity, n_cats, generator=g) < 0.25).to(torch.int8)
    # some rows' last column is an attributed detector (the server's overall output with an
    # allow-list), a few other columns too
    masked[torch.rand(capacity, generator=g) < 0.4, -1] = 2
    masked[torch.rand(capacity, n_cats, generator=g) < 0.05] = 2
    counter = torch.randint(0, 4, (capacity,), generator=g, dtype=torch.int32)
    tau = torch.randint(1, 4, (capacity,), generator=g, dtype=torch.int32)
    active = (torch.rand(capacity, generator=g) < 0.85).to(torch.int8)
    return thresholds, masked, counter, tau, active


def _to_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def _decide_both(scores, thresholds, masked, counter, tau, is_prompt, active):
    """Run the launcher and the reference on separate counter copies; return both results."""
    counter_ref = counter.clone()
    event, cats = decide(scores, thresholds, masked, counter, tau, is_prompt, active)
    event_ref, cats_ref = decide_reference(
        scores, thresholds, masked, counter_ref, tau, is_prompt, active
    )
    return (event, cats, counter), (event_ref, cats_ref, counter_ref)


def _assert_same(got, want):
    for g_t, w_t in zip(got, want):
        assert g_t.dtype == torch.int32
        assert torch.equal(g_t.cpu(), w_t.cpu()), (g_t, w_t)


@pytest.mark.parametrize("n_cats", [1, 3, 10, 31])
def test_decide_reference_matches_oracle(n_cats):
    g = _gen(100 + n_cats)
    capacity, n_rows = 40, 33
    thresholds, masked, counter, tau, active = _decision_state(capacity, n_cats, g)
    scores = torch.rand(n_rows, n_cats, generator=g)
    is_prompt = (torch.rand(n_rows, generator=g) < 0.3).to(torch.int8)
    oracle_counter = counter.tolist()
    want_events, want_cats = _decide_oracle(
        scores.tolist(), thresholds.tolist(), masked.tolist(), oracle_counter, tau.tolist(),
        is_prompt.tolist(), active.tolist(),
    )
    event, cats = decide_reference(scores, thresholds, masked, counter, tau, is_prompt, active)
    assert event.tolist() == want_events
    assert cats.tolist() == want_cats
    assert counter.tolist() == oracle_counter


def _alert_state(capacity: int, g: torch.Generator):
    """Per-row alert tables: state (some rows already alerted), run length, margin in logits
    (0: no band) and the kernel's scale e^margin."""
    alert = (torch.rand(capacity, generator=g) < 0.3).to(torch.int32)
    alert_tau = torch.randint(1, 3, (capacity,), generator=g, dtype=torch.int32)
    margin = torch.rand(capacity, generator=g) * 3.0
    margin[torch.rand(capacity, generator=g) < 0.2] = 0.0
    return alert, alert_tau, margin, torch.exp(margin)


@pytest.mark.parametrize("n_cats", [1, 3, 10, 31])
def test_decide_reference_alert_band_matches_oracle(n_cats):
    g = _gen(300 + n_cats)
    capacity, n_rows = 40, 33
    thresholds, masked, counter, tau, active = _decision_state(capacity, n_cats, g)
    alert, alert_tau, margin, scale = _alert_state(capacity, g)
    is_prompt = (torch.rand(n_rows, generator=g) < 0.5).to(torch.int8)
    oracle_counter, oracle_alert = counter.tolist(), alert.tolist()
    for step in range(6):
        scores = torch.rand(n_rows, n_cats, generator=g)
        if step:  # step 3: decode rows only (the reference's shortcut off-GPU)
            is_prompt = (torch.rand(n_rows, generator=g) < (0.0 if step == 3 else 0.1)).to(torch.int8)
        want_events, want_cats = _decide_oracle(
            scores.tolist(), thresholds.tolist(), masked.tolist(), oracle_counter, tau.tolist(),
            is_prompt.tolist(), active.tolist(), oracle_alert, alert_tau.tolist(),
            margin.tolist())
        event, cats = decide_reference(scores, thresholds, masked, counter, tau, is_prompt,
                                       active, alert, alert_tau, scale)
        assert event.tolist() == want_events
        assert cats.tolist() == want_cats
        assert counter.tolist() == oracle_counter
        assert alert.tolist() == oracle_alert
    assert 0 < sum(oracle_alert) < capacity  # the band was exercised both ways


def _clear_state(capacity: int, thresholds: torch.Tensor, g: torch.Generator):
    """Per-row clear tables: state (some rows already clear), margin in logits (0: clear is
    not violated), the kernel's scale e^margin, and the overall output's sampled threshold
    (a shift of up to +-2 logits of its own)."""
    clear = (torch.rand(capacity, generator=g) < 0.4).to(torch.int32)
    margin = torch.rand(capacity, generator=g) * 2.0
    margin[torch.rand(capacity, generator=g) < 0.2] = 0.0
    t = thresholds[:, -1]
    shift = (torch.rand(capacity, generator=g) - 0.5) * 4.0
    sampled = torch.sigmoid(torch.log(t / (1 - t)) + shift)
    return clear, margin, torch.exp(margin), sampled


@pytest.mark.parametrize("impl", ["reference", pytest.param("kernel", marks=needs_triton)])
@pytest.mark.parametrize("n_cats", [1, 3, 10])
def test_decide_clear_state_matches_oracle(n_cats, impl):
    """Sampled decoding: a prompt row sets clear when it is neither violated nor within the
    clear margin; a clear request's generated tokens compare the overall output (the last
    column) against its sampled threshold; the alert band runs beside it."""
    g = _gen(700 + n_cats)
    capacity, n_rows = 40, 33
    thresholds, masked, counter, tau, active = _decision_state(capacity, n_cats, g)
    alert, alert_tau, margin, scale = _alert_state(capacity, g)
    clear, clear_margin, clear_scale, sampled = _clear_state(capacity, thresholds, g)
    is_prompt = (torch.rand(n_rows, generator=g) < 0.5).to(torch.int8)
    oracle = {"counter": counter.tolist(), "alert": alert.tolist(), "clear": clear.tolist()}
    for step in range(6):
        scores = torch.rand(n_rows, n_cats, generator=g)
        if step:  # step 3: decode rows only (the reference's shortcut off-GPU)
            is_prompt = (torch.rand(n_rows, generator=g) < (0.0 if step == 3 else 0.1)).to(torch.int8)
        want_events, want_cats = _decide_oracle(
            scores.tolist(), thresholds.tolist(), masked.tolist(), oracle["counter"],
            tau.tolist(), is_prompt.tolist(), active.tolist(), oracle["alert"],
            alert_tau.tolist(), margin.tolist(), oracle["clear"], clear_margin.tolist(),
            sampled.tolist())
        run = decide_reference if impl == "reference" else decide
        event, cats = run(scores, thresholds, masked, counter, tau, is_prompt, active,
                          alert=alert, alert_tau=alert_tau, alert_scale=scale,
                          clear=clear, clear_scale=clear_scale, sampled_overall=sampled)
        assert event.tolist() == want_events
        assert cats.tolist() == want_cats
        assert counter.tolist() == oracle["counter"]
        assert alert.tolist() == oracle["alert"]
        assert clear.tolist() == oracle["clear"]
    assert 0 < sum(oracle["clear"]) < capacity  # exercised both ways


def test_decide_without_clear_tables_is_unchanged_and_they_come_together():
    g = _gen(9)
    thresholds, masked, counter, tau, active = _decision_state(8, 3, g)
    scores = torch.rand(8, 3, generator=g)
    is_prompt = torch.zeros(8, dtype=torch.int8)
    clear, _, clear_scale, sampled = _clear_state(8, thresholds, g)
    with pytest.raises(ValueError, match="come together"):
        decide(scores, thresholds, masked, counter, tau, is_prompt, active, clear=clear)
    no_clear = torch.zeros_like(clear)  # nothing clear: the same as no tables
    want = decide_reference(scores, thresholds, masked, counter.clone(), tau, is_prompt, active)
    got = decide_reference(scores, thresholds, masked, counter.clone(), tau, is_prompt, active,
                           clear=no_clear, clear_scale=clear_scale, sampled_overall=sampled)
    _assert_same(got, want)


@needs_triton
@pytest.mark.parametrize("n_rows", [0, 1, 7, 33])
@pytest.mark.parametrize("n_cats", [1, 3, 10, 31])
def test_decide_clear_state_matches_reference(n_rows, n_cats):
    g = _gen(n_rows * 53 + n_cats)
    capacity = n_rows + 5
    thresholds, masked, counter, tau, active = _decision_state(capacity, n_cats, g)
    alert, alert_tau, _, scale = _alert_state(capacity, g)
    clear, _, clear_scale, sampled = _clear_state(capacity, thresholds, g)
    prompt_thresholds = torch.rand(capacity, n_cats, generator=g) * 0.8 + 0.1
    counter_ref, alert_ref, clear_ref = counter.clone(), alert.clone(), clear.clone()
    for step in range(4):
        scores = torch.rand(n_rows, n_cats, generator=g)
        is_prompt = (torch.rand(n_rows, generator=g) < (0.6 if step == 0 else 0.1)).to(torch.int8)
        args = _to_device(scores, thresholds, masked)
        rest = _to_device(tau, is_prompt, active)
        alert_d, counter_d, clear_d = alert.to(DEVICE), counter.to(DEVICE), clear.to(DEVICE)
        # as the server runs it: the prompt verdict's own thresholds and the prompt lift too
        lift = math.exp(2.0)
        scores_ref = scores.clone()
        args[0] = args[0].clone()
        event, cats = decide(*args, counter_d, *rest, alert=alert_d,
                             alert_tau=alert_tau.to(DEVICE), alert_scale=scale.to(DEVICE),
                             prompt_thresholds=prompt_thresholds.to(DEVICE), prompt_lift=lift,
                             clear=clear_d, clear_scale=clear_scale.to(DEVICE),
                             sampled_overall=sampled.to(DEVICE))
        event_ref, cats_ref = decide_reference(scores_ref, thresholds, masked, counter_ref, tau,
                                               is_prompt, active, alert_ref, alert_tau, scale,
                                               prompt_thresholds, lift,
                                               clear=clear_ref, clear_scale=clear_scale,
                                               sampled_overall=sampled)
        _assert_same((event, cats, counter_d, alert_d, clear_d),
                     (event_ref, cats_ref, counter_ref, alert_ref, clear_ref))
        counter, alert, clear = counter_d.cpu(), alert_d.cpu(), clear_d.cpu()


@needs_triton
@pytest.mark.parametrize("n_rows", [0, 1, 7, 33])
@pytest.mark.parametrize("n_cats", [1, 3, 10, 31])
def test_decide_alert_band_matches_reference(n_rows, n_cats):
    g = _gen(n_rows * 37 + n_cats)
    capacity = n_rows + 5
    thresholds, masked, counter, tau, active = _decision_state(capacity, n_cats, g)
    alert, alert_tau, _, scale = _alert_state(capacity, g)
    counter_ref, alert_ref = counter.clone(), alert.clone()
    for step in range(4):
        scores = torch.rand(n_rows, n_cats, generator=g)
        is_prompt = (torch.rand(n_rows, generator=g) < (0.6 if step == 0 else 0.1)).to(torch.int8)
        args = _to_device(scores, thresholds, masked)
        rest = _to_device(tau, is_prompt, active)
        alert_d, counter_d = alert.to(DEVICE), counter.to(DEVICE)
        event, cats = decide(*args, counter_d, *rest, alert=alert_d,
                             alert_tau=alert_tau.to(DEVICE), alert_scale=scale.to(DEVICE))
        event_ref, cats_ref = decide_reference(scores, thresholds, masked, counter_ref, tau,
                                               is_prompt, active, alert_ref, alert_tau, scale)
        _assert_same((event, cats, counter_d, alert_d),
                     (event_ref, cats_ref, counter_ref, alert_ref))
        counter, alert = counter_d.cpu(), alert_d.cpu()


@needs_triton
@pytest.mark.parametrize("n_rows", [0, 1, 7, 33])
@pytest.mark.parametrize("n_cats", [1, 3, 10, 31])
def test_decide_matches_reference(n_rows, n_cats):
    g = _gen(n_rows * 101 + n_cats)
    capacity = n_rows + 5
    thresholds, masked, counter, tau, active = _decision_state(capacity, n_cats, g)
    scores = torch.rand(n_rows, n_cats, generator=g)
    is_prompt = (torch.rand(n_rows, generator=g) < 0.3).to(torch.int8)
    inputs = _to_device(scores, thresholds, masked, counter, tau, is_prompt, active)
    got, want = _decide_both(*inputs)
    _assert_same(got, want)


@pytest.mark.parametrize("lift", [1.0, math.exp(2.0), math.exp(-1.5)])
def test_decide_reference_prompt_args_equal_moving_scores_and_thresholds_first(lift):
    """The prompt offset and prompt thresholds inside the decision equal what the worker did
    before them: scores moved by offset_prompt_rows, thresholds swapped at prompt rows."""
    from safeserve.kernels.safety_head import offset_prompt_rows

    g = _gen(int(lift * 100))
    capacity, n_rows, n_cats = 40, 33, 10
    thresholds, masked, counter, tau, active = _decision_state(capacity, n_cats, g)
    prompt_thresholds = torch.rand(capacity, n_cats, generator=g) * 0.8 + 0.1
    alert, alert_tau, _, scale = _alert_state(capacity, g)
    scores = torch.rand(n_rows, n_cats, generator=g)
    scores[0, 0], scores[1, 1] = 0.0, 1.0  # saturated scores stay where they are
    is_prompt = (torch.rand(n_rows, generator=g) < 0.5).to(torch.int8)
    is_prompt[:2] = 1
    moved = offset_prompt_rows(scores, is_prompt, math.log(lift))
    merged = torch.where(is_prompt.bool()[:, None], prompt_thresholds[:n_rows],
                         thresholds[:n_rows])
    merged = torch.cat([merged, thresholds[n_rows:]])
    counter_old, alert_old = counter.clone(), alert.clone()
    want = decide_reference(moved.clone(), merged, masked, counter_old, tau, is_prompt, active,
                            alert_old, alert_tau, scale)
    got_scores = scores.clone()
    got = decide_reference(got_scores, thresholds, masked, counter, tau, is_prompt, active,
                           alert, alert_tau, scale, prompt_thresholds, lift)
    _assert_same((*got, counter, alert), (*want, counter_old, alert_old))
    assert torch.equal(got_scores, moved)
    assert got_scores[0, 0] == 0.0 and got_scores[1, 1] == 1.0


@needs_triton
@pytest.mark.parametrize("n_rows", [0, 1, 7, 33])
@pytest.mark.parametrize("n_cats", [1, 10, 31])
def test_decide_prompt_args_match_reference(n_rows, n_cats):
    """The kernel moves prompt rows' scores in place and judges them by the prompt
    thresholds exactly as the reference does (no fused multiply-add: the same roundings)."""
    g = _gen(n_rows * 53 + n_cats)
    capacity = n_rows + 5
    thresholds, masked, counter, tau, active = _decision_state(capacity, n_cats, g)
    prompt_thresholds = torch.rand(capacity, n_cats, generator=g) * 0.8 + 0.1
    alert, alert_tau, _, scale = _alert_state(capacity, g)
    counter_ref, alert_ref = counter.clone(), alert.clone()
    for step in range(3):
        scores = torch.rand(n_rows, n_cats, generator=g)
        is_prompt = (torch.rand(n_rows, generator=g) < 0.5).to(torch.int8)
        lift = (1.0, math.exp(2.0), math.exp(-0.75))[step]
        ref_scores = scores.clone()
        want = decide_reference(ref_scores, thresholds, masked, counter_ref, tau, is_prompt,
                                active, alert_ref, alert_tau, scale, prompt_thresholds, lift)
        got_scores, counter_d, alert_d = _to_device(scores, counter, alert)
        got = decide(got_scores, *_to_device(thresholds, masked), counter_d,
                     *_to_device(tau, is_prompt, active), alert=alert_d,
                     alert_tau=alert_tau.to(DEVICE), alert_scale=scale.to(DEVICE),
                     prompt_thresholds=prompt_thresholds.to(DEVICE), prompt_lift=lift)
        _assert_same((*got, counter_d, alert_d), (*want, counter_ref, alert_ref))
        assert torch.equal(got_scores.cpu(), ref_scores)
        counter, alert = counter_d.cpu(), alert_d.cpu()


def test_decide_quiet_step_shortcut_matches_reference(monkeypatch):
    """Off-GPU, decide() answers a step with no prompt row and nothing at or over a threshold
    without the reference (the common decode step): same events, bits, counters, alerts."""
    from safeserve.kernels import safety_decision as D

    # The module forces the Triton path; the shortcut lives on the reference path.
    monkeypatch.delenv("SAFESERVE_FORCE_TRITON", raising=False)
    reference_calls = []
    real_reference = D.decide_reference
    monkeypatch.setattr(D, "decide_reference",
                        lambda *a, **k: reference_calls.append(1) or real_reference(*a, **k))
    g = _gen(77)
    for n_rows, n_cats in ((1, 10), (9, 3), (33, 31)):
        capacity = n_rows + 3
        thresholds, masked, counter, tau, active = _decision_state(capacity, n_cats, g)
        alert, alert_tau, _, scale = _alert_state(capacity, g)
        scores = torch.rand(n_rows, n_cats, generator=g) * thresholds[:n_rows] * 0.999
        scores[0, 0] = float("nan")  # never over, never a violation
        is_prompt = torch.zeros(n_rows, dtype=torch.int8)
        assert D._quiet_step(scores, thresholds, is_prompt)
        counter_ref, alert_ref = counter.clone(), alert.clone()
        got = D.decide(scores, thresholds, masked, counter, tau, is_prompt, active, alert=alert,
                       alert_tau=alert_tau, alert_scale=scale)
        assert not reference_calls, "a quiet step must not run the reference"
        want = real_reference(scores, thresholds, masked, counter_ref, tau, is_prompt,
                                  active, alert_ref, alert_tau, scale)
        _assert_same((*got, counter, alert), (*want, counter_ref, alert_ref))
        # one score on its threshold, or one prompt row: not quiet
        loud = scores.clone()
        loud[-1, -1] = thresholds[n_rows - 1, -1]
        assert not D._quiet_step(loud, thresholds, is_prompt)
        assert not D._quiet_step(scores, thresholds, torch.ones(n_rows, dtype=torch.int8))


@needs_triton
def test_decide_twenty_step_sequence_carries_counters():
    g = _gen(2024)
    capacity, n_cats = 24, 10
    thresholds, masked, counter, tau, active = _to_device(*_decision_state(capacity, n_cats, g))
    # Rows 0..5 sit far above their thresholds so their counters climb across steps.
    hot_rows = 6
    counter_ref = counter.clone()
    saw = {EVENT_VIOLATION: 0, EVENT_TRIGGER: 0}
    max_count = 0
    for _ in range(20):
        n_rows = int(torch.randint(1, capacity + 1, (1,), generator=g))
        scores = torch.rand(n_rows, n_cats, generator=g)
        scores[: min(hot_rows, n_rows)] = 0.99
        # Mostly decode rows, some prompt rows (new requests) mixed in.
        is_prompt = (torch.rand(n_rows, generator=g) < 0.15).to(torch.int8)
        scores, is_prompt = _to_device(scores, is_prompt)
        event, cats = decide(scores, thresholds, masked, counter, tau, is_prompt, active)
        event_ref, cats_ref = decide_reference(
            scores, thresholds, masked, counter_ref, tau, is_prompt, active
        )
        _assert_same((event, cats, counter), (event_ref, cats_ref, counter_ref))
        for kind in saw:
            saw[kind] += int((event == kind).sum())
        max_count = max(max_count, int(counter.max()))
    # The sequence must actually exercise counting and triggering, not just OK rows.
    assert saw[EVENT_VIOLATION] > 0 and saw[EVENT_TRIGGER] > 0
    assert max_count >= 3


def _single_row_state(n_cats: int, **overrides):
    state = dict(
        thresholds=torch.full((1, n_cats), 0.5),
        masked=torch.zeros(1, n_cats, dtype=torch.int8),
        counter=torch.zeros(1, dtype=torch.int32),
        tau=torch.full((1,), 2, dtype=torch.int32),
        is_prompt=torch.zeros(1, dtype=torch.int8),
        active=torch.ones(1, dtype=torch.int8),
    )
    state.update(overrides)
    return {name: t.to(DEVICE) for name, t in state.items()}


def _launchers():
    launchers = [decide_reference]
    if HAS_TRITON and not _TRITON_PREIMPORTED:
        launchers.append(decide)
    return launchers


@pytest.mark.parametrize("launcher", _launchers(), ids=lambda f: f.__name__)
def test_threshold_equal_to_score_is_a_violation(launcher):
    state = _single_row_state(3)
    scores = torch.tensor([[0.1, 0.5, 0.2]], device=DEVICE)  # exactly the 0.5 threshold
    event, cats = launcher(scores, **state)
    assert event.tolist() == [EVENT_VIOLATION] and cats.tolist() == [0b010]
    assert state["counter"].tolist() == [1]
    event, cats = launcher(scores, **state)  # second consecutive violation reaches tau=2
    assert event.tolist() == [EVENT_TRIGGER] and state["counter"].tolist() == [2]


@pytest.mark.parametrize("launcher", _launchers(), ids=lambda f: f.__name__)
def test_row_flags_are_nonzero_not_their_low_byte(launcher):
    state = _single_row_state(1, tau=torch.ones(1, dtype=torch.int32),
                              active=torch.tensor([256], dtype=torch.int32),  # low byte 0
                              is_prompt=torch.zeros(1, dtype=torch.int32))
    event, cats = launcher(torch.tensor([[0.9]], device=DEVICE), **state)
    assert event.tolist() == [EVENT_TRIGGER] and cats.tolist() == [1]


@pytest.mark.parametrize("launcher", _launchers(), ids=lambda f: f.__name__)
def test_all_masked_never_violates(launcher):
    state = _single_row_state(
        4, masked=torch.ones(1, 4, dtype=torch.int8), counter=torch.tensor([5], dtype=torch.int32)
    )
    event, cats = launcher(torch.ones(1, 4, device=DEVICE), **state)
    assert event.tolist() == [EVENT_OK] and cats.tolist() == [0]
    assert state["counter"].tolist() == [0]  # a clean decode step resets the streak


@pytest.mark.parametrize("launcher", _launchers(), ids=lambda f: f.__name__)
def test_inactive_rows_untouched(launcher):
    capacity, n_cats = 6, 3
    state = dict(
        thresholds=torch.zeros(capacity, n_cats),
        masked=torch.zeros(capacity, n_cats, dtype=torch.int8),
        counter=torch.tensor([7, 8, 9, 10, 11, 12], dtype=torch.int32),
        tau=torch.ones(capacity, dtype=torch.int32),
        is_prompt=torch.tensor([0, 1, 0, 0], dtype=torch.int8),
        active=torch.tensor([0, 0, 1, 0, 1, 1], dtype=torch.int8),
    )
    state = {name: t.to(DEVICE) for name, t in state.items()}
    event, cats = launcher(torch.ones(4, n_cats, device=DEVICE), **state)
    assert event.tolist() == [EVENT_OK, EVENT_OK, EVENT_TRIGGER, EVENT_OK]
    assert cats.tolist() == [0, 0, 0b111, 0]
    # Inactive rows 0, 1, 3 keep their counters; rows 4, 5 are beyond N and untouched too.
    assert state["counter"].tolist() == [7, 8, 10, 10, 11, 12]


@pytest.mark.parametrize("launcher", _launchers(), ids=lambda f: f.__name__)
def test_prompt_verdict_ignores_tau_and_resets_counter(launcher):
    state = _single_row_state(
        2,
        tau=torch.tensor([5], dtype=torch.int32),
        counter=torch.tensor([3], dtype=torch.int32),
        is_prompt=torch.ones(1, dtype=torch.int8),
    )
    event, cats = launcher(torch.tensor([[0.9, 0.1]], device=DEVICE), **state)
    assert event.tolist() == [EVENT_TRIGGER] and cats.tolist() == [0b01]
    assert state["counter"].tolist() == [0]


@pytest.mark.parametrize("launcher", _launchers(), ids=lambda f: f.__name__)
def test_nan_score_never_violates_and_top_bit_fits(launcher):
    n_cats = 31
    state = _single_row_state(n_cats, tau=torch.ones(1, dtype=torch.int32))
    scores = torch.zeros(1, n_cats)
    scores[0, 0] = float("nan")
    scores[0, 30] = 0.7
    event, cats = launcher(scores.to(DEVICE), **state)
    assert cats.tolist() == [1 << 30] and event.tolist() == [EVENT_TRIGGER]


@pytest.mark.parametrize("launcher", _launchers(), ids=lambda f: f.__name__)
def test_more_than_31_categories_rejected(launcher):
    state = _single_row_state(32)
    with pytest.raises(ValueError, match="31"):
        launcher(torch.zeros(1, 32, device=DEVICE), **state)


@needs_triton
def test_decide_writes_preallocated_outputs():
    g = _gen(77)
    thresholds, masked, counter, tau, active = _to_device(*_decision_state(16, 10, g))
    scores, is_prompt = _to_device(torch.rand(9, 10, generator=g), torch.zeros(9, dtype=torch.int8))
    event_buf = torch.full((16,), -1, dtype=torch.int32, device=DEVICE)
    cats_buf = torch.full((16,), -1, dtype=torch.int32, device=DEVICE)
    counter_ref = counter.clone()
    event, cats = decide(
        scores, thresholds, masked, counter, tau, is_prompt, active, event=event_buf, cats=cats_buf
    )
    event_ref, cats_ref = decide_reference(
        scores, thresholds, masked, counter_ref, tau, is_prompt, active
    )
    assert event.data_ptr() == event_buf.data_ptr() and cats.data_ptr() == cats_buf.data_ptr()
    _assert_same((event, cats, counter), (event_ref, cats_ref, counter_ref))
    assert torch.all(event_buf[9:] == -1) and torch.all(cats_buf[9:] == -1)


# --------------------------------------------------------------------------------------
# Strategy: Triton vs reference
# --------------------------------------------------------------------------------------

_STRATEGY_INT32 = ("action", "phase", "origin", "counter", "refusal_len", "refusal_start",
                   "query_cats", "query_alert", "alert", "explain_left", "explain_cap",
                   "seen_word", "read_len")
_STRATEGY_TABLES = (*_STRATEGY_INT32, "active", "eos", "refusal")


def _strategy_tables(capacity: int, g: torch.Generator, width: int = 48):
    """Random per-row state that reaches every branch: all phases (3 is unused), origins
    around the refusal's end, bounded and unbounded explanations, flagged and near queries."""
    from types import SimpleNamespace

    def ints(low, high):
        return torch.randint(low, high, (capacity,), generator=g, dtype=torch.int32)

    phases = torch.tensor([0, 1, 2, 4, 5, 6], dtype=torch.int32)
    t = SimpleNamespace(
        action=ints(0, 3), phase=phases[torch.randint(0, 6, (capacity,), generator=g)],
        origin=ints(0, 12), counter=ints(0, 6), refusal_len=ints(0, 6),
        refusal_start=ints(0, 3),
        query_cats=torch.where(torch.rand(capacity, generator=g) < 0.3, ints(1, 1 << 10),
                               torch.zeros(capacity, dtype=torch.int32)),
        query_alert=ints(0, 2), alert=ints(0, 2), explain_left=ints(-1, 3),
        explain_cap=torch.where(torch.rand(capacity, generator=g) < 0.5, ints(0, 12),
                                torch.full((capacity,), -1, dtype=torch.int32)),
        seen_word=ints(0, 2), read_len=ints(0, 20),
        active=(torch.rand(capacity, generator=g) < 0.85).to(torch.int8),
        eos=torch.randint(0, 50, (capacity,), generator=g),
        refusal=torch.randint(50, 100, (capacity, width), generator=g),
    )
    return t


def _strategy_step_inputs(n_rows: int, vocab: int, g: torch.Generator, k: int = 10):
    event = torch.randint(0, 3, (n_rows,), generator=g, dtype=torch.int32)
    cats = torch.randint(0, 1 << k, (n_rows,), generator=g, dtype=torch.int32)
    out_len = torch.randint(-1, 20, (n_rows,), generator=g, dtype=torch.int32)
    out_len[torch.rand(n_rows, generator=g) < 0.2] = 0  # prompt rows
    token = torch.randint(-1, vocab + 2, (n_rows,), generator=g)  # off-vocabulary ids too
    # known tokens: the output length, or one less (a token in flight, async scheduling)
    lag = (torch.rand(n_rows, generator=g) < 0.3).to(torch.int32)
    last = torch.stack([token, (out_len - lag).clamp(min=0).long()])
    masks = (torch.rand(vocab, generator=g) < 0.3, torch.rand(vocab, generator=g) < 0.7)
    report = torch.zeros(n_rows, k + REPORT_COLUMNS, dtype=torch.float64)
    report[:, :k] = torch.rand(n_rows, k, generator=g, dtype=torch.float64)
    return event, cats, out_len, last, masks, report


def _tables_to(t, device):
    from types import SimpleNamespace

    return SimpleNamespace(**{name: getattr(t, name).clone().to(device)
                              for name in _STRATEGY_TABLES})


@needs_triton
@pytest.mark.parametrize("n_rows", [0, 1, 7, 33, 300])
@pytest.mark.parametrize("with_last", [True, False])
def test_strategy_matches_reference(n_rows, with_last):
    """Ten steps of random events over random state: every table, the forced tokens, the
    acted flags, the rewritten events and bits and the telemetry columns agree exactly."""
    g = _gen(n_rows * 13 + with_last)
    capacity, vocab = n_rows + 3, 37
    # 8 refusal tokens a row: positions past them reach the gather's clamp
    ref = _strategy_tables(capacity, g, width=8)
    dev = _tables_to(ref, DEVICE)
    phases_seen, forced_any = set(), False
    for _ in range(10):
        event, cats, out_len, last, masks, report = _strategy_step_inputs(n_rows, vocab, g)
        extra = dict(last=last, vocab=masks) if with_last else {}
        want_event, want_cats, want_report = event.clone(), cats.clone(), report.clone()
        want = advance_strategy_reference(ref, want_event, want_cats, out_len,
                                          report=want_report, **extra)
        got_event, got_cats, got_report = _to_device(event, cats, report)
        extra_d = ({"last": last.to(DEVICE), "vocab": tuple(_to_device(*masks))}
                   if with_last else {})
        got = advance_strategy(dev, got_event, got_cats, out_len.to(DEVICE),
                               report=got_report, **extra_d)
        assert torch.equal(got[0].cpu(), want[0]) and got[0].dtype == torch.int64
        assert torch.equal(got[1].cpu(), want[1]) and got[1].dtype == torch.bool
        assert torch.equal(got_event.cpu(), want_event)
        assert torch.equal(got_cats.cpu(), want_cats)
        assert torch.equal(got_report.cpu(), want_report)
        for name in _STRATEGY_TABLES:
            assert torch.equal(getattr(dev, name).cpu(), getattr(ref, name)), name
        phases_seen |= set(ref.phase[:n_rows].tolist())
        forced_any |= bool((want[0] >= 50).any())  # a refusal token (eos ids are < 50)
    if n_rows >= 33:  # the random walk reached the branches it is meant to compare
        assert phases_seen >= {0, 1, 2, 4, 5, 6} and forced_any


def test_strategy_reference_walks_a_refusal_then_its_explanation():
    """One row, refuse action, refusal [60, 61, 62] whose first token is a separator: a
    trigger at output length 4 after a one-token violating run (so not the whole answer)
    forces the refusal with its separator, one token per step, whatever the events say
    meanwhile; the explanation's one-sentence budget ends at a sentence-ending token after a
    word, and end-of-sequence is forced from then on."""
    g = _gen(5)
    t = _strategy_tables(1, g)
    for name, value in dict(action=1, phase=0, origin=0, counter=1, refusal_len=3,
                            refusal_start=1, query_cats=0, query_alert=0, alert=0,
                            explain_left=1, explain_cap=80, seen_word=0, read_len=0,
                            active=1, eos=2).items():
        getattr(t, name)[0] = value
    t.refusal[0, :3] = torch.tensor([60, 61, 62])
    sentence_end = torch.zeros(8, dtype=torch.bool)
    sentence_end[7] = True  # token 7 ends a sentence; tokens 5..7 hold words
    has_word = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    forced_seen, phases = [], []
    # output lengths 4..9; events: trigger at 4, then violations that must not act while
    # the refusal is forced; the model writes 5 then 7 ("word." ends the one sentence)
    # (each step's last = (last token, known tokens); here nothing is in flight)
    for out_len, event, last in ((4, 2, 5), (5, 2, 60), (6, 2, 61), (7, 0, 62), (8, 0, 5),
                                 (9, 0, 7)):
        forced, acted = advance_strategy_reference(
            t, torch.tensor([event], dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
            torch.tensor([out_len], dtype=torch.int32), torch.tensor([[last], [out_len]]),
            (sentence_end, has_word))
        forced_seen.append(int(forced[0]))
        phases.append(int(t.phase[0]))
    # (the last token at output length L is the one at position L - 1: the refusal sits at
    # 4..6, the model writes 5 at 7 and 7 at 8, read at lengths 8 and 9)
    assert forced_seen == [60, 61, 62, -1, -1, 2]
    assert phases == [1, 1, 2, 2, 2, 5]
    # the same trigger as the whole answer (a prompt row) skips the separator
    for name, value in dict(phase=0, origin=0, counter=0, read_len=0, explain_left=1).items():
        getattr(t, name)[0] = value
    forced, acted = advance_strategy_reference(
        t, torch.tensor([2], dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
        torch.tensor([0], dtype=torch.int32))
    assert int(forced[0]) == 61 and bool(acted[0]) and int(t.origin[0]) == -1


@needs_triton
@pytest.mark.parametrize("n_rows,vocab", [(0, 5), (1, 1), (3, 2048), (5, 2049), (9, 5000)])
def test_force_tokens_matches_reference(n_rows, vocab):
    """Forced rows keep only their token (0; -inf elsewhere, the last column included);
    the other rows are left bit for bit as they were."""
    g = _gen(n_rows * 7 + vocab)
    logits = torch.randn(n_rows, vocab, generator=g)
    forced = torch.randint(0, vocab, (n_rows,), generator=g)
    forced[torch.rand(n_rows, generator=g) < 0.4] = -1
    if n_rows >= 3:
        forced[0], forced[1] = vocab - 1, -1
    if n_rows >= 5:
        forced[2] = vocab + 3  # past the vocabulary: forces nothing, in both
    want = force_tokens_reference(logits.clone(), forced)
    got = force_tokens(logits.clone().to(DEVICE), forced.to(DEVICE))
    assert torch.equal(got.cpu(), want)
    untouched = (forced < 0) | (forced >= vocab)
    assert torch.equal(want[untouched], logits[untouched])


def _worker_processor(sync_free: bool, device: torch.device, capacity: int = 8,
                      n_attribution: int = 0, n_veto: int = 0):
    """The worker's logits processor (default head's width, 16-token toy vocabulary where 8
    ends a sentence and 5 and 10 hold words) with its telemetry captured."""
    import math
    from types import SimpleNamespace

    from safeserve.models.model_store import DEFAULT_HEAD_DIR
    from safeserve.server import safety_wire as W
    from safeserve.server.safety_processor import SafetyLogitsProcessor
    from safeserve.server.worker_telemetry import step_records

    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=capacity),
                          model_config=SimpleNamespace(model=str(DEFAULT_HEAD_DIR)))
    proc = SafetyLogitsProcessor(cfg, device, False)
    proc.sync_free = sync_free
    proc.n_topic = 0
    proc.n_attribution = n_attribution  # 0: the steps hand [N, K] scores, as a format-6 head's
    proc.n_veto = n_veto  # K: a format-11 head's prompt veto columns come last
    proc.prompt_offset = 1.0  # prompt rows' scores move before the decision, and are reported
    proc.sentence_end = torch.zeros(16, dtype=torch.bool, device=device)
    proc.sentence_end[8] = True
    proc.has_word = torch.zeros(16, dtype=torch.bool, device=device)
    proc.has_word[[5, 10]] = True
    sent = []

    def send_later(ready, host, rows, k, _seconds, _device=None):  # CUDA: once the copy lands
        ready.synchronize()
        sent.extend(step_records(host.tolist(), rows, k))

    proc.telemetry = SimpleNamespace(sock=object(), send=lambda records, _s: sent.extend(records),
                                     send_later=send_later)
    outs = [[] for _ in range(capacity)]
    actions = (W.ACTION_REFUSE, W.ACTION_STOP, W.ACTION_ANNOTATE, W.ACTION_REFUSE)
    for i in range(capacity):
        args = W.RowSafetyArgs(rid=f"r{i}", thresholds=[0.5] * 10, masked=[0] * 10, tau=2,
                               action=actions[i % 4], refusal_ids=[9, 5, 8], refusal_sep=1,
                               eos_id=0, alert_scale=math.e, alert_tau=1,
                               explain_sentences=1 if i % 3 else -1,
                               query_flagged=i == 5, query_cats=1 if i == 5 else 0,
                               # every other row samples: its overall threshold moves once
                               # its prompt verdict is clear by 0.5 logits
                               sampled_overall=0.62 if i % 2 else None,
                               clear_scale=math.exp(0.5) if i % 2 else 1.0)
        proc._add(i, args, outs[i])
    return proc, sent, outs


@needs_triton
@pytest.mark.parametrize("n_attribution,n_veto", [(0, 0), (9, 0), (0, 10)],
                         ids=["format-6", "format-7", "format-11"])
def test_the_workers_sync_free_step_runs_two_kernels_and_matches_the_host_path(n_attribution,
                                                                               n_veto):
    """The worker as a GPU runs it (sync-free, the decision and strategy kernels) against the
    CPU's form (host syncs, the PyTorch references): twelve steps of a mixed batch (refuse,
    stop, annotate; bounded and unbounded explanations; a flagged prefill query; the prompt
    offset; two repeated steps, as a discarded prefill chunk's) give the same
    forced tokens and telemetry; and a GPU step is three kernel launches plus a few dozen tensor
    ops (there were ~190 before the strategy's kernels: each a launch on a GPU). A format-7
    head's naming (kernels/safety_decision.attribute_overall, name_overall_bits) adds about 30
    tensor ops per step in this form, not yet folded into the decision kernel; a format-11
    head's prompt veto a few more (its NaN guard, the prefilled rows' exemption, the cap)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    # (a GPU machine running kernels/gpu_check.sh may lack the server's dependencies)
    pytest.importorskip("safeserve.server.safety_processor")
    from safeserve.kernels import safety_decision, safety_strategy
    from safeserve.server.safety_model import STEP_SIGNAL

    fast, fast_sent, fast_outs = _worker_processor(True, DEVICE, n_attribution=n_attribution,
                                                   n_veto=n_veto)
    host, host_sent, host_outs = _worker_processor(False, torch.device("cpu"),
                                                   n_attribution=n_attribution, n_veto=n_veto)
    views = {"aten.view.default", "aten.slice.Tensor", "aten.select.int", "aten.view.dtype",
             "aten.unsqueeze.default", "aten.squeeze.dim", "aten.alias.default",
             "aten.expand.default", "aten.as_strided.default", "aten.detach.default",
             "aten.reshape.default", "aten._unsafe_view.default", "aten.lift_fresh.default"}

    class CountOps(TorchDispatchMode):  # tensor ops that would each launch a kernel
        def __init__(self):
            super().__init__()
            self.ops, self.launches, self.paused = Counter(), 0, False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self.paused and str(func) not in views:
                self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    counter = None
    real_jit = safety_head._jit

    def counting_jit(body):  # a Triton launch counts once, whatever the interpreter does
        kernel = real_jit(body)

        class Launch:
            def __getitem__(self, grid):
                def run(*a, **kw):
                    counter.launches += 1
                    counter.paused = True
                    try:
                        return kernel[grid](*a, **kw)
                    finally:
                        counter.paused = False
                return run
        return Launch()

    g = _gen(3)
    forced_rows = 0
    for step in range(12):
        scores = torch.rand(8, 10, generator=g) * 0.55  # violations now and then
        scores[1] = 0.9 if step >= 2 else 0.1  # row 1 (stop) violates from its third step
        if n_attribution:  # [head K | read-out K (the same: either keeps it) | C]
            scores = torch.cat([scores, scores, torch.rand(8, n_attribution, generator=g)], 1)
        if n_veto:  # [head K | read-out K | veto K]: caps some prompt rows, not others
            scores = torch.cat([scores, scores, torch.rand(8, n_veto, generator=g)], 1)
        logits = torch.randn(8, 16, generator=g)
        STEP_SIGNAL.scores = scores.to(DEVICE)
        counter = CountOps()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(safety_decision, "_jit", counting_jit)
            mp.setattr(safety_strategy, "_jit", counting_jit)
            with counter:
                got = fast.apply(logits.clone().to(DEVICE))
        assert counter.launches == 3, "a decision, a strategy and a forcing launch per step"
        # (on a GPU also the host-to-device copies of the lengths and last tokens, and the
        # telemetry's copy to pinned memory)
        # (+2 since v17: the clear state's reset after an action and its telemetry bit)
        budget = (28 if _ON_CUDA else 22) + (32 if n_attribution else 0) + (VETO_OPS if n_veto else 0)
        assert sum(counter.ops.values()) <= budget, counter.ops
        STEP_SIGNAL.scores = scores.clone()
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("SAFESERVE_FORCE_TRITON")  # the CPU's form: the references
            want = host.apply(logits.clone())
        assert torch.equal(got.cpu(), want)
        assert fast_sent == host_sent
        forced_rows += int((~torch.isfinite(want)).any(dim=1).sum())
        tokens = want.argmax(dim=1).tolist()
        if step in (4, 8):  # the step's tokens are discarded: the next one repeats it
            continue
        for outs in (fast_outs, host_outs):
            for o, tok in zip(outs, tokens):
                o.append(tok)
    assert forced_rows >= 12 and {r.phase for r in host_sent} >= {0, 1, 2, 4, 6}


# --------------------------------------------------------------------------------------
# Packaging
# --------------------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("TRITON_INTERPRET", "SAFESERVE_FORCE_TRITON"):
        env.pop(name, None)
    return env


def test_modules_import_and_serve_without_triton():
    import subprocess

    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from safeserve.kernels.safety_head import safety_scores\n"
        "from safeserve.kernels.safety_decision import decide\n"
        "s = safety_scores(torch.randn(2, 8), torch.randn(3, 8), torch.zeros(3))\n"
        "e, c = decide(s, torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int8),\n"
        "    torch.zeros(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32),\n"
        "    torch.zeros(2, dtype=torch.int8), torch.ones(2, dtype=torch.int8))\n"
        "assert e.tolist() == [2, 2], e\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not (HAS_TRITON and _TRITON_PREIMPORTED), reason="in-process run covers it")
def test_kernels_in_fresh_process():
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@needs_triton
def test_launchers_take_the_triton_path_here():
    # Guards the comparisons above against silently comparing the reference with itself.
    assert safety_head._use_triton(torch.empty(0, device=DEVICE))


@pytest.mark.parametrize("launcher", _launchers(), ids=lambda f: f.__name__)
def test_alert_band_shortens_the_run_after_a_near_prompt(launcher):
    # threshold 0.5 (logit 0); margin 1 logit: the band starts at sigmoid(-1) = 0.269
    margin = torch.tensor([1.0])
    alert = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    band = dict(alert=alert, alert_tau=torch.ones(1, dtype=torch.int32, device=DEVICE),
                alert_scale=torch.exp(margin).to(DEVICE))
    state = _single_row_state(2, tau=torch.tensor([3], dtype=torch.int32),
                              is_prompt=torch.ones(1, dtype=torch.int8))
    event, _ = launcher(torch.tensor([[0.3, 0.1]], device=DEVICE), **state, **band)
    assert event.tolist() == [EVENT_OK] and alert.tolist() == [1]  # near, not flagged
    state["is_prompt"].zero_()
    event, cats = launcher(torch.tensor([[0.6, 0.1]], device=DEVICE), **state, **band)
    assert event.tolist() == [EVENT_TRIGGER] and cats.tolist() == [0b01]  # run of 1 suffices
    # a prompt below the band, or one already flagged, clears it; the full tau applies again
    for prompt_scores, want_event in (([0.2, 0.1], EVENT_OK), ([0.7, 0.1], EVENT_TRIGGER)):
        state["is_prompt"].fill_(1)
        event, _ = launcher(torch.tensor([prompt_scores], device=DEVICE), **state, **band)
        assert event.tolist() == [want_event] and alert.tolist() == [0]
    state["is_prompt"].zero_()
    event, _ = launcher(torch.tensor([[0.6, 0.1]], device=DEVICE), **state, **band)
    assert event.tolist() == [EVENT_VIOLATION]


@pytest.mark.parametrize("launcher", _launchers(), ids=lambda f: f.__name__)
def test_alert_band_of_zero_width_never_alerts(launcher):
    alert = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    band = dict(alert=alert, alert_tau=torch.ones(1, dtype=torch.int32, device=DEVICE),
                alert_scale=torch.ones(1, device=DEVICE))
    state = _single_row_state(2, is_prompt=torch.ones(1, dtype=torch.int8))
    launcher(torch.tensor([[0.4999, 0.1]], device=DEVICE), **state, **band)
    assert alert.tolist() == [0]


@pytest.mark.parametrize("launcher", _launchers(), ids=lambda f: f.__name__)
def test_alert_tables_come_together(launcher):
    state = _single_row_state(2)
    with pytest.raises(ValueError, match="together"):
        launcher(torch.zeros(1, 2, device=DEVICE), **state,
                 alert=torch.zeros(1, dtype=torch.int32, device=DEVICE))
