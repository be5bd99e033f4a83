"""Helper requests: engine requests whose output no client reads, run for the safety signal
alone (the query verdict of a prefilled request, moderation verdicts, the head's startup
self-check)."""

from __future__ import annotations

import contextlib
import uuid

from safeserve.server.engine import Engine
from safeserve.server.errors import APIError, engine_request_error
from safeserve.server.prepare import PreparedRequest, engine_prompt
from safeserve.server.safety_service import RequestSafety, SafetyService
from safeserve.server.safety_wire import StepRecord


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
                                   f"{prep.completion_id}-query-{uuid.uuid4().hex[:8]}",
                                   prep.cache_salt)
    if verdict is None:  # fail closed: a prefilled request is not served unjudged
        raise APIError(503, "the safety signal of the request did not arrive; try again",
                       type="server_error", code="safety_telemetry_missing")
    return verdict


@contextlib.asynccontextmanager
async def helper_request(engine: Engine, svc: SafetyService, prompt_ids: list[int],
                         safety: RequestSafety, rid: str, max_tokens: int,
                         cache_salt: str | None = None):
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
            async for out in engine.llm.generate(engine_prompt(prompt_ids, cache_salt),
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
                         safety: RequestSafety, rid: str,
                         cache_salt: str | None = None) -> StepRecord | None:
    """The head's verdict at the end of ``prompt_ids`` under ``safety``'s config (None if its
    telemetry never came). Two tokens: a chunked prefill reports a step at index 0 per chunk,
    the last one being the verdict, and telemetry travels apart from the engine's output; the
    worker sends its steps in order, so once the second token's step is in, the last chunk's
    is too."""
    async with helper_request(engine, svc, prompt_ids, safety, rid, 2,
                              cache_salt) as (tracker, _):
        await tracker.wait_verdict()  # (a prompt at max_model_len - 1 gets one token only)
        return None if tracker.incomplete else tracker.prompt
