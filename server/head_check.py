"""The head's self-check at startup: before the server takes traffic, its engine judges the
conversations the head's record holds (``models/head_check.py``) and the logits it reports
must equal the recorded ones within a tolerance. A head served over another model than the
one it was trained on fails here, not silently in production.

Runs through the whole served path (chat template, engine, the model class's head kernel, the
prompt offset, the logits processor, telemetry), as one concurrent batch of helper requests
like ``/v1/moderations``; the result is in ``/v1/models`` (``safety.head_check``) and
``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from safeserve.models.head_check import DEFAULT_TOLERANCE, CheckResult, SelfCheck, compare
from safeserve.server import metrics

log = logging.getLogger(__name__)


class HeadCheckFailed(RuntimeError):
    """The served head does not reproduce its record: the server must not serve."""


@dataclass
class HeadCheckPlan:
    record: SelfCheck | None  # None: the head carries no record (written before it existed)
    mode: str  # error | warn | off
    tolerance: float
    result: dict | None = None  # what /v1/models shows once it ran

    @classmethod
    def build(cls, record: SelfCheck | None, mode: str, tolerance: float | None,
              dtype: str) -> "HeadCheckPlan":
        if tolerance is None:
            tolerance = DEFAULT_TOLERANCE.get(dtype, max(DEFAULT_TOLERANCE.values()))
        plan = cls(record, mode, tolerance)
        if mode == "off":
            plan.result = {"status": "off"}
        elif record is None:
            plan.result = {"status": "unverified",
                           "reason": "the head carries no self-check record"}
        return plan

    @property
    def runs(self) -> bool:
        return self.mode != "off" and self.record is not None


async def served_scores(engine, svc, prompts) -> list[dict[str, float]]:
    """The prompt-verdict scores the server computes for each prompt as a lone user turn,
    without any guideline (the record's conversations are rendered bare)."""
    from safeserve.server.completions import prompt_verdict, render_messages

    safety = svc.resolve(None, None)
    safety.config = safety.config.model_copy(update={"guideline": None})
    ids = [render_messages(engine, [{"role": "user", "content": p}], None) for p in prompts]
    records = await asyncio.gather(*(prompt_verdict(engine, svc, i, safety, f"head-check-{n}")
                                     for n, i in enumerate(ids)))
    if any(r is None for r in records):
        raise HeadCheckFailed("the safety signal of a self-check prompt never arrived")
    return [dict(zip(svc.names, r.scores)) for r in records]


async def run_head_check(engine, svc, plan: HeadCheckPlan) -> CheckResult | None:
    """Run the plan; raises HeadCheckFailed in ``error`` mode when the check fails."""
    if not plan.runs:
        if plan.mode != "off":
            log.warning("safety head self-check: the head carries no record, so nothing "
                        "verifies that it reads the model it was trained on "
                        "(`safeserve train self-check` writes one)")
        return None
    record = plan.record
    if tuple(record.output_names) != tuple(svc.names):
        raise HeadCheckFailed(f"the head's self-check record is for outputs "
                              f"{list(record.output_names)}, the head has {list(svc.names)}")
    result = compare(record, await served_scores(engine, svc, record.prompts), plan.tolerance)
    plan.result = result.summary()
    metrics.HEAD_CHECK_ERROR.set(result.max_error)
    if result.passed:
        log.info("safety head self-check passed: %d prompts, max logit error %.2g "
                 "(tolerance %g)", result.prompts, result.max_error, result.tolerance)
    elif plan.mode == "error":
        raise HeadCheckFailed(result.explain() + " (--head-check warn serves it anyway)")
    else:
        log.error("safety head self-check FAILED, serving anyway (--head-check warn): %s",
                  result.explain())
    return result
