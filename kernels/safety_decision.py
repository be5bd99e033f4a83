"""Per-row safety decision: head scores + per-request state -> event and category bits.

Row i of the step's scores belongs to the request parked in row i of the persistent state
tables (capacity R >= N). For an active row:

    masked[i, k] : 0 live, 1 allowed by the request, 2 attributed (see below)
    viol_bits[i] = OR over k < K of (masked[i, k] == 0 and scores[i, k] >= thresholds[i, k]) << k
                   | (1 << top[i]) if some attributed column k has scores[i, k] >= thresholds[i, k]
                                   and masked[i, top[i]] == 0
    top[i]       = the highest-scoring column that is not attributed (lowest index on ties)
    violated     = viol_bits[i] != 0

An attributed column is a detector that cannot say which category it saw (the head's overall
`unsafe` output): with an allow-list it still acts, on behalf of the category the head scores
highest, unless the request allows that one. So allowing one category never switches off the
overall detector for the others.

    prompt row : event = TRIGGER if violated else OK;  counter[i] = 0
                 (the prompt verdict is the host's to act on; the counter never latches it)
                 alert[i] = not violated and near, where near is the same test against
                 thresholds moved alert_margin logits lower: t' = t / (t + (1 - t) e^margin)
                 (alert_scale = e^margin; 1: no band)
    decode row : counter[i] = counter[i] + 1 if violated else 0
                 event = TRIGGER if violated and counter[i] >= (alert_tau[i] if alert[i] else tau[i])
                         VIOLATION if violated (counting, not yet triggered)
                         OK otherwise
    cats[i]    = viol_bits[i]

The alert band is the paper's "strategic attention" in threshold form: a prompt that came
within ``alert_margin`` logits of its verdict was not refused, but its answer is watched with
the shorter run ``alert_tau``. Without the alert tables (None) there is no band.

The clear state is its mirror image for sampled decoding (server/safety_config.py): a prompt
row sets clear[i] = not violated and not near at thresholds moved log(clear_scale[i]) logits
lower (clear_scale 1: not violated); at decode rows of a clear request the last column (the
overall output) is compared against sampled_overall[i] instead of its threshold. Without the
clear tables (None) nothing changes.

At prompt rows two things may differ from decode rows, both optional: the request's prompt
verdict has its own thresholds (``prompt_thresholds`` [R, K], e.g. a config whose
``threshold_shift`` moves only the response rule), and the head's prompt offset o (logits)
moves the scores first, in place so that what is reported is what was compared:

    scores[i, k] = s l / (1 - s + s l),   s = scores[i, k], l = prompt_lift = e^o

Inactive rows (no safety config) get event OK, cats 0, and their counter and alert are not
touched (their prompt scores are moved all the same).
A NaN score compares false, so it never violates, and is never the top column.

`decide_reference` is the vectorised PyTorch form; `decide` is the launcher the server calls
once per engine step: a single Triton launch (CUDA, or SAFESERVE_FORCE_TRITON=1 under the
interpreter) with no host synchronisation, or the reference elsewhere.
"""

from __future__ import annotations

import torch
from safeserve.kernels.safety_head import _jit, _next_pow2, _use_triton, tl, triton

MASK_LIVE, MASK_ALLOWED, MASK_ATTRIBUTED = 0, 1, 2

EVENT_OK = 0
EVENT_VIOLATION = 1
EVENT_TRIGGER = 2

# Category bits live in an int32; bit 31 is the sign bit, so at most 31 categories.
MAX_DECISION_CATEGORIES = 31


def attribute_overall(masked: torch.Tensor, attributable: torch.Tensor, named: torch.Tensor,
                      attribution: torch.Tensor, is_prompt: torch.Tensor) -> None:
    """Per-request attribution (checkpoint format 7), in place on ``masked`` [N, K] (int8)
    and ``named`` [N] (int32, -1 = none).

    At a prompt row of a request whose overall column is attributable (``attributable`` [N],
    nonzero: it has an allow-list and no assistant prefill), the head's attribution read-out
    ([N, C] scores, C = K - 1 categories) names the category the request is about, its highest
    score. The overall column then stops being attributed token by token (to whichever
    category the per-token outputs score highest, which on conversational requests is often
    not the request's): it becomes allowed for the whole request if the named category is
    allowed, and live otherwise. Every prompt row rewrites it, so the last prefill chunk (the
    prompt end) is the one that counts. A row with a NaN score (an overflowed hidden state)
    fails closed: live. Tensor ops only: no host synchronisation."""
    if masked.shape[0] == 0:
        return
    idx = torch.argmax(torch.nan_to_num(attribution.float(), nan=-1.0), dim=1)
    allowed = (masked[:, :-1].gather(1, idx[:, None]).squeeze(1) == MASK_ALLOWED) \
        & ~torch.isnan(attribution).any(dim=1)
    pick = (is_prompt.reshape(-1) != 0) & (attributable != 0)
    new = torch.where(allowed, MASK_ALLOWED, MASK_LIVE).to(masked.dtype)
    masked[:, -1] = torch.where(pick, new, masked[:, -1])
    named.copy_(torch.where(pick, idx.to(named.dtype), named))


