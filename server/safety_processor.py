"""Worker side, part 2: the decoding strategy, as a vLLM v1 logits processor.

Per persistent-batch row it keeps the request's compiled safety config and strategy state in
device tensors, so that one engine step is: the decision kernel over all rows
(kernels/safety_decision.py), the strategy kernel (kernels/safety_strategy.py: which refusal /
end-of-sequence token each row must take, and its telemetry row), a masked pass that forces
those tokens, and one telemetry message to the HTTP process. Rows of other requests in the
batch are never read or written with another request's state. What stays here is the
persistent batch's bookkeeping: rows added, moved, swapped, parked across preemption.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial

import torch
from safeserve.kernels.safety_decision import (EVENT_TRIGGER, MASK_ATTRIBUTED, MASK_LIVE,
                                               attribute_overall, decide, gate_topics,
                                               mask_gated_prompt_categories, name_overall_bits)
from safeserve.kernels.safety_head import _use_triton, select_prompt_rows
from safeserve.kernels.safety_strategy import (
    REPORT_COLUMNS,
    advance_strategy,
    force_tokens,
    pack_report,
)
from safeserve.models.decision_defaults import prompt_logit_offset
from safeserve.models.checkpoint import load_safety_head
from safeserve.server import safety_wire as W
from safeserve.server.safety_model import STEP_SIGNAL
from safeserve.server.worker_telemetry import StepTelemetry, step_records

# This runs in vLLM's engine process, where only vLLM's loggers are configured: a child of
# its logger is what reaches the server's log there.
log = logging.getLogger("vllm.safeserve.safety_processor")

try:  # vLLM is only importable where the engine runs
    from vllm.v1.sample.logits_processor import (
        BatchUpdate,
        LogitsProcessor,
        MoveDirectionality,
    )
except ImportError:  # pragma: no cover
    LogitsProcessor = object  # type: ignore[assignment,misc]

MAX_REFUSAL_TOKENS = 48
# An explanation of n sentences also ends after n * this many tokens: a loop inside one
# sentence ("I'm sorry, but I'm sorry, but ...") never reaches a sentence end.
EXPLAIN_TOKENS_PER_SENTENCE = 40
MAX_PARKED = 4096
SYNC_FREE_ENV = "SAFESERVE_SYNC_FREE"


SENTENCE_END_CHARS = ".!?\u3002\uff01\uff1f"
CLOSERS = " \"')]}*\u201d\u2019\u00bb"  # may follow a sentence's end: ." .) .** .”


def _ends_sentence(text: str) -> bool:
    text_end = text.rstrip(CLOSERS)
    return "\n" in text or (text_end != "" and text_end[-1] in SENTENCE_END_CHARS)


def vocab_masks(tokenizer_path, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per vocabulary id: does the token end a sentence (its text, closing quotes, brackets
    and spaces dropped, ends in . ! ? or it holds a newline), and does it hold a letter.
    (None, None) without a tokenizer path (unit tests); a tokenizer that cannot be loaded
    fails the engine's start, rather than serve explanations the budget cannot end."""
    if not tokenizer_path:
        return None, None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    ends = [_ends_sentence(t) for t in texts]
    words = [any(ch.isalpha() for ch in t) for t in texts]  # "1." starts a list, ends nothing
    return (torch.tensor(ends, dtype=torch.bool, device=device),
            torch.tensor(words, dtype=torch.bool, device=device))


def _ends(params) -> tuple[int | None, frozenset[int]] | None:
    """What ends a request for certain, from its sampling parameters (None: unknown)."""
    if params is None or not hasattr(params, "max_tokens"):
        return None
    stops = set(getattr(params, "stop_token_ids", None) or ())
    eos = getattr(params, "eos_token_id", None)  # None with ignore_eos
    if eos is not None:
        stops.add(eos)
    return params.max_tokens, frozenset(stops)


class SafetyLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        r = vllm_config.scheduler_config.max_num_seqs
        # Built before the model loads: read the head's width from the checkpoint itself.
        head = load_safety_head(vllm_config.model_config.model)
        k = head.weight.shape[0]
        self.k = k
        # A separate prompt read-out judges prompt rows alone, or beside the head's own
        # verdict (checkpoint format 5: flag when either does).
        self.prompt_either = head.prompt_either
        # Format 10: a request without an allow-list has its prompt judged by the read-out
        # (moved by a logit shift) and the own overall output; None: as every other request.
        own, shift = head.no_allowlist_rule
        self.no_allowlist_rule = None if (own, shift) == ("all", 0.0) else (own == "overall",
                                                                          shift)
        # Format 7: the scores end with C attribution columns, read at prompt rows only.
        self.n_attribution = head.served_outputs[2]
        # Format 8: C more columns after those, the topic gate, also read at prompt rows only.
        self.n_topic = head.served_outputs[3]
        # Format 11: K more columns at the very end, the prompt veto (prompt rows only).
        self.n_veto = head.served_outputs[4]
        # Format 9 may leave a gated prompt's categories to the gate alone (the per-category
        # outputs then judge its generated tokens only).
        self.gate_replaces = self.n_topic > 0 and head.gate_replaces_prompt_categories
        self.device = device
        self.pin_memory = is_pin_memory
        # The prompt verdict's own operating point (logits), applied to prompt rows' scores
        # before the decision (and so also to what is reported): kernels/safety_decision.py.
        self.prompt_offset = prompt_logit_offset(head.extra)
        # On a GPU every tensor op is a kernel launch and a host sync stalls the pipeline:
        # the step then runs sync-free (fixed work, kernels for the decision and the
        # strategy). Off-GPU a sync is free and most steps skip work they can prove idle.
        # SYNC_FREE_ENV=1 runs the GPU's form on CPU (tests: with SAFESERVE_FORCE_TRITON=1 and
        # TRITON_INTERPRET=1, its kernels too, in the real engine).
        self.sync_free = device.type == "cuda" or os.environ.get(SYNC_FREE_ENV) == "1"
        path = ("Triton kernels" if _use_triton(torch.empty(0, device=device))
                else "PyTorch references")
        if self.sync_free and device.type != "cuda":
            # A testing mode: say so wherever it runs, on stderr itself (a worker's logging
            # is vLLM's to configure, and is not configured in every process).
            print(f"safeserve: safety processor: sync-free form on {device.type} (the GPU's), "
                  f"{path}", file=sys.stderr, flush=True)
        else:
            log.info("safety processor: %s form, %s",
                     "sync-free" if self.sync_free else "host-synced", path)
        # The state a step changes lives in one [len(_PER_STEP), R] table (each a row view),
        # so that rewinding a repeated step is a few ops for all of them (see
        # _undo_repeated_steps), with a snapshot table of the same shape.
        self._step_state = torch.zeros(len(self._PER_STEP), r, dtype=torch.int32, device=device)
        self._step_before = torch.zeros_like(self._step_state)
        for j, name in enumerate(self._PER_STEP):
            setattr(self, name, self._step_state[j])
            setattr(self, "_before_" + name, self._step_before[j])
        self.thresholds = torch.ones(r, k, dtype=torch.float32, device=device)
        self.masked = torch.ones(r, k, dtype=torch.int8, device=device)
        # Format 7: whether the row's overall column is named at its prompt (an allow-list and
        # no assistant prefill, whose end is the attacker's text), and the category named.
        self.attributable = torch.zeros(r, dtype=torch.int8, device=device)
        self.named = torch.full((r,), -1, dtype=torch.int32, device=device)
        self.tau = torch.ones(r, dtype=torch.int32, device=device)
        self.active = torch.zeros(r, dtype=torch.int8, device=device)
        self.action = torch.zeros(r, dtype=torch.int32, device=device)
        # (per step, above: origin, the output length at which the refusal's first token
        # would be forced, and read_len, the output length whose last token the sentence
        # count has read; kernels/safety_strategy.py)
        self.refusal = torch.zeros(r, MAX_REFUSAL_TOKENS, dtype=torch.int64, device=device)
        self.refusal_len = torch.zeros(r, dtype=torch.int32, device=device)
        # Where the forced refusal starts at a prompt row: past its separator unless prefilled.
        self.refusal_start = torch.zeros(r, dtype=torch.int32, device=device)
        self.eos = torch.zeros(r, dtype=torch.int64, device=device)
        self.query_cats = torch.zeros(r, dtype=torch.int32, device=device)  # 0: not flagged
        # Alert band: state (per step, above: set by the decision at the prompt row), its run
        # length and width.
        self.alert_tau = torch.ones(r, dtype=torch.int32, device=device)
        self.alert_scale = torch.ones(r, dtype=torch.float32, device=device)
        self.query_alert = torch.zeros(r, dtype=torch.int32, device=device)
        # Sampled decoding (clear prompts only): the state is per step, above (clear); the
        # margin's scale and the overall output's threshold at a clear request's tokens
        # (its own threshold where the request has no sampled shift: clear changes nothing).
        self.clear_scale = torch.ones(r, dtype=torch.float32, device=device)
        self.sampled_overall = torch.ones(r, dtype=torch.float32, device=device)
        # Format 11: whether the prompt veto caps this row's prompt verdict. Not a prefilled
        # request's: its prompt row reads the attacker's opening inside the answer, unlike the
        # prompt ends the veto was fitted on (its query verdict, a plain prompt, is vetoed).
        self.vetoable = torch.zeros(r, dtype=torch.int8, device=device)
        # The prompt verdict's thresholds (a threshold_shift moves only `thresholds`, the
        # response rule's): the decision reads these at prompt rows.
        self.prompt_thresholds = torch.ones(r, k, dtype=torch.float32, device=device)
        # Bounded explanation after a refusal: sentences left (-1: no limit) and whether the
        # current sentence has a word yet (a bare newline right after the refusal ends none).
        # (explain_left and seen_word are per step, above)
        self.explain_left.fill_(-1)
        self.explain_cap = torch.full((r,), -1, dtype=torch.int32, device=device)  # tokens
        # A resumed (preempted) request is re-prefilled in chunks; vLLM samples a row for each
        # chunk and discards the token, so the row comes back at the same output length. Its
        # state as it was before the first step at that length is kept, and restored for a
        # repeat: only the last chunk's decision stands (as for a prompt's chunks).
        self.step_len = torch.full((r,), -1, dtype=torch.int32, device=device)
        self._step_before.copy_(self._step_state)
        self.sentence_end, self.has_word = vocab_masks(
            getattr(vllm_config.model_config, "tokenizer", None), device)
        self.rids: list[str | None] = [None] * r
        self.parked: OrderedDict[str, tuple] = OrderedDict()
        self.verdict_only: set[str] = set()  # rows of helper requests (parked mid-answer only)
        self.outputs: list[list[int] | None] = [None] * r  # live refs to output token lists
        # A resumed request's re-prefill chunks all show its output length at resume, and
        # vLLM discards the token of each but the last. Their records wait here (the latest
        # one per request) until the output grows past that length, which proves the last
        # step was the kept chunk (its record is sent), or the request leaves the batch
        # first (discarded: dropped). So the HTTP side never acts on a discarded chunk's
        # verdict, which could otherwise reach it before the kept one, after the engine's
        # token (holdback would release on it).
        self.resuming: dict[str, tuple[int, list[int]]] = {}  # rid -> (length, output list)
        self.deferred: dict[str, Callable[[], None]] = {}  # rid -> sends its latest record
        # (max_tokens, stop token ids) per row: a row removed at one of its ends finished
        self.ends: list[tuple[int | None, frozenset[int]] | None] = [None] * r
        self.telemetry = StepTelemetry()

    @property
    def prompt_lift(self) -> float:
        """e^(prompt offset): the decision kernel's form of it (1.0: no offset)."""
        return math.exp(self.prompt_offset)

    # -- vLLM interface ----------------------------------------------------------------

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = W.RowSafetyArgs.from_extra_args(sampling_params.extra_args)
        if args is not None and len(args.refusal_ids) > MAX_REFUSAL_TOKENS:
            raise ValueError(f"refusal text longer than {MAX_REFUSAL_TOKENS} tokens")

    def is_argmax_invariant(self) -> bool:
        return False  # it forces tokens, greedy requests included

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self._send_kept_chunks()  # before this step's records, and before rows leave
        if batch_update is None:
            return
        for i in batch_update.removed:
            self._park(i)
            self._clear(i)
        # Rows refilled in this step held removed requests too (vLLM omits those indices
        # from `removed`): park them all first, so a request removed and re-added in the same
        # step finds its snapshot wherever it lands. A one-way move fills a hole no add takes.
        refilled = [i for i, *_ in batch_update.added]
        refilled += [dst for _, dst, direction in batch_update.moved
                     if direction != MoveDirectionality.SWAP]
        for i in refilled:
            self._park(i)
            self._clear(i)
        for i, params, _prompt, output_ids in batch_update.added:
            self._add(i, W.RowSafetyArgs.from_extra_args(params.extra_args), output_ids, params)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self._swap(a, b)
            else:
                self._move(a, b)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        n = logits.shape[0]
        if n == 0:
            return logits
        # the step's safety time: the head's (in compute_logits, just before) and this decision's
        t0 = time.perf_counter() - STEP_SIGNAL.head_seconds
        # A NaN score (an overflowed hidden state, e.g. in float16) would compare false, never
        # violate and break the JSON report: it reads as certain instead (fail closed).
        scores = STEP_SIGNAL.take(n)
        attribution = topic = veto = None
        if self.n_veto:  # (prepared in _select_prompt_rows, on steps with prompt work only)
            veto, scores = scores[:, -self.n_veto:], scores[:, :-self.n_veto]
        if self.n_topic:
            topic, scores = scores[:, -self.n_topic:], scores[:, :-self.n_topic]
        if self.n_attribution:  # (split first: a NaN attribution score names nothing)
            attribution, scores = scores[:, -self.n_attribution:], scores[:, :-self.n_attribution]
        raw = scores  # (nan_to_num makes a new tensor: the veto's NaN guard reads this one)
        scores = torch.nan_to_num(scores, nan=1.0)
        # Output length per row (-1: no request): 0 is a prompt row; the strategy derives its
        # positions from it, so a step whose sampled token vLLM discards (a chunked prefill of
        # a resumed request) is simply repeated, never counted twice.
        lengths = [-1 if o is None else len(o) for o in self.outputs[:n]]
        out_len = self._host_row(lengths, torch.int32)  # (pinned on CUDA: no wait)
        self._undo_repeated_steps(n, out_len)
        is_prompt = (out_len == 0).to(torch.int8)
        # Off-GPU, the work only prompt rows need is skipped on the many steps without one.
        prompt_work = self.sync_free or 0 in lengths
        if scores.shape[1] != self.k or veto is not None:  # a prompt read-out or veto
            scores = (self._select_prompt_rows(scores, is_prompt, n, veto, raw)
                      if prompt_work else scores[:, :self.k])
        if attribution is not None and prompt_work:
            # Before the decision: the prompt verdict already acts for the named category.
            attribute_overall(self.masked[:n], self.attributable[:n], self.named[:n],
                              attribution, is_prompt)
        masked = self.masked
        if self.gate_replaces and topic is not None and prompt_work:
            masked = mask_gated_prompt_categories(self.masked, self.attributable, is_prompt)
        # Rows at their prompt: the head's prompt offset moves their scores (in place: what
        # is reported is what was compared) and the request's prompt thresholds judge them.
        event, cats = decide(scores, self.thresholds, masked, self.counter, self.tau,
                             is_prompt, self.active, alert=self.alert, alert_tau=self.alert_tau,
                             alert_scale=self.alert_scale,
                             prompt_thresholds=self.prompt_thresholds if prompt_work else None,
                             prompt_lift=self.prompt_lift if prompt_work else 1.0,
                             clear=self.clear, clear_scale=self.clear_scale,
                             sampled_overall=self.sampled_overall)
        gate_bits = None
        if topic is not None and prompt_work:
            # An allow-listed request about a category it does not allow: its prompt verdict
            # violates for that category, whatever the harm outputs say.
            gate_bits = gate_topics(event, cats, self.alert, self.masked[:n], self.attributable[:n], topic,
                        is_prompt, clear=self.clear)
        # (off-GPU a step with no bit set, nearly every one, has nothing to name)
        if self.n_attribution and (self.sync_free or bool(cats.any())):
            name_overall_bits(cats, self.named[:n], self.k)
        report = None
        if self.telemetry.sock is not None:  # the step's telemetry rows; the strategy fills
            report = torch.empty(n, self.k + REPORT_COLUMNS, dtype=torch.float64,  # the rest
                                 device=scores.device)
            report[:, :self.k] = scores
        if not prompt_work and not bool(((self.phase[:n] != W.PHASE_WATCH)
                                         | (event == EVENT_TRIGGER)).any()):
            # Off-GPU, a step with no prompt row where every row is watching and none
            # triggers changes no state and forces nothing: the strategy would be a no-op
            # (nearly every decode step).
            forced = torch.full((n,), -1, dtype=torch.int64)
            acted = torch.zeros(n, dtype=torch.bool)
            if report is not None:
                pack_report(report, self.k, event, cats, self.phase[:n], forced, acted,
                            self.alert[:n])
        else:
            vocab = None if self.sentence_end is None else (self.sentence_end, self.has_word)
            forced, acted = advance_strategy(self, event, cats, out_len, self._last_tokens(n),
                                             vocab, report)
            # a request that has just acted is judged at the greedy rule from here (its
            # explanation): the sampled threshold was for answers to clear prompts
            self.clear[:n].masked_fill_(acted, 0)
            logits = self._force(logits, forced, sync_free=self.sync_free)
        if report is not None:
            # the flags column carries the clear state in its bit 1 (worker_telemetry)
            report[:, self.k + 5].add_(self.clear[:n], alpha=2)
            if gate_bits is not None:  # one column more: which bits were the gate's
                report = torch.cat([report, gate_bits[:, None].to(report.dtype)], 1)
            self._report(report, time.perf_counter() - t0)
        return logits

    def _select_prompt_rows(self, scores: torch.Tensor, is_prompt: torch.Tensor,
                            n: int, veto: torch.Tensor | None,
                            raw: torch.Tensor) -> torch.Tensor:
        if veto is not None:
            # A score of 1 caps nothing: so a prefilled request's row is not vetoed, a NaN
            # verdict stays certain (fail closed), and a NaN veto column caps nothing.
            keep = self.vetoable[:n, None].to(torch.bool) & ~torch.isnan(raw).any(1, keepdim=True)
            veto = torch.where(keep, torch.nan_to_num(veto, nan=1.0), 1.0)
        if self.no_allowlist_rule is None:
            return select_prompt_rows(scores, is_prompt, self.k, self.prompt_either, veto=veto)
        # No allow-list: every category column of the row's mask is live (the overall
        # column's entry may be rewritten by the attribution at prompt rows; these are not).
        no_allowlist = (self.masked[:n, :-1] == MASK_LIVE).all(1)
        own_overall_only, shift = self.no_allowlist_rule
        return select_prompt_rows(scores, is_prompt, self.k, self.prompt_either, no_allowlist,
                                  own_overall_only, shift, veto)

    def _undo_repeated_steps(self, n: int, out_len: torch.Tensor) -> None:
        """Rows back at the output length of their last step (a discarded chunk's token)
        start again from the state before that length's first step. No sync."""
        repeat = (out_len == self.step_len[:n]) & (out_len > 0)
        now, before = self._step_state[:, :n], self._step_before[:, :n]
        now.copy_(torch.where(repeat, before, now))
        before.copy_(now)
        self.step_len[:n] = out_len

    # -- strategy ----------------------------------------------------------------------

    def _last_tokens(self, n: int) -> torch.Tensor | None:
        """int64 [2, N]: each row's last known output token (-1: none yet) and how many of
        its tokens are known, for rows explaining a refusal. Under async scheduling (GPU) an
        output list ends in -1 placeholders for tokens still in flight, so the last known
        token is the one before them. None when no row needs it (off-GPU, where asking costs
        no sync) or the vocabulary's sentence ends are unknown."""
        if self.sentence_end is None:
            return None
        if not self.sync_free and not bool((self.phase[:n] == W.PHASE_REFUSED).any()):
            return None
        last, known = [], []
        for out in self.outputs[:n]:
            j = len(out) if out else 0
            while j and out[j - 1] < 0:
                j -= 1
            last.append(out[j - 1] if j else -1)
            known.append(j)
        return self._host_row([last, known], torch.int64)

    @staticmethod
    def _force(logits: torch.Tensor, forced: torch.Tensor,
               sync_free: bool | None = None) -> torch.Tensor:
        """Rows with a forced token get -inf everywhere but that token (finite): any sampler
        picks it. In place: a full-vocabulary copy per step costs more than the head."""
        if not (logits.device.type == "cuda" if sync_free is None else sync_free):
            # A host sync is free off-GPU: touch only the forced rows (usually none).
            idx = ((forced >= 0) & (forced < logits.shape[1])).nonzero().squeeze(1)
            if idx.numel():
                logits[idx] = float("-inf")
                logits[idx, forced[idx]] = 0.0
            return logits
        return force_tokens(logits, forced)  # one launch; writes only the forced rows

    def _report(self, packed: torch.Tensor, seconds: float) -> None:
        """Send the step's telemetry rows (``packed``: float64 [N, K + 6], see
        kernels/safety_strategy.py, and at a step that consulted the topic gate its bits in
        one column more) for the rows that belong to a request."""
        n = packed.shape[0]
        # Who each row is, now: the batch and the output lists change before a copy lands.
        rows = [(i, rid, len(out)) for i, (rid, out) in enumerate(zip(self.rids[:n],
                                                                        self.outputs[:n]))
                if rid is not None and out is not None]
        k = self.k
        later = [row for row in rows if row[1] in self.resuming]  # see self.resuming
        if later:
            rows = [row for row in rows if row[1] not in self.resuming]
        # A deferred record is sent with seconds=None: it is no step of its own (metrics).
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=self.pin_memory)
            host.copy_(packed, non_blocking=self.pin_memory)
            ready = torch.cuda.Event(blocking=True)  # the sender sleeps on it, not spins
            ready.record()
            self.telemetry.send_later(ready, host, rows, k, seconds, self.device)
            for row in later:
                self.deferred[row[1]] = partial(self.telemetry.send_later, ready, host, [row],
                                                k, None, self.device)
        else:
            host_rows = packed.tolist()
            self.telemetry.send(step_records(host_rows, rows, k), seconds)
            for row in later:
                self.deferred[row[1]] = partial(self.telemetry.send,
                                                step_records(host_rows, [row], k), None)

    # -- persistent-batch bookkeeping ------------------------------------------------------

    def _send_kept_chunks(self) -> None:
        """Resumed requests whose output grew since their resume: the last re-prefill step
        was the kept chunk; its deferred record goes out now."""
        for rid, (length, out) in list(self.resuming.items()):
            if len(out) > length:
                del self.resuming[rid]
                send = self.deferred.pop(rid, None)
                if send is not None:
                    send()

    def _park(self, i: int) -> None:
        """Keep a removed row's strategy state: a preempted request comes back later (as an
        'added' row) and must resume mid-refusal, not start over."""
        rid = self.rids[i]
        if rid is None:
            return
        # Sent after every record of it (one FIFO): a one-token response waits for this.
        self.telemetry.send([W.StepRecord(rid, W.GONE, [], 0, 0, 0, -1, 0,
                                          left_at=len(self.outputs[i] or ()))], None)
        if self.resuming.pop(rid, None) is not None:
            # It leaves before its output grew: its last re-prefill step was discarded too
            # (preempted again, or aborted). A later resume sends its own records.
            self.deferred.pop(rid, None)
        if rid in self.verdict_only:
            self.verdict_only.discard(rid)
            if not self.outputs[i]:
                # Mid-prompt: a resumed one runs its prompt row again, from a fresh state.
                # (Mid-answer it is parked like any other: vLLM resumes it with its output,
                # past its prompt row.) A burst of moderations removed at their end is
                # never parked (below), so it cannot push a preempted request's state out.
                return
        if self._finished(i):
            return  # it never comes back: parking it would only push out a preempted one
        self.parked[rid] = tuple(getattr(self, n)[i].clone() for n in self._TENSORS)
        self.parked.move_to_end(rid)
        # Requests that ended on a stop string or were aborted are parked too: bound it.
        while len(self.parked) > MAX_PARKED:
            self.parked.popitem(last=False)

    def _finished(self, i: int) -> bool:
        """Row i's request has certainly ended (vLLM's own stop test: its last token ends it,
        or it has max_tokens); one that ended on a stop string cannot be told apart here."""
        ends, out = self.ends[i], self.outputs[i]
        if ends is None or not out:
            return False
        max_tokens, stop_ids = ends
        # Under async scheduling the list ends in -1 placeholders for tokens in flight: those
        # are sampled already and count toward max_tokens (vLLM schedules no step past it, so
        # a request removed at its limit may still hold its last one as a placeholder).
        if max_tokens is not None and len(out) >= max_tokens:
            return True
        n = len(out)  # its last known token: the one before the placeholders
        while n and out[n - 1] < 0:
            n -= 1
        return n > 0 and out[n - 1] in stop_ids

    def _add(self, i: int, args: W.RowSafetyArgs | None, output_ids: list[int],
             params=None) -> None:
        self._clear(i)  # its previous occupant was parked by update_state
        if args is None:
            return
        for rid in args.ended:  # finished on the HTTP side: never resumed
            self.parked.pop(rid, None)
        self.ends[i] = _ends(params)
        snapshot = self.parked.pop(args.rid, None)
        if snapshot is not None:
            log.debug("resumed %s with its parked safety state", args.rid)
            for name, value in zip(self._TENSORS, snapshot):
                getattr(self, name)[i] = value
            self.rids[i], self.outputs[i] = args.rid, output_ids
            if args.verdict_only:
                self.verdict_only.add(args.rid)
            if output_ids:
                self.resuming[args.rid] = (len(output_ids), output_ids)
            return
        self.rids[i], self.outputs[i] = args.rid, output_ids
        if args.verdict_only:
            self.verdict_only.add(args.rid)
        self.thresholds[i] = self._host_row(args.thresholds, torch.float32)
        self.masked[i] = self._host_row(args.masked, torch.int8)
        self.attributable[i] = int(args.masked[-1] == MASK_ATTRIBUTED and not args.prefilled)
        self.vetoable[i] = int(not args.prefilled)
        self.tau[i], self.action[i], self.active[i] = args.tau, args.action, 1
        self.refusal_len[i] = len(args.refusal_ids)
        self.refusal_start[i] = 0 if args.prefilled else args.refusal_sep
        if args.refusal_ids:
            self.refusal[i, : len(args.refusal_ids)] = self._host_row(args.refusal_ids,
                                                                       self.refusal.dtype)
        self.eos[i] = args.eos_id
        if output_ids:
            # Its re-prefill chunks' records wait for the kept one (see self.resuming): a
            # helper request that reads answer rows (the self-check) must not see a
            # discarded chunk's row as its token's.
            self.resuming[args.rid] = (len(output_ids), output_ids)
        if output_ids and not args.verdict_only:
            # A resumed request (it has output) whose parked state was evicted: whether it was
            # mid-refusal is lost. Fail closed: it ends here rather than going on unwatched.
            log.error("safety state of resumed request %s was evicted (more than %d parked); "
                      "ending it", args.rid, MAX_PARKED)
            self.phase[i] = W.PHASE_DONE
        if args.query_flagged:
            # a flagged verdict always names an output; the overall one if it somehow did not
            self.query_cats[i] = args.query_cats or 1 << (self.thresholds.shape[1] - 1)
        self.alert_scale[i] = args.alert_scale
        self.clear_scale[i] = args.clear_scale
        self.sampled_overall[i] = (args.thresholds[-1] if args.sampled_overall is None
                                   else args.sampled_overall)
        self.prompt_thresholds[i] = self._host_row(args.prompt_thresholds or args.thresholds,
                                                   torch.float32)
        self.alert_tau[i] = args.alert_tau or args.tau
        self.query_alert[i] = int(args.query_alert)
        self.explain_left[i] = args.explain_sentences
        self.explain_cap[i] = (args.explain_sentences * EXPLAIN_TOKENS_PER_SENTENCE
                               if args.explain_sentences >= 0 else -1)

    def _host_row(self, values, dtype: torch.dtype) -> torch.Tensor:
        """Values built on the host, for the device (a row of a table, a step's lengths). On CUDA it goes
        through pinned memory with a non-blocking copy: a copy from pageable memory would
        wait for the stream, and update_state runs while the previous step is still queued
        (async scheduling). Scalars need none of this: ``t[i] = 3`` is a fill on the device."""
        row = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return row
        if self.pin_memory:
            row = row.pin_memory()
        return row.to(self.device, non_blocking=self.pin_memory)

    def _clear(self, i: int) -> None:
        self.rids[i], self.outputs[i], self.ends[i] = None, None, None
        self.active[i] = 0
        self.counter[i] = 0
        self.phase[i] = W.PHASE_WATCH
        self.origin[i] = 0
        self.read_len[i] = 0
        self.query_cats[i] = 0
        self.alert[i] = 0
        self.clear[i] = 0
        self.query_alert[i] = 0
        self.vetoable[i] = 0
        self.explain_left[i] = -1
        self.explain_cap[i] = -1
        self.seen_word[i] = 0
        self.attributable[i] = 0
        self.named[i] = -1
        self.step_len[i] = -1

    # The state a step changes (see _undo_repeated_steps).
    _PER_STEP = ("counter", "phase", "origin", "alert", "read_len", "explain_left", "seen_word",
                 "clear")
    _TENSORS = ("thresholds", "masked", "counter", "tau", "active", "action", "phase", "origin",
                "read_len",
                "refusal", "refusal_len", "refusal_start", "eos", "query_cats", "alert", "alert_tau",
                "alert_scale", "query_alert", "explain_left", "explain_cap", "seen_word",
                "clear", "clear_scale", "sampled_overall",
                "prompt_thresholds", "attributable", "named", "vetoable",
                "step_len", *("_before_" + name for name in _PER_STEP))

    def _move(self, src: int, dst: int) -> None:
        # vLLM lists a removed row in `removed` only if nothing refills it in the same step:
        # the row a move fills may hold a request it removed, which must be parked too.
        self._park(dst)
        for name in self._TENSORS:
            t = getattr(self, name)
            t[dst] = t[src]
        self.rids[dst], self.outputs[dst] = self.rids[src], self.outputs[src]
        self.ends[dst] = self.ends[src]
        self._clear(src)

    def _swap(self, a: int, b: int) -> None:
        for name in self._TENSORS:
            # Through a copy, not t[[a, b]] = t[[b, a]]: a list index becomes an index tensor
            # copied from the host, which on CUDA waits for the stream (twice per table).
            t = getattr(self, name)
            held = t[a].clone()
            t[a] = t[b]
            t[b] = held
        self.rids[a], self.rids[b] = self.rids[b], self.rids[a]
        self.outputs[a], self.outputs[b] = self.outputs[b], self.outputs[a]
        self.ends[a], self.ends[b] = self.ends[b], self.ends[a]
