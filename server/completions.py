"""Chat completions: prompt rendering, sampling parameters, and the generation loops
(non-streaming and SSE) over the in-process engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from safeserve.server import metrics
from safeserve.server.engine import Engine
from safeserve.server.errors import APIError, bad_request, engine_request_error
from safeserve.server.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    SafetyReport,
    TokenLogprob,
    TopLogprob,
    Usage,
    new_completion_id,
)
from safeserve.server.safety_service import (
    RequestSafety,
    SafetyService,
    carries_guideline_header,
    disabled_report,
    guideline_message,
)
from safeserve.server.safety_tracker import RequestTracker
from safeserve.server.safety_wire import StepRecord

log = logging.getLogger(__name__)


@dataclass
class PreparedRequest:
    """A validated request turned into what the engine needs."""

    body: ChatCompletionRequest
    prompt_ids: list[int]
    max_tokens: int
    safety: RequestSafety | None  # None: served without a safety head (--allow-unsafe)
    query_ids: list[int] | None = None  # prefilled requests: the prompt without the prefill
    completion_id: str = field(default_factory=new_completion_id)
    created: int = field(default_factory=lambda: int(time.time()))
    arrival: float = field(default_factory=time.perf_counter)
    first_token_seen: bool = False  # TTFT is observed once per request, at its first token


def is_prefilled(body: ChatCompletionRequest) -> bool:
    """The conversation ends with an assistant message the model is asked to continue."""
    return bool(body.continue_final_message) and body.messages[-1].role == "assistant"


def render_prompt(engine: Engine, body: ChatCompletionRequest,
                  safety: RequestSafety | None = None, without_prefill: bool = False) -> list[int]:
    """Token ids of the conversation (``without_prefill``: minus the final assistant message,
    ending where the assistant's answer would start)."""
    messages = [
        # `name` goes to the template as vLLM passes it (SmolLM2's ignores it; others use it)
        {"role": "system" if m.role == "developer" else m.role, "content": m.text(),
         **({"name": m.name} if m.name else {})}
        for m in (body.messages[:-1] if without_prefill else body.messages)
    ]
    return render_messages(
        engine, messages, safety,
        add_generation_prompt=True if without_prefill else body.add_generation_prompt,
        continue_final_message=False if without_prefill else body.continue_final_message)


def render_messages(engine: Engine, messages: list[dict], safety: RequestSafety | None, *,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    param: str = "messages", message_params: list[str] | None = None,
                    refuse_guideline_header: bool = True) -> list[int]:
    """Token ids of ``messages`` (role / content dicts) through the model's chat template,
    with the config's guideline in the system prompt. Errors name ``param``, or a message's
    field as ``<param>.<i>.<field>`` (``message_params[i]`` when given). Text that imitates
    the guideline's header is refused unless ``refuse_guideline_header`` is false (text to
    be judged, not answered: moderation)."""
    tok = engine.tokenizer
    client_messages, messages = list(messages), list(messages)

    def texts():  # the client's own (not the guideline); a template may render `name` too
        for i, m in enumerate(client_messages):
            for key in ("content", "name"):
                if isinstance(m.get(key), str):
                    yield m[key], message_params[i] if message_params else f"{param}.{i}.{key}"

    control = control_tokens(tok)
    for text, where in texts():
        # The rendered text is tokenized whole, so a control token typed into a message would
        # be read as one: a client could close its turn and forge others (an assistant turn
        # that the prefill check never sees as a prefill, a system turn).
        found = control.search(text) if control else None
        if found:
            raise bad_request(f"a message may not contain the model's control token "
                              f"{found.group(0)!r}", param=where, code="invalid_value")
    guideline = guideline_message(safety.config) if safety else None
    found = control.search(guideline) if guideline and control else None
    if found:  # a granted client's own guideline, or a preset's
        raise bad_request(f"a guideline may not contain the model's control token "
                          f"{found.group(0)!r}", param="safety_config.guideline",
                          code="invalid_value")
    if guideline:  # CoSAlign places the config in the system prompt
        if messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{guideline}\n\n{messages[0]['content']}"}
        else:
            messages.insert(0, {"role": "system", "content": guideline})
    try:
        text = tok.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message)
    except Exception as e:  # template rejects the conversation shape (e.g. roles out of order)
        raise bad_request(f"messages cannot be rendered by the model's chat template: {e}",
                          param=param) from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # Checked once the conversation is known to fit the context (a longer one is refused for
    # its length by the caller): the check normalises the text (NFKC), which can multiply a
    # message's length, so an unbounded message would hold the interpreter for seconds.
    if refuse_guideline_header and len(ids) < engine.max_model_len:
        for text, where in texts():
            if carries_guideline_header(text):
                raise bad_request("a message may not contain the safety guideline header; "
                                  "send the guideline as the safety config's `guideline` field",
                                  param=where, code="invalid_value")
    return ids