def gate_topics(event: torch.Tensor, cats: torch.Tensor, alert: torch.Tensor | None,
                masked: torch.Tensor, gated: torch.Tensor, topic: torch.Tensor,
                is_prompt: torch.Tensor, clear: torch.Tensor | None = None) -> torch.Tensor:
    """The topic gate (checkpoint format 8), in place on the step's ``event`` and ``cats``
    ([N] int32, from ``decide``) and ``alert`` ([N] or None).

    At a prompt row of a gated request (``gated`` [N] nonzero: a non-empty allow-list and no
    assistant prefill), every category the request does not allow (``masked`` [N, K] column
    != MASK_ALLOWED) whose topic score (``topic`` [N, C], C = K - 1, served so that the gate
    is open at 0.5) is >= 0.5 violates: the row's event becomes TRIGGER, the category's bit is
    set and the row is neither on alert nor clear (a flagged verdict never is). The per-token head judges
    harm; the gate judges what a request is about, which is what an allow-list speaks to.
    A NaN topic score fails closed (open). Returns the gate's own bits ([N] int32), which the
    report carries so that a flag says where it came from. Tensor ops only: no host
    synchronisation."""
    n = event.shape[0]
    if n == 0:
        return torch.zeros_like(cats)
    c = topic.shape[1]
    open_ = ~(topic.float() < 0.5)  # NaN -> open
    live = masked[:n, :c] != MASK_ALLOWED
    pick = (is_prompt.reshape(-1)[:n] != 0) & (gated[:n] != 0)
    fire = open_ & live & pick[:, None]
    bits = _pack_bits(fire, _bit_values(c, cats.device))
    hit = bits != 0
    cats.copy_(cats | bits)
    event.copy_(torch.where(hit, torch.full_like(event, EVENT_TRIGGER), event))
    if alert is not None:
        alert[:n] = torch.where(hit, torch.zeros_like(alert[:n]), alert[:n])
    if clear is not None:
        clear[:n] = torch.where(hit, torch.zeros_like(clear[:n]), clear[:n])
    return bits


def mask_gated_prompt_categories(masked: torch.Tensor, gated: torch.Tensor,
                                  is_prompt: torch.Tensor) -> torch.Tensor:
    """A copy of ``masked`` ([R, K] int8) in which the category columns (all but the last, the
    overall output) of the step's gated prompt rows (``gated`` and ``is_prompt``, [N], N <= R)
    read as allowed: the decision's masks for a head whose topic gate replaces the per-category
    outputs at gated prompts (``operating_point.gate_replaces_prompt_categories``). The overall
    output keeps its mask (it acts for its named category), the request's own table is not
    touched (its generated tokens are judged by every output), and ``gate_topics`` then judges
    the categories. Tensor ops only: no host synchronisation."""
    out = masked.clone()
    n = is_prompt.reshape(-1).shape[0]
    if n == 0:
        return out
    pick = ((is_prompt.reshape(-1) != 0) & (gated[:n] != 0))[:, None]
    cats = out[:n, :-1]
    cats.copy_(torch.where(pick, torch.full_like(cats, MASK_ALLOWED), cats))
    return out


def name_overall_bits(cats: torch.Tensor, named: torch.Tensor, k: int) -> None:
    """Rows whose overall output violated (bit k - 1 of ``cats`` [N], int32) and whose request
    has a named category (``named`` [N] >= 0) also carry that category's bit, so a flag under
    an allow-list says which category it acted for. In place; tensor ops only."""
    if cats.shape[0] == 0:
        return
    overall = ((cats >> (k - 1)) & 1) != 0
    bit = torch.bitwise_left_shift(torch.ones_like(cats), named.clamp(min=0).to(cats.dtype))
    cats.copy_(torch.where(overall & (named >= 0), cats | bit, cats))


