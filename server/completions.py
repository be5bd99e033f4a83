"""Chat completions: the generation loops (non-streaming and SSE) over the in-process engine,
one engine request per choice, with the safety tracker deciding what each client may see.
The request's preparation is in ``prepare``, the safety helper requests in
``helper_requests``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from safeserve.server import metrics
from safeserve.server.engine import Engine
from safeserve.server.errors import APIError, engine_request_error
from safeserve.server.helper_requests import query_verdict
from safeserve.server.prepare import (PreparedRequest, engine_prompt, sampling_params,
                                      shift_temperature)
from safeserve.server.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    SafetyReport,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from safeserve.server.safety_service import SafetyService, disabled_report
from safeserve.server.safety_tracker import RequestTracker
from safeserve.server.token_bytes import token_bytes_reader

log = logging.getLogger(__name__)


@dataclass
class ChoiceState:
    index: int
    request_id: str
    tracker: RequestTracker | None = None
    extra_args: dict | None = None
    pieces: list[tuple[int, int, str]] = field(default_factory=list)  # [start, end) tokens, text
    # per output token, if asked; None for special tokens (end-of-sequence), which are not
    # part of the text and get no entry, as in OpenAI's responses
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    token_ids: list[int | None] = field(default_factory=list)  # per output token (None: unknown)
    decode: Callable | None = None  # the tokenizer's, for a piece the strategy cut into
    sent: int = 0  # pieces already streamed
    tail: str = ""  # the last character streamed (the stop text follows it)
    shown: bool = False  # visible() has returned text
    logprobs_shown: bool = False  # visible_logprobs() has returned an entry
    n_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string that ended it (or a stop token)
    # Safety on, with stop strings: vLLM keeps the stop string in the text; the characters
    # that could begin one (stop_hold: the longest minus one; None: not ours) are held back
    # here, as vLLM would, and the string is cut at the end.
    stop_hold: int | None = None
    held_text: str = ""
    first_token_at: float | None = None
    last_token_at: float | None = None
    host_stopped: bool = False  # ended here for its safety (``_host_stop``), not by the engine

    def add_piece(self, text: str, n_new: int, ids=(), decode=None) -> None:
        if not (n_new or text):
            return
        self.token_ids += list(ids) if len(ids) == n_new else [None] * n_new
        self.decode = decode or self.decode
        start, end = self.n_tokens - n_new, self.n_tokens
        cut = self.tracker.refusal_end if self.tracker is not None else None
        if cut is not None and start < cut < end and decode is not None and len(ids) == n_new:
            # The refusal's last token and the explanation's first came in one output: split
            # them, so the explanation can be withheld without the refusal. The engine's own
            # text is kept where the decoded tail matches its end (a tokenizer may decode a
            # fragment differently, e.g. without its leading space); else the decoded parts.
            tail = decode(list(ids[cut - start:]), skip_special_tokens=True)
            if tail and text.endswith(tail):
                head = text[:len(text) - len(tail)]
            else:
                head = decode(list(ids[:cut - start]), skip_special_tokens=True)
                tail = text[len(head):] if text.startswith(head) else tail
            self.pieces += [(start, cut, head), (cut, end, tail)]
            return
        self.pieces.append((start, end, text))

    def visible(self, pieces) -> str:
        """Text of the pieces the safety strategy did not withhold (called in order, each
        piece once). With the answer withheld, the response opens with the refusal, without
        the paragraph break that set it apart from the answer."""
        text = "".join(self._text_of(p) for p in pieces)
        if not self.shown and self.tracker is not None and self.tracker.answer_withheld:
            text = text.lstrip()
        self.shown = self.shown or bool(text)
        return text

    def outgoing(self, text: str, finished: bool) -> str:
        """``text`` (visible, in order) as the client may see it now: minus the characters
        that could still begin a stop string, and at the end minus the stop string."""
        if self.stop_hold is None:
            return text
        text = self.held_text + text
        if finished:
            self.held_text = ""
            stop = self.stop_reason
            # vLLM stops at the string's first occurrence; a piece rebuilt from its token ids
            # (around a withheld run) may run past it to the end of its last token
            at = text.rfind(stop) if isinstance(stop, str) and stop else -1
            return text[:at] if at >= 0 else text
        cut = max(0, len(text) - self.stop_hold)
        self.held_text = text[cut:]
        return text[:cut]

    def _text_of(self, piece: tuple[int, int, str]) -> str:
        start, end, text = piece
        t = self.tracker
        if t is None:
            return text
        if start == end:  # text without tokens (a final flush): where it stands decides
            return "" if t.withheld(start) else text
        kept = [j for j in range(start, end) if not t.withheld(j)]
        if len(kept) == end - start:
            return text
        # A piece the engine merged from several steps, with a withheld run starting or ending
        # inside it: decode the kept tokens (a prefix and/or a suffix), or, without the ids to
        # do so, withhold the piece whole.
        ids = [self.token_ids[j] if j < len(self.token_ids) else None for j in kept]
        if not kept or self.decode is None or None in ids:
            return ""
        runs: list[list[int]] = []
        for j, tid in zip(kept, ids):
            if runs and j == runs[-1][0] + len(runs[-1]) - 1:
                runs[-1].append(tid)
            else:
                runs.append([j, tid])
        return "".join(self.decode(run[1:], skip_special_tokens=True) for run in runs)

    def add_logprobs(self, ids, step_logprobs, top: int, special: frozenset = frozenset(),
                     decode=None, raw_bytes=None) -> None:
        """One entry per new token from vLLM's per-position {token id: Logprob} maps; a token
        without its map gets none (never the next token's)."""
        maps = list(step_logprobs or ())
        for k, tid in enumerate(ids):
            options = maps[k] if k < len(maps) else None
            self.logprobs.append(None if tid in special or options is None
                                 else token_logprob(tid, options, top, decode, raw_bytes))

    def visible_logprobs(self, pieces) -> ChoiceLogprobs:
        """The entries of the tokens in ``pieces`` the safety strategy did not withhold, token
        by token. A forced token (the refusal, end-of-sequence) keeps its own logprob but not
        its alternatives: those would be the model's likely continuation of a withheld run.
        With the answer withheld, the blank tokens that open the refusal go as its text does
        (visible())."""
        t = self.tracker
        out = []
        for start, end, _ in pieces:
            for j in range(start, min(end, len(self.logprobs))):
                e = self.logprobs[j]
                if e is None or (t is not None and t.withheld(j)):
                    continue
                if (not self.logprobs_shown and not e.token.strip() and t is not None
                        and t.answer_withheld):
                    continue
                if t is not None and t.forced_at(j) and e.top_logprobs:
                    e = e.model_copy(update={"top_logprobs": []})
                out.append(e)
                self.logprobs_shown = True
        return ChoiceLogprobs(content=out)

    @property
    def content_filtered(self) -> bool:
        return self.tracker is not None and self.tracker.stop_forced


def _top(token: str, logprob: float, raw: bytes | None = None) -> TopLogprob:
    value = -9999.0 if math.isnan(logprob) else max(logprob, -9999.0)
    return TopLogprob(token=token, logprob=value,
                      bytes=list(raw if raw is not None else token.encode("utf-8", errors="replace")))


def token_logprob(token_id: int, options: dict, top: int, decode=None,
                  raw_bytes=None) -> TokenLogprob:
    """An OpenAI logprob entry from vLLM's {token id: Logprob(logprob, rank, decoded_token)}
    for one position: the sampled token's, then the ``top`` most likely (by rank). -inf (a
    token the model gave no mass) is clamped to -9999, as OpenAI does: JSON has no infinity.
    ``raw_bytes``: tid -> the token's own bytes (server/token_bytes.py), for ``bytes``."""
    def text(tid: int, lp) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return decode([tid]) if decode is not None else ""

    def entry(tid: int, lp, logprob: float) -> TopLogprob:
        return _top(text(tid, lp), logprob, raw_bytes(tid) if raw_bytes is not None else None)

    chosen = options.get(token_id)
    ranked = sorted(((tid, lp) for tid, lp in options.items() if lp.rank is not None),
                    key=lambda item: item[1].rank)[:top]
    first = entry(token_id, chosen, chosen.logprob if chosen else -9999.0)
    return TokenLogprob(**first.model_dump(),
                        top_logprobs=[entry(tid, lp, lp.logprob) for tid, lp in ranked])


class _Step:
    """One engine output for one choice: the text, token ids and logprobs it added."""

    __slots__ = ("choice", "finished", "ids", "logprobs", "n_new", "text")

    def __init__(self, choice: ChoiceState, text: str, ids, finished: bool, logprobs=None):
        self.choice, self.text, self.ids, self.finished = choice, text, ids, finished
        self.logprobs = logprobs
        self.n_new = len(ids)


async def _merged_steps(engine: Engine, prep: PreparedRequest,
                        choices: list[ChoiceState]) -> AsyncIterator[_Step]:
    """Run one engine request per choice and yield their outputs as they come."""
    if len(choices) == 1:  # the common case: no queue hop per token
        # aclosing: closing this generator closes the inner one now (its abort included)
        async with contextlib.aclosing(_single_steps(engine, prep, choices[0])) as steps:
            async for step in steps:
                yield step
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(choice: ChoiceState):
        try:
            async for step in _engine_steps(engine, prep, choice):
                await queue.put(step)
        except BaseException as e:
            await queue.put(e)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise engine_request_error(item) or item
            else:
                yield item
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        unfinished = [c.request_id for c in choices if c.finish_reason is None]
        try:
            if unfinished:
                metrics.ABORTED.inc()  # once per request, however many choices it had
                for rid in unfinished:
                    await engine.abort(rid)
        finally:
            await asyncio.gather(*tasks, return_exceptions=True)


# Endings that are the engine's failure, not an answer (``_raise_engine_failure``).
_ENGINE_FAILURES = ("error", "abort")


def _raise_engine_failure(choice: ChoiceState) -> None:
    """An engine-side ending that is no answer: ``error`` (the engine failed the request) is
    a 500, ``abort`` that this server did not ask for (the engine shutting down) a 503;
    neither is passed on as a finish reason an OpenAI client does not know. Other endings
    outside OpenAI's set (``repetition``) read as ``stop``."""
    reason = choice.finish_reason
    if reason == "error":
        raise APIError(500, "the engine failed while generating this response",
                       type="server_error", code="engine_error")
    if reason == "abort":
        raise APIError(503, "the engine stopped this request (shutting down?); retry",
                       type="server_error", code="engine_aborted")
    if reason not in ("stop", "length"):
        choice.finish_reason = "stop"


async def _engine_steps(engine: Engine, prep: PreparedRequest,
                        choice: ChoiceState) -> AsyncIterator[_Step]:
    """One choice's engine request, output by output; its ending recorded on ``choice``
    (an engine failure raised). The callers map errors and abort what did not finish."""
    params = sampling_params(prep, choice.index, choice.extra_args)
    outputs = engine.llm.generate(engine_prompt(prep.prompt_ids, prep.cache_salt), params,
                                  choice.request_id)
    async with contextlib.aclosing(outputs):
        async for out in outputs:
            if choice.host_stopped:  # (its abort's own ending is no engine failure)
                return
            c = out.outputs[0]
            if out.finished:
                choice.finish_reason, choice.stop_reason = c.finish_reason, c.stop_reason
                _raise_engine_failure(choice)
            yield _Step(choice, c.text, c.token_ids, out.finished, c.logprobs)


async def _single_steps(engine: Engine, prep: PreparedRequest,
                        choice: ChoiceState) -> AsyncIterator[_Step]:
    try:
        async with contextlib.aclosing(_engine_steps(engine, prep, choice)) as steps:
            async for step in steps:
                yield step
    except Exception as e:  # engine-side validation of our params, a full queue
        raise (engine_request_error(e) or e) from None
    finally:
        if choice.finish_reason is None:
            metrics.ABORTED.inc()
            await engine.abort(choice.request_id)


def _observe_timing(prep: PreparedRequest, step: _Step) -> None:
    c = step.choice
    c.n_tokens += step.n_new
    if step.n_new <= 0:
        return
    metrics.GENERATION_TOKENS.inc(step.n_new)  # as they come: a rate panel shows live streams
    now = time.perf_counter()
    if c.first_token_at is None:
        c.first_token_at = now
        if not prep.first_token_seen:  # n > 1: the request's first token, not each choice's
            prep.first_token_seen = True
            metrics.TTFT.observe(now - prep.arrival)
    else:
        gap = (now - c.last_token_at) / step.n_new
        for _ in range(step.n_new):
            metrics.ITL.observe(gap)
    c.last_token_at = now


async def _open_choices(engine: Engine, svc: SafetyService | None,
                        prep: PreparedRequest) -> list[ChoiceState]:
    base = prep.completion_id
    try:
        query = await query_verdict(engine, svc, prep)
    except BaseException:  # failed, or the client went away, before any choice started
        metrics.ABORTED.inc()
        raise
    choices = []
    for i in range(prep.body.n):
        c = ChoiceState(i, f"{base}-{i}-{uuid.uuid4().hex[:8]}")
        if svc is not None and prep.safety is not None:
            c.extra_args, c.tracker = svc.open(c.request_id, prep.safety, engine.eos_id, query,
                                               prefilled=prep.query_ids is not None,
                                               structured=prep.body.structured,
                                               temperature=shift_temperature(prep.body))
            stops = prep.body.stop_list
            if stops:
                c.stop_hold = max(map(len, stops)) - 1
        choices.append(c)
    return choices


def _usage(prep: PreparedRequest, choices: list[ChoiceState]) -> Usage:
    completion = sum(c.n_tokens for c in choices)
    return Usage(prompt_tokens=len(prep.prompt_ids), completion_tokens=completion,
                 total_tokens=len(prep.prompt_ids) + completion)


def _finish_reason(c: ChoiceState) -> str | None:
    return "content_filter" if c.content_filtered else c.finish_reason


def _close(svc: SafetyService | None, prep: PreparedRequest, choices: list[ChoiceState]) -> None:
    metrics.PROMPT_TOKENS.inc(len(prep.prompt_ids))
    ended = [c.finish_reason for c in choices]
    if all(r is not None and r not in _ENGINE_FAILURES for r in ended):
        # Completed requests only: a client that went away, or a failure, is not a latency.
        metrics.E2E.observe(time.perf_counter() - prep.arrival)
    elif None not in ended:
        # Every choice ended, one by an engine failure: a failed request. (A request with an
        # unfinished choice was counted where it was aborted.)
        metrics.ABORTED.inc()
    errors = []
    for c in choices:
        metrics.FINISHED.labels(_finish_reason(c) or "abort").inc()
        if svc is not None and c.tracker is not None:
            # the prompt is one per request: its verdict is counted with the first choice
            try:
                svc.close(c.tracker, c.finish_reason, prompt_metrics=c.index == 0)
            except Exception as e:  # every choice's tracker is released, then it is raised
                errors.append(e)
    if errors:
        raise errors[0]


def _report(engine: Engine, c: ChoiceState) -> SafetyReport:
    if c.tracker is None:
        return disabled_report(engine.spec.has_head)
    return c.tracker.report()


async def _settle(step: _Step) -> None:
    """Wait for the safety telemetry of every token this step delivered."""
    c = step.choice
    if c.tracker is not None and step.n_new:
        await c.tracker.wait_for(c.n_tokens - 1, last=step.finished)
        if (step.finished or c.tracker.host_stop) and c.n_tokens == step.n_new:
            # (see there: index 0 may be an earlier chunk's.) A request the HTTP side stops
            # releases its first tokens only on the final verdict: an earlier chunk's would
            # withhold them for good, or release them ahead of a stop at the prompt.
            await c.tracker.wait_verdict()


async def _host_stop(engine: Engine, step: _Step) -> None:
    """A structured-output request that violated its config ends here (the worker forced
    nothing: a token outside the grammar fails the request in vLLM): its engine request is
    aborted, and this step is its last, ``content_filter``. What the tracker cut (the
    violating run and everything after it) is never released."""
    c = step.choice
    if c.tracker is None or not c.tracker.host_stopped:
        return
    # Its engine output may have ended on a stop string meanwhile (n > 1: a pump runs ahead;
    # or this last output): that string must not cut the text kept here.
    c.stop_reason = None
    if step.finished:
        return  # the engine ended it on its own: content_filter all the same
    c.host_stopped, step.finished = True, True
    c.finish_reason = "stop"  # content_filtered: the tracker's stop_forced is set
    # Final before the abort is awaited: a record still in flight (a re-prefill's repeat of
    # the stopping step) must not undo the stop meanwhile.
    c.tracker.finish(c.finish_reason, c.n_tokens)
    await engine.abort(c.request_id)


def _add_logprobs(engine: Engine, prep: PreparedRequest, step: _Step) -> None:
    if prep.body.logprobs and step.n_new:
        step.choice.add_logprobs(step.ids, step.logprobs, prep.body.top_logprobs or 0,
                                 engine.special_ids, engine.tokenizer.decode,
                                 token_bytes_reader(engine.tokenizer))


def _finish(step: _Step) -> None:
    """Tell the tracker how its request ended, before the last text is released."""
    c = step.choice
    if step.finished and c.tracker is not None:
        c.tracker.finish(c.finish_reason, c.n_tokens, stop_string=isinstance(c.stop_reason, str))


def _stop_suffix(svc: SafetyService | None, c: ChoiceState, before: str) -> str:
    """The stop text of a content-filtered choice, after ``before`` (the text the client got
    ahead of it): a space apart from a word, nothing ahead of a stop at the prompt."""
    if svc is None or not c.content_filtered:
        return ""
    return (" " if before and not before[-1].isspace() else "") + svc.stop_text()


def _with_stop_text(svc: SafetyService | None, c: ChoiceState) -> str:
    text = c.outgoing(c.visible(c.pieces), True)
    return text + _stop_suffix(svc, c, text)


async def complete(engine: Engine, svc: SafetyService | None,
                   prep: PreparedRequest) -> tuple[ChatCompletionResponse, list[SafetyReport]]:
    choices = await _open_choices(engine, svc, prep)
    steps = _merged_steps(engine, prep, choices)
    try:
        async for step in steps:
            if step.choice.host_stopped:  # an output that was on its way when it stopped
                continue
            _observe_timing(prep, step)
            await _settle(step)
            await _host_stop(engine, step)
            step.choice.add_piece(step.text, step.n_new, step.ids, engine.tokenizer.decode)
            _add_logprobs(engine, prep, step)
            _finish(step)
    finally:
        try:
            await steps.aclose()  # aborts unfinished engine requests now, not at collection
        finally:
            _close(svc, prep, choices)
    reports = [_report(engine, c) for c in choices]
    response = ChatCompletionResponse(
        id=prep.completion_id,
        created=prep.created,
        model=prep.body.model,
        choices=[Choice(index=c.index,
                        message=AssistantMessage(content=_with_stop_text(svc, c)),
                        finish_reason=_finish_reason(c),
                        logprobs=c.visible_logprobs(c.pieces) if prep.body.logprobs else None)
                 for c in choices],
        usage=_usage(prep, choices),
        safety=reports[0] if len(reports) == 1 else reports,
    )
    return response, reports


def _sse(obj) -> str:
    """One SSE event. Chunks omit unset fields, except those OpenAI's chunks always carry
    (each choice's ``finish_reason``, null until the last) and the ``safety`` report, which
    keeps its nulls: the same keys as in a non-streamed response."""
    if isinstance(obj, str):
        data = obj
    else:
        d = obj.model_dump(mode="json", exclude_none=True)
        for choice in d.get("choices") or []:
            choice.setdefault("finish_reason", None)
        if getattr(obj, "safety", None) is not None:
            d["safety"] = obj.safety.model_dump(mode="json")
        data = json.dumps(d, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"


def _error_event(e: APIError) -> str:
    metrics.STREAM_ERRORS.labels(e.type).inc()
    return _sse(json.dumps(e.body()))


def _releasable_pieces(c: ChoiceState, finished: bool, holdback: bool) -> list:
    """Pieces that may go to the client now (holdback: only tokens with a settled verdict;
    always: not a refusal's bounded explanation before it has ended)."""
    if c.tracker is None:
        upto = len(c.pieces)
    else:
        settled = c.tracker.releasable(c.n_tokens, finished) if holdback else c.n_tokens
        settled = min(settled, c.tracker.explanation_hold(c.n_tokens, finished),
                      c.tracker.answer_hold(c.n_tokens, finished))
        upto = c.sent
        while upto < len(c.pieces) and c.pieces[upto][1] <= settled:
            upto += 1
    out, c.sent = c.pieces[c.sent:upto], upto
    return out


async def _after(first: _Step | None, steps: AsyncIterator[_Step]) -> AsyncIterator[_Step]:
    """``first`` (an output already taken from ``steps``), then the rest of ``steps``."""
    if first is None:
        return
    yield first
    async for step in steps:
        yield step


async def stream(engine: Engine, svc: SafetyService | None,
                 prep: PreparedRequest) -> AsyncIterator[str]:
    """SSE events of a streamed completion. The first event waits for the engine's first
    output: the engine admits or rejects a request there (a full queue, a dead engine, a
    parameter it refuses), and a rejection raised before the first event is still an HTTP
    error. Whatever fails once the first event is out (the 200 is sent by then) ends the
    stream with an error event and ``[DONE]``, never a cut connection."""
    choices = await _open_choices(engine, svc, prep)
    opts = prep.body.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous_usage = bool(include_usage and opts.continuous_usage_stats)
    holdback = bool(prep.safety and prep.safety.config.holdback)
    steps = _merged_steps(engine, prep, choices)

    def chunk(choice_list: list[ChunkChoice], usage: Usage | None = None,
              safety: SafetyReport | None = None) -> ChatCompletionChunk:
        if usage is None and continuous_usage:
            usage = _usage(prep, choices)
        return ChatCompletionChunk(id=prep.completion_id, created=prep.created,
                                   model=prep.body.model, choices=choice_list, usage=usage,
                                   safety=safety)

    try:
        first = await anext(steps, None)  # raises what the engine rejects: no 200 sent yet
        for c in choices:  # OpenAI opens every choice with the role
            yield _sse(chunk([ChunkChoice(index=c.index,
                                          delta=Delta(role="assistant", content=""))]))
        try:
            async for step in _after(first, steps):
                if step.choice.host_stopped:  # an output that was on its way when it stopped
                    continue
                _observe_timing(prep, step)
                await _settle(step)
                await _host_stop(engine, step)
                c = step.choice
                c.add_piece(step.text, step.n_new, step.ids, engine.tokenizer.decode)
                _add_logprobs(engine, prep, step)
                _finish(step)
                released = _releasable_pieces(c, step.finished, holdback)
                text = c.outgoing(c.visible(released), step.finished)
                if step.finished:
                    text += _stop_suffix(svc, c, c.tail + text)
                c.tail = (c.tail + text)[-1:]
                logprobs = c.visible_logprobs(released) if prep.body.logprobs else None
                if text or step.finished or (logprobs and logprobs.content):
                    yield _sse(chunk(
                        [ChunkChoice(index=c.index,
                                     delta=Delta(content=text) if text else Delta(),
                                     finish_reason=_finish_reason(c) if step.finished else None,
                                     logprobs=logprobs if logprobs and logprobs.content else None)],
                        safety=_report(engine, c) if step.finished else None))
            if include_usage:
                yield _sse(chunk([], usage=_usage(prep, choices)))
        except APIError as e:
            yield _error_event(e)
        except Exception:
            log.exception("stream %s failed after it started", prep.completion_id)
            yield _error_event(APIError(500, "internal server error", type="server_error"))
        yield _sse("[DONE]")
    finally:
        try:
            await steps.aclose()  # aborts unfinished engine requests now, not at collection
        finally:
            _close(svc, prep, choices)
