"""Per-row decoding strategy: the decision's event -> the token to force, and the row's phase.

One engine step, per row i of the batch (N rows; state tables of capacity R >= N), after the
decision kernel (kernels/safety_decision.py) has produced ``event`` and ``cats``:

1. The prefill query verdict (a prefilled request's prompt without the prefill, judged by
   the HTTP side): at a prompt row (out_len == 0), in its alert band it alerts the row;
   flagged, it triggers the row with its categories, whatever the text after the prefill
   scores. A triggered prompt row is never alerted (the band is "near, not reached").
2. The phase machine (codes in kernels/strategy_codes.py), positions from the output length,
   so a repeated step (a discarded chunk's token) forces the same token again:

       k = out_len - origin                 (the refusal's own position)
       WATCH     --trigger, refuse-->  REFUSING: refusal[k] forced, one token per step
                                       (it starts past its separator unless it is the
                                       whole answer: a prompt row, or the violating run
                                       it replaces is all the output there is)
       WATCH     --trigger, stop---->  DONE
       REFUSING  --last token------->  REFUSED: the model explains, decisions resume one
                                       step after the refusal's last token
       REFUSED   bounded (explain_cap >= 0): any violation -> RETRACTED; its sentence
                 budget (explain_left, sentences that hold a word, ended by a token of
                 ``sentence_end``) or its token cap spent -> CLOSED
                 unbounded: a trigger -> DONE
       DONE, CLOSED, RETRACTED: end-of-sequence (eos) forced at every step.

   A prompt row always restarts at WATCH (a chunked prefill may show it more than once).
   Decisions are suspended while the refusal is forced and on the first explaining step;
   the counter restarts there and where a refusal starts. ``acted`` marks the step an action
   started (refusal or stop); the event returned is the one acted on (0 while suspended).
3. The telemetry row: columns K.. of ``report`` (float64 [N, K + 6], scores in the first K,
   written by the caller) get event, cats, phase, forced, acted, alert.

Then ``force_tokens`` makes every sampler pick a row's forced token: the row's logits become
-inf everywhere but that token, which gets 0 (finite). Rows with nothing forced are not
touched; the kernel writes only the forced rows (the tensor-op form rewrites all of the
[N, vocabulary] logits every step: at 256 rows and a 128k vocabulary, 256 MB of traffic).

Rows without a safety config (active 0) never trigger and are never forced.

`advance_strategy_reference` / `force_tokens_reference` are the vectorised PyTorch forms;
`advance_strategy` / `force_tokens` the launchers the worker calls once per step each: one Triton launch (CUDA, or SAFESERVE_FORCE_TRITON=1 under
the interpreter) with no host synchronisation, the reference elsewhere. Before this kernel the
strategy was some 60 small tensor ops per step: each a kernel launch on a GPU.
"""

from __future__ import annotations

from typing import Protocol

import torch
from safeserve.kernels import strategy_codes as C
from safeserve.kernels.safety_decision import EVENT_OK, EVENT_TRIGGER
from safeserve.kernels.safety_head import _jit, _use_triton, tl, triton

REPORT_COLUMNS = 6  # event, cats, phase, forced, acted, alert (after the K scores)


class StrategyTables(Protocol):
    """The per-row state the strategy reads and writes (all [R] unless said; the worker's
    SafetyLogitsProcessor holds them)."""

    active: torch.Tensor  # int8: the row has a safety config
    action: torch.Tensor  # int32: ACTION_* on a violation
    phase: torch.Tensor  # int32: PHASE_*
    origin: torch.Tensor  # int32: output length at which refusal[0] is (or would be) forced
    counter: torch.Tensor  # int32: consecutive violating steps (the decision's)
    refusal: torch.Tensor  # int64 [R, L]: the refusal text's token ids
    refusal_len: torch.Tensor  # int32
    refusal_start: torch.Tensor  # int32: separator tokens skipped when not the whole answer
    eos: torch.Tensor  # int64: the token that ends the request
    query_cats: torch.Tensor  # int32: category bits of a flagged prefill query verdict
    query_alert: torch.Tensor  # int32: the prefill query verdict was in its alert band
    alert: torch.Tensor  # int32: the row is alerted (shorter run)
    explain_left: torch.Tensor  # int32: sentences left in the explanation (-1: no limit)
    explain_cap: torch.Tensor  # int32: the explanation's token cap (-1: unbounded)
    seen_word: torch.Tensor  # int32: the current sentence holds a word
    read_len: torch.Tensor  # int32: known output length whose last token was counted