# --------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------


def _bit_values(n: int, device: torch.device) -> torch.Tensor:
    """[n] int32: 1 << k for column k."""
    return torch.ones(n, dtype=torch.int32, device=device) << torch.arange(
        n, dtype=torch.int32, device=device)


def _pack_bits(hit: torch.Tensor, bit_values: torch.Tensor) -> torch.Tensor:
    """[N, n] bool -> [N] int32 with bit k set where column k is. Bits are disjoint, so the
    sum is the OR."""
    return (hit.to(torch.int32) * bit_values).sum(dim=1, dtype=torch.int32)


def _violation_bits_reference(
    scores: torch.Tensor, thresholds: torch.Tensor, masked: torch.Tensor,
    over: torch.Tensor | None = None,
) -> torch.Tensor:
    n_rows, n_cats = scores.shape
    mask = masked[:n_rows]
    if over is None:
        over = scores >= thresholds[:n_rows]
    hit = (mask == MASK_LIVE) & over
    bit_values = _bit_values(n_cats, scores.device)
    bits = _pack_bits(hit, bit_values)
    plain = (mask != MASK_ATTRIBUTED) & ~torch.isnan(scores)
    key = torch.where(plain, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    top = key.argmax(dim=1)  # first maximum on ties
    top_live = mask.gather(1, top[:, None]).squeeze(1) == MASK_LIVE
    attributed = ((mask == MASK_ATTRIBUTED) & over).any(dim=1) & plain.any(dim=1) & top_live
    return bits | torch.where(attributed, bit_values[top], torch.zeros_like(bits))


def alert_over(scores: torch.Tensor, thresholds: torch.Tensor,
               alert_scale: torch.Tensor) -> torch.Tensor:
    """[N, K] score >= its threshold moved log(alert_scale) logits lower, i.e.
    score >= t / (t + (1 - t) s), written without the division (the denominator is positive)
    so the kernel and this reference round alike; a row whose scale is not above 1 has no band."""
    n_rows = scores.shape[0]
    t = thresholds[:n_rows].float()
    s = alert_scale[:n_rows].float()[:, None]
    return (scores.float() * (t + (1.0 - t) * s) >= t) & (s > 1.0)


def decide_reference(
    scores: torch.Tensor,
    thresholds: torch.Tensor,
    masked: torch.Tensor,
    counter: torch.Tensor,
    tau: torch.Tensor,
    is_prompt: torch.Tensor,
    active: torch.Tensor,
    alert: torch.Tensor | None = None,
    alert_tau: torch.Tensor | None = None,
    alert_scale: torch.Tensor | None = None,
    prompt_thresholds: torch.Tensor | None = None,
    prompt_lift: float = 1.0,
    clear: torch.Tensor | None = None,
    clear_scale: torch.Tensor | None = None,
    sampled_overall: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised PyTorch decision.

    Mutates counter[:N] (and alert[:N] and clear[:N], when given; and the prompt rows of
    ``scores``, when ``prompt_lift`` != 1) in place; returns (event, cats), each int32 [N].
    """
    _check_decide_args(scores, thresholds, masked, counter, tau, is_prompt, active)
    _check_alert_args(scores, counter, alert, alert_tau, alert_scale)
    _check_clear_args(scores, counter, clear, clear_scale, sampled_overall)
    _check_prompt_args(scores, thresholds, prompt_thresholds, prompt_lift)
    n_rows = scores.shape[0]
    row_active = active[:n_rows] != 0
    prompt = is_prompt[:n_rows] != 0
    if prompt_lift != 1.0:
        s = scores.float()
        moved = s * prompt_lift / (1.0 - s + s * prompt_lift)
        scores.copy_(torch.where(prompt[:, None], moved, s))
    if prompt_thresholds is not None:
        thresholds = torch.where(prompt[:, None], prompt_thresholds[:n_rows],
                                 thresholds[:n_rows])
    if clear is not None:  # a clear request's generated tokens: the sampled overall threshold
        use = (clear[:n_rows] != 0) & ~prompt
        rows_t = thresholds[:n_rows]
        last = torch.where(use, sampled_overall[:n_rows].to(rows_t.dtype), rows_t[:, -1])
        thresholds = torch.cat([rows_t[:, :-1], last[:, None]], dim=1)
    viol_bits = _violation_bits_reference(scores, thresholds, masked)
    violated = viol_bits != 0

    old_count = counter[:n_rows]
    decode_count = torch.where(violated, old_count + 1, torch.zeros_like(old_count))
    new_count = torch.where(prompt, torch.zeros_like(old_count), decode_count)
    counter[:n_rows] = torch.where(row_active, new_count, old_count)

    row_tau = tau[:n_rows]
    if alert is not None:
        # Only prompt rows set the alert state. Off-GPU, where asking costs no sync, a step
        # with none (nearly every decode step) skips the band's second threshold test.
        if scores.device.type == "cuda" or bool(prompt.any()):
            near_over = alert_over(scores, thresholds, alert_scale)
            near = _violation_bits_reference(scores, thresholds, masked, over=near_over) != 0
            old_alert = alert[:n_rows]
            set_alert = torch.where(prompt, (near & ~violated).to(old_alert.dtype), old_alert)
            alert[:n_rows] = torch.where(row_active, set_alert, old_alert)
        row_tau = torch.where(alert[:n_rows] != 0, alert_tau[:n_rows].to(row_tau.dtype), row_tau)
    if clear is not None and (scores.device.type == "cuda" or bool(prompt.any())):
        clear_near = alert_over(scores, thresholds, clear_scale)
        near = _violation_bits_reference(scores, thresholds, masked, over=clear_near) != 0
        old_clear = clear[:n_rows]
        set_clear = torch.where(prompt, (~near & ~violated).to(old_clear.dtype), old_clear)
        clear[:n_rows] = torch.where(row_active, set_clear, old_clear)
    triggered = violated & (prompt | (new_count >= row_tau))
    # OK=0, VIOLATION=1, TRIGGER=2: violated rows count 1, triggered ones one more.
    event = (violated & row_active).to(torch.int32) + (triggered & row_active).to(torch.int32)
    cats = torch.where(row_active, viol_bits, torch.zeros_like(viol_bits))
    return event, cats


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------


def _safety_decision_kernel(
    scores_ptr,
    thresholds_ptr,
    masked_ptr,
    counter_ptr,
    tau_ptr,
    is_prompt_ptr,
    active_ptr,
    alert_ptr,
    alert_tau_ptr,
    alert_scale_ptr,
    prompt_thresholds_ptr,
    clear_ptr,
    clear_scale_ptr,
    sampled_overall_ptr,
    event_ptr,
    cats_ptr,
    n_rows,
    n_cats,
    prompt_lift,
    stride_sn,
    stride_sk,
    stride_tn,
    stride_tk,
    stride_mn,
    stride_mk,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_ALERT: tl.constexpr,
    HAS_PROMPT_THRESHOLDS: tl.constexpr,
    HAS_PROMPT_LIFT: tl.constexpr,
    HAS_CLEAR: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cats = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    cat_ok = cats < n_cats
    tile_ok = row_ok[:, None] & cat_ok[None, :]
    at_prompt = tl.load(is_prompt_ptr + rows, mask=row_ok, other=0) != 0

    score_ptrs = scores_ptr + rows[:, None] * stride_sn + cats[None, :] * stride_sk
    score = tl.load(score_ptrs, mask=tile_ok, other=0.0)
    if HAS_PROMPT_LIFT:
        # The head's prompt offset, in the reference's order of roundings (`/` compiles to an
        # approximate division on NVIDIA GPUs; div_rn rounds as PyTorch does); stored back so
        # the report shows the scores that were compared.
        lifted = score * prompt_lift
        moved = tl.math.div_rn(lifted, (1.0 - score) + lifted)
        score = tl.where(at_prompt[:, None], moved, score)
        tl.store(score_ptrs, score, mask=tile_ok & at_prompt[:, None])
    threshold_offsets = rows[:, None] * stride_tn + cats[None, :] * stride_tk
    threshold = tl.load(thresholds_ptr + threshold_offsets, mask=tile_ok, other=1.0)
    if HAS_PROMPT_THRESHOLDS:  # the prompt verdict's own (same layout as `thresholds`)
        prompt_threshold = tl.load(prompt_thresholds_ptr + threshold_offsets, mask=tile_ok,
                                   other=1.0)
        threshold = tl.where(at_prompt[:, None], prompt_threshold, threshold)
    if HAS_CLEAR:  # a clear request's generated tokens: the sampled overall threshold
        old_clear = tl.load(clear_ptr + rows, mask=row_ok, other=0)
        sampled = tl.load(sampled_overall_ptr + rows, mask=row_ok, other=1.0)
        use = (old_clear != 0) & (at_prompt == 0)
        is_last = cats[None, :] == n_cats - 1
        threshold = tl.where(use[:, None] & is_last, sampled[:, None], threshold)
    allowed = tl.load(
        masked_ptr + rows[:, None] * stride_mn + cats[None, :] * stride_mk, mask=tile_ok, other=1
    )
    over = score >= threshold
    hit = tile_ok & (allowed == 0) & over
    # Padded columns are never hits; shift them by 0 so no lane computes 1 << 31.
    bit_values = tl.full((BLOCK_K,), 1, tl.int32) << tl.where(cat_ok, cats, 0)
    # Disjoint bits: the sum is the OR.
    viol_bits = tl.sum(tl.where(hit, bit_values[None, :], 0), axis=1).to(tl.int32)
    # Attributed columns (2; literals: a jit body reads only constexpr globals) act for the
    # top-scoring other column, if that one is live. NaN != NaN keeps NaN scores out of the top.
    score_f = score.to(tl.float32)
    plain = tile_ok & (allowed != 2) & (score_f == score_f)
    key = tl.where(plain, score_f, float("-inf"))
    top = tl.argmax(key, axis=1, tie_break_left=True)
    is_top = cats[None, :] == top[:, None]
    top_allowed = tl.sum(tl.where(is_top, allowed.to(tl.int32), 0), axis=1)
    any_plain = tl.max(plain.to(tl.int32), axis=1) > 0
    attributed_over = tl.max((tile_ok & (allowed == 2) & over).to(tl.int32), axis=1) > 0
    attributed = attributed_over & any_plain & (top_allowed == 0)
    top_bit = tl.full((BLOCK_N,), 1, tl.int32) << tl.where(attributed, top, 0)
    viol_bits = viol_bits | tl.where(attributed, top_bit, 0)
    violated = viol_bits != 0

    row_active = tl.load(active_ptr + rows, mask=row_ok, other=0) != 0
    prompt = at_prompt
    decode = at_prompt == 0
    old_count = tl.load(counter_ptr + rows, mask=row_ok, other=0)
    tau = tl.load(tau_ptr + rows, mask=row_ok, other=1)

    new_count = tl.where(violated & decode, old_count + 1, 0)
    if HAS_ALERT:
        # The same test against thresholds moved log(scale) logits lower (see the docstring).
        scale = tl.load(alert_scale_ptr + rows, mask=row_ok, other=1.0)
        threshold_f = threshold.to(tl.float32)
        near_over = (score_f * (threshold_f + (1.0 - threshold_f) * scale[:, None]) >= threshold_f) \
            & (scale[:, None] > 1.0)
        near_hit = tl.max((tile_ok & (allowed == 0) & near_over).to(tl.int32), axis=1) > 0
        near_attr = (tl.max((tile_ok & (allowed == 2) & near_over).to(tl.int32), axis=1) > 0) \
            & any_plain & (top_allowed == 0)
        old_alert = tl.load(alert_ptr + rows, mask=row_ok, other=0)
        new_alert = tl.where(prompt, ((near_hit | near_attr) & (viol_bits == 0)).to(tl.int32),
                             old_alert)
        tl.store(alert_ptr + rows, new_alert, mask=row_ok & row_active)
        alert_tau = tl.load(alert_tau_ptr + rows, mask=row_ok, other=1)
        tau = tl.where(new_alert != 0, alert_tau, tau)
    if HAS_CLEAR:
        # The alert band's test at the clear margin; clear = neither near nor violated.
        c_scale = tl.load(clear_scale_ptr + rows, mask=row_ok, other=1.0)
        c_threshold = threshold.to(tl.float32)
        c_over = (score_f * (c_threshold + (1.0 - c_threshold) * c_scale[:, None]) >= c_threshold) \
            & (c_scale[:, None] > 1.0)
        c_hit = tl.max((tile_ok & (allowed == 0) & c_over).to(tl.int32), axis=1) > 0
        c_attr = (tl.max((tile_ok & (allowed == 2) & c_over).to(tl.int32), axis=1) > 0) \
            & any_plain & (top_allowed == 0)
        new_clear = tl.where(prompt, ((c_hit | c_attr) == 0) & (viol_bits == 0), old_clear != 0)
        tl.store(clear_ptr + rows, new_clear.to(tl.int32), mask=row_ok & row_active)
    triggered = violated & (prompt | (new_count >= tau))
    # Literals rather than the module's EVENT_* names: a jit body may only read constexpr
    # globals. 2 = EVENT_TRIGGER, 1 = EVENT_VIOLATION, 0 = EVENT_OK.
    event = tl.where(triggered, 2, tl.where(violated, 1, 0))
    event = tl.where(row_active, event, 0).to(tl.int32)
    viol_bits = tl.where(row_active, viol_bits, 0)

    # Inactive rows keep their counter: the store is masked off rather than rewritten.
    tl.store(counter_ptr + rows, new_count.to(tl.int32), mask=row_ok & row_active)
    tl.store(event_ptr + rows, event, mask=row_ok)
    tl.store(cats_ptr + rows, viol_bits, mask=row_ok)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------


def _check_decide_args(
    scores: torch.Tensor,
    thresholds: torch.Tensor,
    masked: torch.Tensor,
    counter: torch.Tensor,
    tau: torch.Tensor,
    is_prompt: torch.Tensor,
    active: torch.Tensor,
) -> None:
    """Shape, dtype and device checks only: nothing here reads tensor values (no host sync)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [N, K]; got {tuple(scores.shape)}")
    n_rows, n_cats = scores.shape
    if n_cats > MAX_DECISION_CATEGORIES:
        raise ValueError(
            f"K={n_cats} categories do not fit the int32 category bitmask "
            f"(at most {MAX_DECISION_CATEGORIES})"
        )
    if thresholds.dim() != 2 or masked.dim() != 2:
        raise ValueError("thresholds and masked must be [R, K]")
    capacity = thresholds.shape[0]
    if thresholds.shape[1] != n_cats or tuple(masked.shape) != tuple(thresholds.shape):
        raise ValueError(
            f"thresholds {tuple(thresholds.shape)} / masked {tuple(masked.shape)} must be "
            f"[R, {n_cats}]"
        )
    if capacity < n_rows:
        raise ValueError(f"state capacity R={capacity} is below the batch N={n_rows}")
    for name, table in (("counter", counter), ("tau", tau), ("active", active)):
        if table.dim() != 1 or table.shape[0] != capacity:
            raise ValueError(f"{name} must be [R={capacity}]; got {tuple(table.shape)}")
    if is_prompt.dim() != 1 or is_prompt.shape[0] < n_rows:
        raise ValueError(f"is_prompt must be [N={n_rows}]; got {tuple(is_prompt.shape)}")
    if counter.dtype != torch.int32:
        raise ValueError(f"counter must be int32 (updated in place); got {counter.dtype}")
    for name, t in (
        ("thresholds", thresholds),
        ("masked", masked),
        ("counter", counter),
        ("tau", tau),
        ("is_prompt", is_prompt),
        ("active", active),
    ):
        if t.device != scores.device:
            raise ValueError(f"{name} is on {t.device}, scores on {scores.device}")


def _check_alert_args(scores, counter, alert, alert_tau, alert_scale) -> None:
    given = [t is not None for t in (alert, alert_tau, alert_scale)]
    if not any(given):
        return
    if not all(given):
        raise ValueError("alert, alert_tau and alert_scale come together")
    capacity = counter.shape[0]
    for name, table in (("alert", alert), ("alert_tau", alert_tau), ("alert_scale", alert_scale)):
        if table.dim() != 1 or table.shape[0] != capacity:
            raise ValueError(f"{name} must be [R={capacity}]; got {tuple(table.shape)}")
        if table.device != scores.device:
            raise ValueError(f"{name} is on {table.device}, scores on {scores.device}")
    if alert.dtype != torch.int32 or alert.stride(0) != 1:
        raise ValueError("alert must be int32 with unit stride (updated in place)")


def _check_clear_args(scores, counter, clear, clear_scale, sampled_overall) -> None:
    given = [t is not None for t in (clear, clear_scale, sampled_overall)]
    if not any(given):
        return
    if not all(given):
        raise ValueError("clear, clear_scale and sampled_overall come together")
    capacity = counter.shape[0]
    for name, table in (("clear", clear), ("clear_scale", clear_scale),
                        ("sampled_overall", sampled_overall)):
        if table.dim() != 1 or table.shape[0] != capacity:
            raise ValueError(f"{name} must be [R={capacity}]; got {tuple(table.shape)}")
        if table.device != scores.device:
            raise ValueError(f"{name} is on {table.device}, scores on {scores.device}")
    if clear.dtype != torch.int32 or clear.stride(0) != 1:
        raise ValueError("clear must be int32 with unit stride (updated in place)")


def _check_prompt_args(scores, thresholds, prompt_thresholds, prompt_lift) -> None:
    if prompt_thresholds is not None and (prompt_thresholds.shape != thresholds.shape
                                          or prompt_thresholds.device != scores.device):
        raise ValueError(f"prompt_thresholds must be {tuple(thresholds.shape)} on "
                         f"{scores.device}; got {tuple(prompt_thresholds.shape)}")
    if not (prompt_lift > 0.0 and prompt_lift < float("inf")):
        raise ValueError(f"prompt_lift must be a positive finite number; got {prompt_lift}")
    if prompt_lift != 1.0 and scores.dtype != torch.float32:
        raise ValueError("scores must be float32 to take the prompt lift in place")


def _as_flat(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Read-only 1-D input in the dtype the kernel loads, unit stride (no-op when already so)."""
    return t.to(dtype).contiguous()


def _as_flag(t: torch.Tensor) -> torch.Tensor:
    """A row flag as the int8 the kernel loads. Flags mean "nonzero": a wider int is compared
    first (256 as int32 would otherwise narrow to 0); int8 and bool, what the server passes,
    cost no extra op."""
    return _as_flat(t if t.dtype in (torch.int8, torch.uint8, torch.bool) else t != 0,
                    torch.int8)


def _quiet_step(scores: torch.Tensor, thresholds: torch.Tensor, is_prompt: torch.Tensor,
                sampled_overall: torch.Tensor | None = None) -> bool:
    """No prompt row and no score at or over its threshold (so no violation, no alert to set;
    the overall output's lower of its two thresholds, when a clear request has a second).
    Asking syncs the host: for the CPU path only."""
    n_rows = scores.shape[0]
    if bool(is_prompt[:n_rows].any()):
        return False
    rows_t = thresholds[:n_rows]
    if sampled_overall is not None:
        last = torch.minimum(rows_t[:, -1], sampled_overall[:n_rows].to(rows_t.dtype))
        rows_t = torch.cat([rows_t[:, :-1], last[:, None]], dim=1)
    return not bool((scores >= rows_t).any())


def decide(
    scores: torch.Tensor,
    thresholds: torch.Tensor,
    masked: torch.Tensor,
    counter: torch.Tensor,
    tau: torch.Tensor,
    is_prompt: torch.Tensor,
    active: torch.Tensor,
    event: torch.Tensor | None = None,
    cats: torch.Tensor | None = None,
    *,
    alert: torch.Tensor | None = None,
    alert_tau: torch.Tensor | None = None,
    alert_scale: torch.Tensor | None = None,
    prompt_thresholds: torch.Tensor | None = None,
    prompt_lift: float = 1.0,
    clear: torch.Tensor | None = None,
    clear_scale: torch.Tensor | None = None,
    sampled_overall: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decision launch for the step. Mutates counter[:N] (and alert[:N] and clear[:N]; and the
    prompt rows of ``scores`` when ``prompt_lift`` != 1, see the module docstring); returns
    (event, cats) int32 [N]. ``prompt_thresholds`` ([R, K]) judge the prompt rows instead of
    ``thresholds``.

    `event` / `cats` may be preallocated int32 buffers of at least N elements (unit stride);
    the first N are written and returned as views. `alert` (int32 [R], state), `alert_tau`
    ([R]) and `alert_scale` (float [R], e^margin; 1 = no band) come together or not at all;
    so do `clear` (int32 [R], state), `clear_scale` (float [R], e^margin) and
    `sampled_overall` (float [R]: the overall output's threshold at a clear request's
    generated tokens).
    """
    _check_decide_args(scores, thresholds, masked, counter, tau, is_prompt, active)
    _check_alert_args(scores, counter, alert, alert_tau, alert_scale)
    _check_clear_args(scores, counter, clear, clear_scale, sampled_overall)
    _check_prompt_args(scores, thresholds, prompt_thresholds, prompt_lift)
    n_rows, n_cats = scores.shape
    if not _use_triton(scores):
        if scores.device.type != "cuda" and _quiet_step(scores, thresholds, is_prompt,
                                                        sampled_overall):
            # Off-GPU, where asking costs no sync, most decode steps have nothing over any
            # threshold and no prompt row: the answer is known (what the reference computes
            # then, for a quarter of its time): every event OK, no bits, active counters 0.
            counter[:n_rows].masked_fill_(active[:n_rows] != 0, 0)
            ref_event = torch.zeros(n_rows, dtype=torch.int32, device=scores.device)
            ref_cats = torch.zeros(n_rows, dtype=torch.int32, device=scores.device)
        else:
            ref_event, ref_cats = decide_reference(
                scores, thresholds, masked, counter, tau, is_prompt, active,
                alert, alert_tau, alert_scale, prompt_thresholds, prompt_lift,
                clear, clear_scale, sampled_overall
            )
        if event is not None:
            event[:n_rows].copy_(ref_event)
            ref_event = event[:n_rows]
        if cats is not None:
            cats[:n_rows].copy_(ref_cats)
            ref_cats = cats[:n_rows]
        return ref_event, ref_cats

    event = _output_buffer(event, n_rows, scores.device, "event")
    cats = _output_buffer(cats, n_rows, scores.device, "cats")
    if n_rows == 0:
        return event, cats
    if counter.stride(0) != 1:
        raise ValueError("counter must have unit stride (the kernel writes it in place)")
    scores = scores.float()  # (a float32 copy only when not float32: no lift then)
    thresholds = thresholds.float()
    has_prompt_thresholds = prompt_thresholds is not None
    if has_prompt_thresholds:
        prompt_thresholds = prompt_thresholds.float()
        if prompt_thresholds.stride() != thresholds.stride():
            prompt_thresholds = prompt_thresholds.contiguous()
            thresholds = thresholds.contiguous()
    if masked.dtype != torch.int8:
        masked = masked.to(torch.int8)
    # Padded to at least 16 columns: keeps compiled layouts away from degenerate 1-wide tiles
    # (K=1) at no real cost; the padding is masked off.
    block_k = max(16, _next_pow2(n_cats))
    # A few hundred rows per step at most: 64-row programs keep the tile small and the grid short.
    block_n = 64
    grid = (triton.cdiv(n_rows, block_n),)
    has_alert = alert is not None
    if has_alert:
        alert_tau, alert_scale = _as_flat(alert_tau, torch.int32), _as_flat(alert_scale, torch.float32)
    else:  # never read: HAS_ALERT=False compiles the band out
        alert, alert_tau, alert_scale = counter, counter, counter
    has_clear = clear is not None
    if has_clear:
        clear_scale = _as_flat(clear_scale, torch.float32)
        sampled_overall = _as_flat(sampled_overall, torch.float32)
    else:  # never read: HAS_CLEAR=False compiles it out
        clear, clear_scale, sampled_overall = counter, counter, counter
    _jit(_safety_decision_kernel)[grid](
        scores,
        thresholds,
        masked,
        counter,
        _as_flat(tau, torch.int32),
        _as_flag(is_prompt),
        _as_flag(active),
        alert,
        alert_tau,
        alert_scale,
        prompt_thresholds if has_prompt_thresholds else thresholds,
        clear,
        clear_scale,
        sampled_overall,
        event,
        cats,
        n_rows,
        n_cats,
        float(prompt_lift),
        scores.stride(0),
        scores.stride(1),
        thresholds.stride(0),
        thresholds.stride(1),
        masked.stride(0),
        masked.stride(1),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        HAS_ALERT=has_alert,
        HAS_PROMPT_THRESHOLDS=has_prompt_thresholds,
        HAS_PROMPT_LIFT=prompt_lift != 1.0,
        HAS_CLEAR=has_clear,
        num_warps=4,
        # No fused multiply-add: the alert band's t + (1 - t) * s must round as the reference's
        # two roundings do, or a score one ulp from the moved threshold splits the two paths.
        enable_fp_fusion=False,
    )
    return event, cats


def _output_buffer(
    buf: torch.Tensor | None, n_rows: int, device: torch.device, name: str
) -> torch.Tensor:
    if buf is None:
        return torch.empty(n_rows, dtype=torch.int32, device=device)
    if buf.dtype != torch.int32 or buf.dim() != 1 or buf.shape[0] < n_rows or buf.device != device:
        raise ValueError(f"{name} must be an int32 [>= {n_rows}] buffer on {device}")
    if buf.stride(0) != 1:
        raise ValueError(f"{name} must have unit stride")
    return buf[:n_rows]
