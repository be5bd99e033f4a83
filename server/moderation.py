"""Moderations (``POST /v1/moderations``, OpenAI's request and response shape): the safety
head's prompt verdict as a service for other systems.

Each input is judged as the user turn of a new conversation, exactly as a chat request with
the same text and safety config would be judged before its first token: the same rendering
(the config's guideline in the system prompt), the same head, prompt offset, thresholds, allowed
categories and decision kernel, run through the engine as a helper request
(``helper_requests.prompt_verdict``). So a moderation result and the ``safety.prompt`` verdict of
that chat request agree. Inputs run concurrently (the engine batches them); one request may send
at most ``--max-moderation-tokens`` prompt tokens in all.
"""

from __future__ import annotations

import asyncio
import re
import uuid

from safeserve.server import metrics
from safeserve.server.helper_requests import prompt_verdict
from safeserve.server.prepare import as_plain_text, render_messages
from safeserve.server.engine import Engine
from safeserve.server.errors import APIError, bad_request
from safeserve.server.protocol import ModerationRequest, ModerationResponse, ModerationResult
from safeserve.server.safety_service import RequestSafety, SafetyService
from safeserve.server.safety_tracker import verdict_scores


# OpenAI's own moderation models: clients send these names by habit; they mean "moderate".
OPENAI_MODERATION_MODEL = re.compile(r"^(omni|text)-moderation-[a-z0-9.-]+$")


def _render_all(engine: Engine, body: ModerationRequest, safety: RequestSafety) -> list[list[int]]:
    limit, budget = engine.max_model_len, engine.settings.max_moderation_tokens
    texts = body.texts()
    out, total = [], 0
    for i, text in enumerate(texts):
        param = f"input.{i}" if len(texts) > 1 else "input"
        # Any text may be judged, the guideline's header words included: no answer is
        # generated from it, so it conditions nothing. A control token in it (a forged turn,
        # what a gateway most needs screened) is judged as the text it is, broken so that it
        # is no token: a chat request's 400 here would read as "not flagged" to some gateways.
        text = as_plain_text(engine.tokenizer, text)
        ids = render_messages(engine, [{"role": "user", "content": text}], safety, param=param,
                              message_params=[param], refuse_guideline_header=False)
        if len(ids) >= limit:
            raise bad_request(f"{param} renders to {len(ids)} tokens; this model's maximum "
                              f"context length is {limit}", param=param,
                              code="context_length_exceeded")
        total += len(ids)
        if total > budget:
            raise bad_request(f"the inputs render to more than {budget} tokens in all (the "
                              "server's --max-moderation-tokens): send fewer or shorter ones",
                              param="input", code="moderation_too_large")
        out.append(ids)
    return out



# OpenAI's moderation categories, each read from the taxonomy ids that fall under it (those the
# server's taxonomy has): the official client exposes only these names as attributes (its
# `self_harm` attribute reads the key "self-harm"), so a response carries them beside the
# head's own outputs. A category with no counterpart here is never flagged, score 0.
OPENAI_CATEGORIES = {
    "harassment": (), "harassment/threatening": (),
    "hate": ("discrimination",), "hate/threatening": (),
    "illicit": ("weapons", "drugs", "financial_crime"), "illicit/violent": ("weapons",),
    "self-harm": ("self_harm",), "self-harm/intent": (), "self-harm/instructions": (),
    "sexual": ("sexual",), "sexual/minors": (),
    "violence": ("violence",), "violence/graphic": (),
}


def openai_categories(flags: dict[str, bool], scores: dict[str, float]
                      ) -> tuple[dict[str, bool], dict[str, float]]:
    """OpenAI's category flags and scores from the head's (any of its mapped outputs; the
    highest score among them)."""
    out_flags, out_scores = {}, {}
    for name, ids in OPENAI_CATEGORIES.items():
        ids = [i for i in ids if i in scores]
        out_flags[name] = any(flags.get(i, False) for i in ids)
        out_scores[name] = max((scores[i] for i in ids), default=0.0)
    return out_flags, out_scores

async def moderate(engine: Engine, svc: SafetyService, body: ModerationRequest,
                   safety: RequestSafety, cache_salt: str | None = None) -> ModerationResponse:
    try:
        prompts = await asyncio.to_thread(_render_all, engine, body, safety)
    except asyncio.CancelledError:  # the client went away while its inputs were rendered
        metrics.ABORTED.inc()
        raise
    mid = f"modr-{uuid.uuid4().hex}"
    # A task group: when one input's engine request fails, the others are cancelled (their
    # engine requests aborted) before the error answers, not left running after it.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(prompt_verdict(engine, svc, ids, safety, f"{mid}-{i}",
                                                      cache_salt))
                     for i, ids in enumerate(prompts)]
    except BaseExceptionGroup as errors:
        metrics.ABORTED.inc()  # one request, however many inputs failed or were cancelled
        raise errors.exceptions[0] from None
    except asyncio.CancelledError:  # the client went away (app._unless_disconnected)
        metrics.ABORTED.inc()
        raise
    records = [t.result() for t in tasks]
    if any(rec is None for rec in records):
        metrics.ABORTED.inc()
        raise APIError(503, "the safety signal of an input did not arrive; try again",
                       type="server_error", code="safety_telemetry_missing")
    results = []
    for rec in records:
        verdict = verdict_scores(svc.names, rec)  # a flagged verdict names its outputs
        flags = {n: verdict.flagged and n in verdict.categories for n in svc.names}
        scores = dict(verdict.scores)
        openai_flags, openai_scores = openai_categories(flags, scores)
        # A head output named like an OpenAI category adds to the mapped flag, never clears it.
        merged = {**openai_flags, **{n: f or openai_flags.get(n, False) for n, f in flags.items()}}
        results.append(ModerationResult(
            flagged=verdict.flagged,
            categories=merged,
            category_scores={**openai_scores,
                             **{n: max(v, openai_scores.get(n, 0.0)) for n, v in scores.items()}},
            category_applied_input_types={n: ["text"] for n in merged},
            alert=verdict.alert, gated=list(verdict.gated)))
        metrics.MODERATION_INPUTS.labels("true" if verdict.flagged else "false").inc()
    return ModerationResponse(
        id=mid, model=engine.spec.served_name, results=results,
        safety={"config": safety.echo(), "thresholds": svc.prompt_thresholds(safety)})