# --------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------


def pack_report(report: torch.Tensor, k: int, event: torch.Tensor, cats: torch.Tensor,
                phase: torch.Tensor, forced: torch.Tensor, acted: torch.Tensor,
                alert: torch.Tensor) -> None:
    """Columns K.. of the step's telemetry rows (float64 holds every category bit up to
    1 << 30 and every token id exactly)."""
    report[:, k:] = torch.stack([event.double(), cats.double(), phase.double(),
                                 forced.double(), acted.double(), alert.double()], dim=1)


def _count_sentences_reference(t: StrategyTables, n: int, wrote: torch.Tensor,
                               last: torch.Tensor, sentence_end: torch.Tensor,
                               has_word: torch.Tensor) -> None:
    left, seen = t.explain_left[:n], t.seen_word[:n]
    vocab = sentence_end.shape[0]
    tok = last.clamp(0, vocab - 1)
    wrote = wrote & (last >= 0) & (last < vocab)
    seen = torch.where(wrote & has_word[tok], torch.ones_like(seen), seen)
    ends = wrote & sentence_end[tok] & (seen != 0)
    t.explain_left[:n] = torch.where(ends & (left > 0), left - 1, left)
    t.seen_word[:n] = torch.where(ends, torch.zeros_like(seen), seen)