def control_tokens(tok) -> re.Pattern | None:
    """The special tokens that mark a conversation's structure, as one pattern (None: none):
    those the chat template writes around turns, and the tokenizer's BOS and EOS. Other special
    tokens (SmolLM2's ``<filename>``, ``<|endoftext|>``) forge no turn and stay text a client
    may send, tokenized as before. Kept on the tokenizer (built once)."""
    cached = getattr(tok, "_safeserve_control_tokens", False)
    if cached is not False:
        return cached
    special = {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special}
    special |= set(getattr(tok, "all_special_tokens", ()))
    rendered = ""
    for turns in (["system", "user", "assistant"], ["user", "assistant"]):
        try:  # (some templates refuse a system turn)
            rendered = tok.apply_chat_template([{"role": r, "content": f"x{r}"} for r in turns],
                                               tokenize=False)
            break
        except Exception:  # noqa: BLE001 - no template, or one that refuses this shape
            continue
    names = {t for t in special if t and t in rendered}
    names |= {t for t in (getattr(tok, "bos_token", None), getattr(tok, "eos_token", None)) if t}
    pattern = (re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True))))
               if names else None)
    try:
        tok._safeserve_control_tokens = pattern
    except AttributeError:  # a tokenizer that takes no attributes: built each time
        pass
    return pattern


async def prepare(engine: Engine, body: ChatCompletionRequest,
                  safety: RequestSafety | None) -> PreparedRequest:
    """Render and tokenize in a worker thread: a long conversation takes seconds to tokenize,
    which must not stall the event loop (other requests, /health) meanwhile. The request's
    clock (TTFT, end-to-end latency) starts here, so that time and the wait for a thread count."""
    arrival = time.perf_counter()
    prep = await asyncio.to_thread(prepare_sync, engine, body, safety)
    prep.arrival = arrival
    return prep


def prepare_sync(engine: Engine, body: ChatCompletionRequest,
                 safety: RequestSafety | None) -> PreparedRequest:
    prompt_ids = render_prompt(engine, body, safety)
    limit = engine.max_model_len
    if len(prompt_ids) >= limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens, but the prompt has "
            f"{len(prompt_ids)} tokens.", param="messages", code="context_length_exceeded")
    room = limit - len(prompt_ids)
    wanted = body.requested_max_tokens
    if wanted is not None and wanted > room:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise bad_request(
            f"This model's maximum context length is {limit} tokens; the prompt has "
            f"{len(prompt_ids)} tokens, so at most {room} can be generated, but {wanted} were "
            f"requested.", param=param, code="context_length_exceeded")
    query_ids = None
    if safety is not None and is_prefilled(body):
        query_ids = render_prompt(engine, body, safety, without_prefill=True)
    prep = PreparedRequest(body, prompt_ids, wanted or room, safety, query_ids)
    _check_sampling(prep)
    return prep


def _check_sampling(prep: PreparedRequest) -> None:
    """vLLM's own checks of the sampling parameters, before anything is sent (a stream's 200
    included), so that what it rejects is a 400 here."""
    try:
        for index in {0, prep.body.n - 1}:
            sampling_params(prep, index)
    except Exception as e:
        if not isinstance(e, (TypeError, OverflowError)) and engine_request_error(e) is None:
            raise
        raise bad_request(f"invalid sampling parameters: {e}") from None


async def query_verdict(engine: Engine, svc: SafetyService | None,
                        prep: PreparedRequest) -> StepRecord | None:
    """For a prefilled request, the safety verdict on the conversation without the prefill.

    The head's prompt verdict is read where the answer starts; with an attacker's prefill
    ("Sure, here is how ...") that point is inside the answer, where the head judges the
    answer so far, not the request. So the query is scored on its own first: a one-token
    request over the same prefix, before the
    real one (cost: one extra prefill, for prefilled requests only)."""
    if svc is None or prep.query_ids is None:
        return None
    verdict = await prompt_verdict(engine, svc, prep.query_ids, prep.safety,
                                   f"{prep.completion_id}-query-{uuid.uuid4().hex[:8]}")
    if verdict is None:  # fail closed: a prefilled request is not served unjudged
        raise APIError(503, "the safety signal of the request did not arrive; try again",
                       type="server_error", code="safety_telemetry_missing")
    return verdict


