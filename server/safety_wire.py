"""What crosses the process boundary between the HTTP process and vLLM's worker:
the per-request safety state (in ``SamplingParams.extra_args``) and the per-step telemetry
(over a ZMQ PUSH/PULL pair). Plain data only, so both sides import this without vLLM."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from safeserve.kernels import strategy_codes as _codes

EXTRA_ARGS_KEY = "safeserve"
TELEMETRY_ENV = "SAFESERVE_TELEMETRY_ADDR"

# The strategy's codes (defined beside its kernel), re-exported for both sides.
ACTION_ANNOTATE = _codes.ACTION_ANNOTATE
ACTION_REFUSE = _codes.ACTION_REFUSE
ACTION_STOP = _codes.ACTION_STOP
PHASE_WATCH = _codes.PHASE_WATCH
PHASE_REFUSING = _codes.PHASE_REFUSING
PHASE_REFUSED = _codes.PHASE_REFUSED
PHASE_DONE = _codes.PHASE_DONE
PHASE_CLOSED = _codes.PHASE_CLOSED
PHASE_RETRACTED = _codes.PHASE_RETRACTED

ACTION_NAMES = {ACTION_ANNOTATE: "annotate", ACTION_REFUSE: "refuse", ACTION_STOP: "stop"}
ACTION_CODES = {v: k for k, v in ACTION_NAMES.items()}


@dataclass
class RowSafetyArgs:
    """Everything the worker needs to enforce one request's config (validated upstream)."""

    rid: str
    thresholds: list[float]  # one per head output (categories + overall)
    masked: list[int]  # 1 = allowed: this output can never cause a violation
    tau: int
    action: int
    refusal_ids: list[int] = field(default_factory=list)
    # The first refusal_sep ids of refusal_ids are a paragraph break that sets the refusal off
    # from text before it (an answer cut mid-sentence, an attacker's prefill); skipped when the
    # refusal is the whole answer (the prompt verdict of a request without a prefill).
    refusal_sep: int = 0
    prefilled: bool = False
    eos_id: int = 0
    # Prefilled requests: the verdict on the user's query alone (measured by the HTTP side in
    # a one-token request before this one), so an attacker's assistant prefill cannot hide
    # the query. Flagged -> the strategy acts at the first sampled token.
    query_flagged: bool = False
    query_cats: int = 0
    # Alert band (see kernels/safety_decision.py): a prompt verdict within log(alert_scale)
    # logits below its thresholds makes the response rule act after alert_tau steps.
    # alert_scale 1: no band. query_alert: the prefilled query's verdict was in the band.
    alert_scale: float = 1.0
    alert_tau: int = 0
    query_alert: bool = False
    # Sampled decoding, for a head whose shift applies to clear prompts only: a prompt
    # verdict neither violated nor within log(clear_scale) logits of its thresholds makes the
    # request clear, and its generated tokens compare the overall output against
    # sampled_overall (None: against thresholds[-1], as every other request).
    sampled_overall: float | None = None
    clear_scale: float = 1.0
    # Sentences the model may write after a spliced refusal before the response ends
    # (0: end right after the refusal; -1: no limit, the paper's open-ended explanation).
    explain_sentences: int = -1
    # The prompt (and query) verdict's thresholds, when they differ from `thresholds` (the
    # response rule's, which a threshold_shift moves); None: the same.
    prompt_thresholds: list[float] | None = None
    # A helper request whose output is never returned to a client (moderations, a prefilled
    # request's query, the self-check's answers, which also read its per-token rows): its
    # strategy state is never kept for a resume; a resumed one starts over.
    verdict_only: bool = False
    # Request ids the HTTP side has finished with since the last request it sent (ended on a
    # stop string, aborted, done): they never come back, so the worker drops any state it
    # parked for them (it cannot tell such a removal from a preemption).
    ended: list[str] = field(default_factory=list)

    @property
    def tau_alerted(self) -> int:
        return self.alert_tau if self.alert_scale > 1.0 and self.alert_tau else self.tau

    def to_extra_args(self) -> dict:
        return {EXTRA_ARGS_KEY: asdict(self)}

    @classmethod
    def from_extra_args(cls, extra: dict | None) -> RowSafetyArgs | None:
        raw = (extra or {}).get(EXTRA_ARGS_KEY)
        return None if raw is None else cls(**raw)


GONE = -1  # a StepRecord index: the worker has let the request go (every record of it sent)


@dataclass
class StepRecord:
    """One engine step of one request: the head's scores and the decision taken.

    ``index`` is the output token being sampled in that step; the scores read the text
    through output token ``index - 1`` (index 0: the end of the prompt, i.e. the verdict)."""

    rid: str
    index: int
    scores: list[float]
    event: int
    cats: int
    phase: int  # phase after this step's decision
    forced: int  # token forced at this step, -1 if none
    acted: int  # 1 if the strategy started an action (refusal or stop) at this step
    alert: int = 0  # 1 if the request's prompt verdict fell in the alert band
    gate: int = 0  # category bits the topic gate flagged at this prompt row (format 8)
    # 1 if the request's prompt verdict was clear (sampled decoding: its generated tokens
    # compare the overall output against RowSafetyArgs.sampled_overall)
    clear: int = 0
    # A GONE record: the request's output length when it left the batch. 0 when it left
    # before sampling a token (unscheduled for a step mid-prompt, or preempted): its prompt
    # verdict may still change.
    left_at: int = 0
