"""The head's self-check at startup: before the server takes traffic, its engine judges the
conversations the head's record holds (``models/head_check.py``) and the prompt verdicts it
reports must equal the recorded ones within a tolerance. A head served over another model than
the one it was trained on fails here, not silently in production.

It runs the record's own token ids (a chat template that writes today's date would otherwise
make every later day a mismatch) through the whole served path (engine, the model class's head
kernel, the prompt offset, the logits processor, telemetry), as one concurrent batch of helper
requests like ``/v1/moderations``. Whether the server's own rendering of the conversations gives
the same ids is reported beside it. A record that holds the greedy answers' first tokens is
also checked at those generated tokens: the record's conversations are answered greedily,
annotate-only, and each per-token score whose tokens so far equal the record's must match
too (the decode path: the residual MLP, the per-token rows). The result is in ``/v1/models``
(``safety.head_check``) and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from safeserve.models.head_check import (CheckResult, SelfCheck, ServedResponse, compare,
                                         tolerance_for)
from safeserve.server import metrics

log = logging.getLogger(__name__)


class HeadCheckFailed(RuntimeError):
    """The served head does not reproduce its record: the server must not serve."""


@dataclass
class HeadCheckPlan:
    record: SelfCheck | None  # None: the head carries no record (written before it existed)
    mode: str  # error | warn | off
    tolerance: float
    prompt_offset: float = 0.0  # the head's, applied by the server at prompt rows
    result: dict | None = None  # what /v1/models shows once it ran

    @classmethod
    def build(cls, record: SelfCheck | None, mode: str, tolerance: float | None,
              dtype: str, prompt_offset: float = 0.0) -> "HeadCheckPlan":
        if tolerance is None:
            tolerance = tolerance_for(dtype, record.dtype if record else None)
        plan = cls(record, mode, tolerance, prompt_offset)
        if mode == "off":
            plan.result = {"status": "off"}
        elif record is None:
            plan.result = {"status": "unverified",
                           "reason": "the head carries no self-check record"}
            log.warning("safety head self-check: the head carries no record, so nothing "
                        "verifies that it reads the model it was trained on "
                        "(`safeserve train self-check` writes one)")
        return plan

    @property
    def runs(self) -> bool:
        return self.mode != "off" and self.record is not None


async def served_scores(engine, svc, prompt_ids) -> list[dict[str, float]]:
    """The prompt-verdict scores the server computes for each token sequence (the default
    preset's config without an allow-list: a config changes the verdict's thresholds, not its
    scores, except that a format-10 head judges prompts without an allow-list by their own
    rule, the one the record holds)."""
    from safeserve.server.helper_requests import prompt_verdict

    safety = svc.resolve(None, None)
    if safety.config.allow:
        safety.preset, safety.config = None, safety.config.model_copy(update={"allow": ()})
    records = await asyncio.gather(*(prompt_verdict(engine, svc, list(ids), safety,
                                                    f"head-check-{n}")
                                     for n, ids in enumerate(prompt_ids)))
    if any(r is None for r in records):
        raise HeadCheckFailed("the safety signal of a self-check prompt never arrived")
    return [dict(zip(svc.names, r.scores)) for r in records]


async def served_responses(engine, svc, record: SelfCheck) -> list[ServedResponse]:
    """Each recorded conversation answered greedily (end-of-sequence ignored, annotate-only,
    so nothing is spliced in) for one token more than its recorded answer: the step that
    samples token j + 1 reports the row of token j. One whose answer would not fit
    ``--max-model-len`` is not run: an empty answer, so all its rows count as skipped."""
    from safeserve.server.helper_requests import helper_request

    # a trace: the tracker keeps each step's scores only for a request that asks for it
    safety = svc.resolve(None, {"on_violation": "annotate", "trace": True})

    async def answer(n: int, ids: tuple[int, ...], length: int) -> ServedResponse:
        if len(ids) + length + 1 >= engine.max_model_len:
            return ServedResponse((), ())
        async with helper_request(engine, svc, ids, safety, f"head-check-answer-{n}",
                                  length + 1) as (tracker, token_ids):
            await tracker.wait_for(len(token_ids) - 1)
            if tracker.incomplete:
                raise HeadCheckFailed("the per-token signal of a self-check answer never "
                                      "arrived")
            scored = []  # up to the first step that did not report (none should be missing)
            for j in range(1, len(token_ids)):
                if j not in tracker.steps:
                    break
                scored.append(dict(zip(svc.names, tracker.steps[j].scores)))
            return ServedResponse(token_ids[: len(scored)], tuple(scored))

    return list(await asyncio.gather(*(
        answer(n, ids, len(resp)) for n, (ids, resp)
        in enumerate(zip(record.prompt_ids, record.response_ids)))))


def same_rendering(engine, record: SelfCheck) -> bool:
    from safeserve.server.prepare import render_messages

    try:
        return all(tuple(render_messages(engine, [{"role": "user", "content": p}], None)) == ids
                   for p, ids in zip(record.prompts, record.prompt_ids))
    except Exception:  # noqa: BLE001 - a template that rejects a lone user turn: not the same
        return False


async def check(engine, svc, plan: HeadCheckPlan) -> CheckResult | None:
    """Compare; None (and an ``unverified`` result) when the record cannot run here."""
    record = plan.record
    if tuple(record.output_names) != tuple(svc.names):
        raise HeadCheckFailed(f"the head's self-check record is for outputs "
                              f"{list(record.output_names)}, the head has {list(svc.names)}")
    vocab = len(engine.tokenizer)
    if any(t >= vocab for ids in record.prompt_ids for t in ids):
        raise HeadCheckFailed(f"the head's self-check record holds token ids beyond this "
                              f"model's vocabulary ({vocab}): another tokenizer, another model")
    fits = [i for i, ids in enumerate(record.prompt_ids) if len(ids) < engine.max_model_len - 1]
    if not fits:
        plan.result = {"status": "unverified",
                       "reason": "its prompts do not fit --max-model-len"}
        log.warning("safety head self-check skipped: its prompts do not fit --max-model-len "
                    "%d", engine.max_model_len)
        return None
    if len(fits) < len(record.prompts):
        record = record.subset(fits)
    served = await served_scores(engine, svc, record.prompt_ids)
    answers = None
    if record.response_ids:
        long = sum(len(ids) + len(resp) + 1 >= engine.max_model_len
                   for ids, resp in zip(record.prompt_ids, record.response_ids))
        if long:
            log.warning("safety head self-check: %d of %d recorded answers do not fit "
                        "--max-model-len %d; their rows are skipped", long,
                        len(record.prompt_ids), engine.max_model_len)
        answers = await served_responses(engine, svc, record)
    result = compare(record, served, plan.tolerance, plan.prompt_offset, answers)
    plan.result = {**result.summary(), "same_rendering": same_rendering(engine, record)}
    if not plan.result["same_rendering"]:
        log.warning("safety head self-check: this server's chat template renders the check's "
                    "conversations differently from the record (the record's ids were run)")
    metrics.HEAD_CHECK_ERROR.set(result.max_error)
    return result


async def run_head_check(engine, svc, plan: HeadCheckPlan) -> CheckResult | None:
    """Run the plan; in ``error`` mode a failed check raises HeadCheckFailed, in ``warn``
    mode every failure is logged and the server serves."""
    try:
        result = await check(engine, svc, plan)
    except Exception as e:  # noqa: BLE001 - warn mode serves whatever went wrong
        if plan.mode == "error":
            raise
        plan.result = {"status": "error", "reason": " ".join(str(e).split())[:500]}
        log.error("safety head self-check could not run, serving anyway (--head-check warn): "
                  "%s", e)
        return None
    if result is None or result.passed:
        if result is not None:
            log.info("safety head self-check passed: %d prompts and %d generated tokens "
                     "(%d skipped: the greedy answer diverged), max logit error %.2g "
                     "(tolerance %g)", result.prompts, result.response_rows,
                     result.response_rows_skipped, result.max_error, result.tolerance)
        return result
    if plan.mode == "error":
        raise HeadCheckFailed(result.explain() + " (--head-check warn serves it anyway)")
    log.error("safety head self-check FAILED, serving anyway (--head-check warn): %s",
              result.explain())
    return result