@contextlib.asynccontextmanager
async def helper_request(engine: Engine, svc: SafetyService, prompt_ids: list[int],
                         safety: RequestSafety, rid: str, max_tokens: int):
    """A helper request whose output is only read, not returned to a client: greedy,
    end-of-sequence ignored, ``max_tokens`` long, run to its end. Yields its tracker and the
    token ids it generated; the tracker stops receiving telemetry when the block ends."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    extra, tracker = svc.open(rid, safety, engine.eos_id, verdict_only=True)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                            extra_args=extra, output_kind=RequestOutputKind.FINAL_ONLY)
    finished = False
    token_ids: tuple[int, ...] = ()
    try:
        try:
            async for out in engine.llm.generate({"prompt_token_ids": list(prompt_ids)},
                                                 params, rid):
                finished = out.finished
                token_ids = tuple(out.outputs[0].token_ids)
        except Exception as e:  # engine-side validation of the request, a full queue
            raise (engine_request_error(e) or e) from None
        yield tracker, token_ids
    finally:
        try:
            if not finished:
                await engine.abort(rid)
        finally:
            svc.discard(tracker)


async def prompt_verdict(engine: Engine, svc: SafetyService, prompt_ids: list[int],
                         safety: RequestSafety, rid: str) -> StepRecord | None:
    """The head's verdict at the end of ``prompt_ids`` under ``safety``'s config (None if its
    telemetry never came). Two tokens: a chunked prefill reports a step at index 0 per chunk,
    the last one being the verdict, and telemetry travels apart from the engine's output; the
    worker sends its steps in order, so once the second token's step is in, the last chunk's
    is too."""
    async with helper_request(engine, svc, prompt_ids, safety, rid, 2) as (tracker, _):
        await tracker.wait_verdict()  # (a prompt at max_model_len - 1 gets one token only)
        return None if tracker.incomplete else tracker.prompt


def sampling_params(prep: PreparedRequest, index: int, extra_args: dict | None = None):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    b = prep.body
    seed = None if b.seed is None else b.seed + index
    if seed == -1:  # vLLM reads -1 as "no seed"; torch seeds -1 as 2**64 - 1: the same seed
        seed = (1 << 64) - 1
    # top_p 0 (OpenAI accepts it) keeps only the likeliest token: greedy. vLLM wants (0, 1].
    greedy = b.top_p == 0.0
    return SamplingParams(
        n=1,
        max_tokens=prep.max_tokens,
        temperature=0.0 if greedy else 1.0 if b.temperature is None else b.temperature,
        top_p=1.0 if b.top_p is None or greedy else b.top_p,
        presence_penalty=b.presence_penalty or 0.0,
        frequency_penalty=b.frequency_penalty or 0.0,
        stop=b.stop_list or None,
        # With safety on, each output's text must be its own tokens' text, for withholding
        # token by token. Excluding stop strings makes vLLM hold back the text's last
        # characters and release them with a later output (a withheld run's text could ride
        # out with the next clean piece): so keep them, and cut them here (ChoiceState).
        include_stop_str_in_output=bool(b.stop_list) and extra_args is not None,
        seed=seed,
        ignore_eos=b.ignore_eos,
        logprobs=(b.top_logprobs or 0) if b.logprobs else None,
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra_args,
    )


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
        """Text of the pieces the safety strategy did not withhold."""
        return "".join(self._text_of(p) for p in pieces)

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
                     decode=None) -> None:
        """One entry per new token from vLLM's per-position {token id: Logprob} maps; a token
        without its map gets none (never the next token's)."""
        maps = list(step_logprobs or ())
        for k, tid in enumerate(ids):
            options = maps[k] if k < len(maps) else None
            self.logprobs.append(None if tid in special or options is None
                                 else token_logprob(tid, options, top, decode))

    def visible_logprobs(self, pieces) -> ChoiceLogprobs:
        """The entries of the tokens in ``pieces`` the safety strategy did not withhold, token
        by token. A forced token (the refusal, end-of-sequence) keeps its own logprob but not
        its alternatives: those would be the model's likely continuation of a withheld run."""
        t = self.tracker
        out = []
        for start, end, _ in pieces:
            for j in range(start, min(end, len(self.logprobs))):
                e = self.logprobs[j]
                if e is None or (t is not None and t.withheld(j)):
                    continue
                if t is not None and t.forced_at(j) and e.top_logprobs:
                    e = e.model_copy(update={"top_logprobs": []})
                out.append(e)
        return ChoiceLogprobs(content=out)

    @property
    def content_filtered(self) -> bool:
        return self.tracker is not None and self.tracker.stop_forced


def _top(token: str, logprob: float) -> TopLogprob:
    value = -9999.0 if math.isnan(logprob) else max(logprob, -9999.0)
    return TopLogprob(token=token, logprob=value,
                      bytes=list(token.encode("utf-8", errors="replace")))


def token_logprob(token_id: int, options: dict, top: int, decode=None) -> TokenLogprob:
    """An OpenAI logprob entry from vLLM's {token id: Logprob(logprob, rank, decoded_token)}
    for one position: the sampled token's, then the ``top`` most likely (by rank). -inf (a
    token the model gave no mass) is clamped to -9999, as OpenAI does: JSON has no infinity."""
    def text(tid: int, lp) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return decode([tid]) if decode is not None else ""

    chosen = options.get(token_id)
    ranked = sorted(((tid, lp) for tid, lp in options.items() if lp.rank is not None),
                    key=lambda item: item[1].rank)[:top]
    entry = _top(text(token_id, chosen), chosen.logprob if chosen else -9999.0)
    return TokenLogprob(**entry.model_dump(),
                        top_logprobs=[_top(text(tid, lp), lp.logprob) for tid, lp in ranked])


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
    async for out in engine.llm.generate(
        {"prompt_token_ids": prep.prompt_ids}, params, choice.request_id
    ):
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
    query = await query_verdict(engine, svc, prep)
    choices = []
    for i in range(prep.body.n):
        c = ChoiceState(i, f"{base}-{i}-{uuid.uuid4().hex[:8]}")
        if svc is not None and prep.safety is not None:
            c.extra_args, c.tracker = svc.open(c.request_id, prep.safety, engine.eos_id, query,
                                               prefilled=prep.query_ids is not None)
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
    for c in choices:
        metrics.FINISHED.labels(_finish_reason(c) or "abort").inc()
        if svc is not None and c.tracker is not None:
            # the prompt is one per request: its verdict is counted with the first choice
            svc.close(c.tracker, c.finish_reason, prompt_metrics=c.index == 0)


def _report(engine: Engine, c: ChoiceState) -> SafetyReport:
    if c.tracker is None:
        return disabled_report(engine.spec.has_head)
    return c.tracker.report()


async def _settle(step: _Step) -> None:
    """Wait for the safety telemetry of every token this step delivered."""
    c = step.choice
    if c.tracker is not None and step.n_new:
        await c.tracker.wait_for(c.n_tokens - 1, last=step.finished)
        if step.finished and c.n_tokens == 1:
            await c.tracker.wait_verdict()  # (see there: index 0 may be an earlier chunk's)


def _add_logprobs(engine: Engine, prep: PreparedRequest, step: _Step) -> None:
    if prep.body.logprobs and step.n_new:
        step.choice.add_logprobs(step.ids, step.logprobs, prep.body.top_logprobs or 0,
                                 engine.special_ids, engine.tokenizer.decode)


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
            _observe_timing(prep, step)
            await _settle(step)
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
        settled = min(settled, c.tracker.explanation_hold(c.n_tokens, finished))
        upto = c.sent
        while upto < len(c.pieces) and c.pieces[upto][1] <= settled:
            upto += 1
    out, c.sent = c.pieces[c.sent:upto], upto
    return out


async def stream(engine: Engine, svc: SafetyService | None,
                 prep: PreparedRequest) -> AsyncIterator[str]:
    """SSE events of a streamed completion. Whatever fails once the first event is out (the
    200 is sent by then) ends the stream with an error event and ``[DONE]``, never a cut
    connection."""
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
        for c in choices:  # OpenAI opens every choice with the role
            yield _sse(chunk([ChunkChoice(index=c.index,
                                          delta=Delta(role="assistant", content=""))]))
        try:
            async for step in steps:
                _observe_timing(prep, step)
                await _settle(step)
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