def advance_strategy_reference(
    t: StrategyTables, event: torch.Tensor, cats: torch.Tensor, out_len: torch.Tensor,
    last: torch.Tensor | None = None,
    vocab: tuple[torch.Tensor, torch.Tensor] | None = None,
    report: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised PyTorch strategy step. Mutates the tables' rows [:N], ``event`` and
    ``cats`` (int32 [N]) in place; returns (forced int64 [N], -1 = none; acted bool [N])."""
    n = event.shape[0]
    device = event.device
    is_prompt = out_len == 0
    active = t.active[:n] != 0
    # 1. The prefill query verdict at prompt rows.
    alert = torch.where(is_prompt & (t.query_alert[:n] != 0), torch.ones_like(t.alert[:n]),
                        t.alert[:n])
    pre = is_prompt & (t.query_cats[:n] != 0)
    event.copy_(torch.where(pre, torch.full_like(event, EVENT_TRIGGER), event))
    cats.copy_(torch.where(pre, cats | t.query_cats[:n], cats))
    t.alert[:n] = torch.where(is_prompt & (event == EVENT_TRIGGER), torch.zeros_like(alert),
                              alert)
    # 2. The phase machine.
    phase, origin, action = t.phase[:n], t.origin[:n], t.action[:n]
    counter = t.counter[:n]
    phase = torch.where(is_prompt, torch.zeros_like(phase), phase)
    k = out_len - origin
    in_refusal = ((phase == C.PHASE_REFUSING) | (phase == C.PHASE_REFUSED)) & active
    refusal_len = t.refusal_len[:n]
    refusing = in_refusal & (k < refusal_len)
    explaining = in_refusal & (k >= refusal_len)
    # The first explaining step reads the refusal's own last token: nothing to judge yet.
    first = explaining & (k == refusal_len)
    suspended = refusing | first
    event.copy_(torch.where(suspended, torch.zeros_like(event), event))
    trigger = (event == EVENT_TRIGGER) & active & (action != C.ACTION_ANNOTATE)
    start_refusal = trigger & (phase == C.PHASE_WATCH) & (action == C.ACTION_REFUSE)
    # A bounded explanation must read clean from end to end: one step over a threshold ends
    # it (the HTTP side withholds it). A run that reaches tau, the paper's rule, stops only
    # an unbounded explanation.
    bounded = t.explain_cap[:n] >= 0
    retract = explaining & bounded & (event != EVENT_OK)
    start_stop = trigger & (((phase == C.PHASE_WATCH) & (action == C.ACTION_STOP))
                            | (explaining & ~bounded))
    whole = is_prompt | (out_len <= counter)
    start = torch.where(whole, t.refusal_start[:n], torch.zeros_like(origin))
    origin = torch.where(start_refusal, out_len - start, origin)
    k = out_len - origin
    refusing = (refusing | start_refusal) & (k < refusal_len)
    known = out_len
    if last is not None and vocab is not None:
        # The last known token is the model's (past the refusal) and new since the last count.
        known = last[1].to(out_len.dtype)
        wrote = explaining & (known - origin > refusal_len) & (known > t.read_len[:n])
        _count_sentences_reference(t, n, wrote, last[0], *vocab)
    t.read_len[:n] = torch.where(explaining, known, t.read_len[:n])
    spent = ((t.explain_left[:n] == 0)
             | (bounded & (k - refusal_len >= t.explain_cap[:n])))
    close = explaining & spent & ~start_stop & ~retract

    idx = k.clamp(0, t.refusal.shape[1] - 1).long().unsqueeze(1)
    refusal_tok = t.refusal[:n].gather(1, idx).squeeze(1)
    forced = torch.where(refusing, refusal_tok,
                         torch.full((n,), -1, dtype=torch.int64, device=device))
    phase = torch.where(start_refusal, torch.full_like(phase, C.PHASE_REFUSED), phase)
    phase = torch.where(refusing, torch.where(k + 1 >= refusal_len,
                                              torch.full_like(phase, C.PHASE_REFUSED),
                                              torch.full_like(phase, C.PHASE_REFUSING)),
                        phase)
    phase = torch.where(start_stop, torch.full_like(phase, C.PHASE_DONE), phase)
    phase = torch.where(close, torch.full_like(phase, C.PHASE_CLOSED), phase)
    phase = torch.where(retract, torch.full_like(phase, C.PHASE_RETRACTED), phase)
    ended = ((phase == C.PHASE_DONE) | (phase == C.PHASE_CLOSED)
             | (phase == C.PHASE_RETRACTED))
    forced = torch.where(ended & active, t.eos[:n], forced)
    t.counter[:n] = torch.where(suspended | start_refusal, torch.zeros_like(counter), counter)
    t.phase[:n], t.origin[:n] = phase, origin
    acted = start_refusal | start_stop
    if report is not None:
        pack_report(report, report.shape[1] - REPORT_COLUMNS, event, cats, t.phase[:n], forced,
                    acted, t.alert[:n])
    return forced, acted


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------


def _safety_strategy_kernel(
    event_ptr, cats_ptr, out_len_ptr, last_ptr, sentence_end_ptr, has_word_ptr,
    active_ptr, action_ptr, phase_ptr, origin_ptr, counter_ptr, refusal_ptr, refusal_len_ptr,
    refusal_start_ptr, eos_ptr, query_cats_ptr, query_alert_ptr, alert_ptr, explain_left_ptr,
    explain_cap_ptr, seen_word_ptr, read_len_ptr,
    forced_ptr, acted_ptr, report_ptr,
    n_rows, vocab_size, refusal_width, stride_refusal, stride_report, report_k,
    BLOCK_N: tl.constexpr, HAS_LAST: tl.constexpr, HAS_REPORT: tl.constexpr,
):
    # Codes are literals (a jit body reads only constexpr globals); kernels/strategy_codes.py:
    # actions annotate 0, refuse 1, stop 2; phases watch 0, refusing 1, refused 2, done 4,
    # closed 5, retracted 6; events (safety_decision.py) ok 0, trigger 2.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < n_rows
    event = tl.load(event_ptr + rows, mask=ok, other=0)
    cats = tl.load(cats_ptr + rows, mask=ok, other=0)
    out_len = tl.load(out_len_ptr + rows, mask=ok, other=-1)
    active = tl.load(active_ptr + rows, mask=ok, other=0) != 0
    is_prompt = out_len == 0

    # 1. The prefill query verdict at prompt rows.
    alert = tl.load(alert_ptr + rows, mask=ok, other=0)
    query_alert = tl.load(query_alert_ptr + rows, mask=ok, other=0)
    query_cats = tl.load(query_cats_ptr + rows, mask=ok, other=0)
    alert = tl.where(is_prompt & (query_alert != 0), 1, alert)
    pre = is_prompt & (query_cats != 0)
    event = tl.where(pre, 2, event)
    cats = tl.where(pre, cats | query_cats, cats)
    alert = tl.where(is_prompt & (event == 2), 0, alert)

    # 2. The phase machine.
    phase = tl.load(phase_ptr + rows, mask=ok, other=0)
    origin = tl.load(origin_ptr + rows, mask=ok, other=0)
    action = tl.load(action_ptr + rows, mask=ok, other=0)
    counter = tl.load(counter_ptr + rows, mask=ok, other=0)
    refusal_len = tl.load(refusal_len_ptr + rows, mask=ok, other=0)
    explain_cap = tl.load(explain_cap_ptr + rows, mask=ok, other=-1)
    read_len = tl.load(read_len_ptr + rows, mask=ok, other=0)
    phase = tl.where(is_prompt, 0, phase)
    k = out_len - origin
    in_refusal = ((phase == 1) | (phase == 2)) & active
    refusing = in_refusal & (k < refusal_len)
    explaining = in_refusal & (k >= refusal_len)
    first = explaining & (k == refusal_len)
    suspended = refusing | first
    event = tl.where(suspended, 0, event)
    trigger = (event == 2) & active & (action != 0)
    start_refusal = trigger & (phase == 0) & (action == 1)
    bounded = explain_cap >= 0
    retract = explaining & bounded & (event != 0)
    start_stop = trigger & (((phase == 0) & (action == 2)) | (explaining & (explain_cap < 0)))
    whole = is_prompt | (out_len <= counter)
    refusal_start = tl.load(refusal_start_ptr + rows, mask=ok, other=0)
    origin = tl.where(start_refusal, out_len - tl.where(whole, refusal_start, 0), origin)
    k = out_len - origin
    refusing = (refusing | start_refusal) & (k < refusal_len)
    explain_left = tl.load(explain_left_ptr + rows, mask=ok, other=-1)
    known = out_len
    if HAS_LAST:
        seen = tl.load(seen_word_ptr + rows, mask=ok, other=0)
        last = tl.load(last_ptr + rows, mask=ok, other=-1)
        known = tl.load(last_ptr + n_rows + rows, mask=ok, other=0).to(tl.int32)
        wrote = explaining & (known - origin > refusal_len) & (known > read_len)
        wrote = wrote & (last >= 0) & (last < vocab_size)
        tok = tl.minimum(tl.maximum(last, 0), vocab_size - 1)
        has_word = tl.load(has_word_ptr + tok, mask=ok, other=0) != 0
        ends_sentence = tl.load(sentence_end_ptr + tok, mask=ok, other=0) != 0
        seen = tl.where(wrote & has_word, 1, seen)
        ends = wrote & ends_sentence & (seen != 0)
        explain_left = tl.where(ends & (explain_left > 0), explain_left - 1, explain_left)
        seen = tl.where(ends, 0, seen)
        tl.store(explain_left_ptr + rows, explain_left, mask=ok)
        tl.store(seen_word_ptr + rows, seen, mask=ok)
    read_len = tl.where(explaining, known, read_len)
    spent = (explain_left == 0) | (bounded & (k - refusal_len >= explain_cap))
    close = explaining & spent & (start_stop == 0) & (retract == 0)

    idx = tl.minimum(tl.maximum(k, 0), refusal_width - 1)
    refusal_tok = tl.load(refusal_ptr + rows.to(tl.int64) * stride_refusal + idx, mask=ok,
                          other=-1)
    forced = tl.where(refusing, refusal_tok, -1)
    phase = tl.where(start_refusal, 2, phase)
    phase = tl.where(refusing, tl.where(k + 1 >= refusal_len, 2, 1), phase)
    phase = tl.where(start_stop, 4, phase)
    phase = tl.where(close, 5, phase)
    phase = tl.where(retract, 6, phase)
    ended = (phase == 4) | (phase == 5) | (phase == 6)
    eos = tl.load(eos_ptr + rows, mask=ok, other=0)
    forced = tl.where(ended & active, eos, forced).to(tl.int64)
    counter = tl.where(suspended | start_refusal, 0, counter)
    acted = start_refusal | start_stop

    tl.store(event_ptr + rows, event, mask=ok)
    tl.store(cats_ptr + rows, cats, mask=ok)
    tl.store(alert_ptr + rows, alert, mask=ok)
    tl.store(phase_ptr + rows, phase, mask=ok)
    tl.store(origin_ptr + rows, origin, mask=ok)
    tl.store(counter_ptr + rows, counter, mask=ok)
    tl.store(read_len_ptr + rows, read_len, mask=ok)
    tl.store(forced_ptr + rows, forced, mask=ok)
    tl.store(acted_ptr + rows, acted.to(tl.int8), mask=ok)
    if HAS_REPORT:
        row = report_ptr + rows.to(tl.int64) * stride_report + report_k
        tl.store(row + 0, event.to(tl.float64), mask=ok)
        tl.store(row + 1, cats.to(tl.float64), mask=ok)
        tl.store(row + 2, phase.to(tl.float64), mask=ok)
        tl.store(row + 3, forced.to(tl.float64), mask=ok)
        tl.store(row + 4, acted.to(tl.float64), mask=ok)
        tl.store(row + 5, alert.to(tl.float64), mask=ok)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------

_INT32_TABLES = ("action", "phase", "origin", "counter", "refusal_len", "refusal_start",
                 "query_cats", "query_alert", "alert", "explain_left", "explain_cap",
                 "seen_word", "read_len")


def _check_args(t: StrategyTables, event, cats, out_len, last, vocab, report) -> None:
    """Shapes, dtypes and devices only: nothing here reads a tensor's values (no host sync)."""
    n = event.shape[0]
    device = event.device
    for name, x, dtype in (("event", event, torch.int32), ("cats", cats, torch.int32),
                           ("out_len", out_len, torch.int32)):
        if x.dim() != 1 or x.shape[0] != n or x.dtype != dtype or x.device != device:
            raise ValueError(f"{name} must be {dtype} [{n}] on {device}; got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")
        if x.stride(0) != 1:
            raise ValueError(f"{name} must have unit stride")
    capacity = t.phase.shape[0]
    if capacity < n:
        raise ValueError(f"state capacity R={capacity} is below the batch N={n}")
    tables = [(name, torch.int32) for name in _INT32_TABLES]
    tables += [("active", torch.int8), ("eos", torch.int64)]
    for name, dtype in tables:
        x = getattr(t, name)
        if x.dim() != 1 or x.shape[0] != capacity or x.dtype != dtype or x.device != device:
            raise ValueError(f"{name} must be {dtype} [R={capacity}] on {device}")
        if x.stride(0) != 1:
            raise ValueError(f"{name} must have unit stride (written in place)")
    r = t.refusal
    if (r.dim() != 2 or r.shape[0] != capacity or r.dtype != torch.int64 or r.stride(1) != 1
            or r.device != device):
        raise ValueError(f"refusal must be int64 [R={capacity}, L] with unit column stride "
                         f"on {device}")
    if last is not None:
        if (last.shape != (2, n) or last.dtype != torch.int64 or last.device != device
                or not last.is_contiguous()):
            raise ValueError(f"last must be a contiguous int64 [2, {n}] on {device}")
        for name, mask in zip(("sentence_end", "has_word"), vocab):
            if (mask.dim() != 1 or mask.dtype != torch.bool or mask.device != device
                    or mask.stride(0) != 1):
                raise ValueError(f"{name} must be a bool [V] mask with unit stride on {device}")
    if report is not None and (report.dim() != 2 or report.shape[0] != n
                               or report.shape[1] < REPORT_COLUMNS
                               or report.dtype != torch.float64 or report.stride(1) != 1
                               or report.device != device):
        raise ValueError(f"report must be float64 [{n}, K + {REPORT_COLUMNS}] on {device}")


def advance_strategy(
    t: StrategyTables, event: torch.Tensor, cats: torch.Tensor, out_len: torch.Tensor,
    last: torch.Tensor | None = None,
    vocab: tuple[torch.Tensor, torch.Tensor] | None = None,
    report: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One strategy launch for the step (see the module docstring). ``last``: int64 [2, N],
    each row's last known output token (-1: none) and the number of known tokens (under
    async scheduling an output list ends in placeholders for tokens still in flight: a token
    is counted the step after it lands), with ``vocab`` = (sentence_end, has_word) masks over
    the vocabulary, for the explanation's sentence budget (None: not counted this step).
    Mutates the tables, ``event`` and ``cats``; returns (forced int64 [N], acted bool [N])."""
    if last is None or vocab is None:
        last, vocab = None, None
    _check_args(t, event, cats, out_len, last, vocab, report)
    if not _use_triton(event):
        return advance_strategy_reference(t, event, cats, out_len, last, vocab, report)
    n = event.shape[0]
    forced = torch.empty(n, dtype=torch.int64, device=event.device)
    acted = torch.empty(n, dtype=torch.int8, device=event.device)
    if n == 0:
        return forced, acted.view(torch.bool)
    has_last = last is not None
    if has_last:  # bool -> int8 views: no copy
        sentence_end, has_word = (mask.view(torch.int8) for mask in vocab)
    else:  # never read
        sentence_end = has_word = acted
    block_n = 128
    _jit(_safety_strategy_kernel)[(triton.cdiv(n, block_n),)](
        event, cats, out_len, last if has_last else event,
        sentence_end, has_word,
        t.active, t.action, t.phase, t.origin, t.counter, t.refusal, t.refusal_len,
        t.refusal_start, t.eos, t.query_cats, t.query_alert, t.alert, t.explain_left,
        t.explain_cap, t.seen_word, t.read_len,
        forced, acted, report if report is not None else forced,
        n, sentence_end.shape[0], t.refusal.shape[1], t.refusal.stride(0),
        report.stride(0) if report is not None else 0,
        report.shape[1] - REPORT_COLUMNS if report is not None else 0,
        BLOCK_N=block_n, HAS_LAST=has_last, HAS_REPORT=report is not None, num_warps=4,
    )
    return forced, acted.view(torch.bool)


# --------------------------------------------------------------------------------------
# Forcing the chosen tokens
# --------------------------------------------------------------------------------------


def force_tokens_reference(logits: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Rows with ``forced[i] >= 0``: -inf everywhere but that token, which gets 0. In place,
    without a host sync: one masked pass over the batch and one scatter. An id past the
    vocabulary forces nothing (never a row of -inf for the sampler)."""
    rows = (forced >= 0) & (forced < logits.shape[1])
    tok = torch.where(rows, forced, 0).unsqueeze(1)
    value = torch.where(rows.unsqueeze(1), torch.zeros_like(logits[:, :1]),
                        logits.gather(1, tok))
    logits.masked_fill_(rows.unsqueeze(1), float("-inf"))
    return logits.scatter_(1, tok, value)


def _force_tokens_kernel(logits_ptr, forced_ptr, vocab_size, stride_row,
                         BLOCK_V: tl.constexpr):
    # One program per (row, vocabulary tile); a row with nothing forced stores nothing.
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    tok = tl.full((BLOCK_V,), 0, tl.int64) + tl.load(forced_ptr + row)  # the row's, per lane
    value = tl.where(cols == tok, 0.0, float("-inf"))
    # An id past the vocabulary forces nothing, as in the reference.
    tl.store(logits_ptr + row.to(tl.int64) * stride_row + cols,
             value.to(logits_ptr.dtype.element_ty),
             mask=(cols < vocab_size) & (tok >= 0) & (tok < vocab_size))


def force_tokens(logits: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """One launch: rows with ``forced[i] >= 0`` ([N] int64) keep only that token (0 there,
    -inf elsewhere); in place, no host sync. The reference off-GPU."""
    if logits.dim() != 2 or forced.shape != (logits.shape[0],) or forced.dtype != torch.int64:
        raise ValueError(f"logits must be [N, V] and forced int64 [N]; got "
                         f"{tuple(logits.shape)} and {forced.dtype} {tuple(forced.shape)}")
    if not _use_triton(logits):
        return force_tokens_reference(logits, forced)
    n, vocab = logits.shape
    if n == 0 or vocab == 0:
        return logits
    if logits.stride(1) != 1:
        raise ValueError("logits must have unit column stride (written in place)")
    block_v = 2048
    _jit(_force_tokens_kernel)[(n, triton.cdiv(vocab, block_v))](
        logits, forced.contiguous(), vocab, logits.stride(0), BLOCK_V=block_v, num_warps=4)
    return logits
