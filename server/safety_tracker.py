"""HTTP side of the safety signal: receives the worker's per-step telemetry and turns it,
per request, into what the client sees — which tokens may be released (holdback), which were
flagged and cut, the verdicts, the action taken and the score trace."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import pickle
import shutil
import tempfile

from safeserve.kernels.safety_decision import EVENT_TRIGGER, EVENT_VIOLATION
from safeserve.server import metrics
from safeserve.server import safety_wire as W
from safeserve.server.protocol import (
    CategoryScores,
    ResponseVerdict,
    SafetyReport,
    TracePoint,
    shown_score,
)
from safeserve.server.safety_config import echoed_thresholds

log = logging.getLogger(__name__)

TELEMETRY_WAIT_S = 5.0
MAX_ENDED = 4096
ENDED_PER_REQUEST = 64  # two per request on average keep up with any load
TO_THE_END = 1 << 62  # end of a withheld range that runs to the end of the output
# Steps whose prior state a tracker keeps: more than a request's records can run past its end
# (a stop string ends it in the frontend a step or two later, async scheduling one step).
RECENT_STATES = 16

# A step's status byte (RequestTracker._status): all holdback, withholding and forced-token
# questions need of a step, one byte per output token; the full record (the scores) is kept
# only for a request that asked for its trace.
_HEARD, _FORCED, _ACTED = 1, 2, 4
_EVENT_SHIFT = 3  # EVENT_OK / EVENT_VIOLATION / EVENT_TRIGGER in bits 3-4


class RequestTracker:
    def __init__(self, rid: str, names: tuple[str, ...], args: W.RowSafetyArgs,
                 action_name: str, config_echo: dict, trace: bool,
                 prompt_thresholds: dict[str, float | None] | None = None,
                 host_stop: bool = False, withhold_answer: bool = False):
        self.rid, self.names, self.args = rid, names, args
        # what the prompt verdict compared (SafetyPolicy.prompt_thresholds_echo)
        self.prompt_thresholds = prompt_thresholds or echoed_thresholds(
            names, args.prompt_thresholds or args.thresholds)
        self.action_name, self.config_echo, self.want_trace = action_name, config_echo, trace
        # One status byte per step index (0: no record yet); full records only with a trace:
        # a record is ~700 bytes, and a long answer's would otherwise stay until it ends.
        self._status = bytearray()
        self.steps: dict[int, W.StepRecord] = {}  # want_trace only
        self._triggers: dict[int, int] = {}  # step index > 0 -> categories, EVENT_TRIGGER records
        self.prompt: W.StepRecord | None = None
        self.query: W.StepRecord | None = None  # prefilled requests: the query's own verdict
        self.trigger_index: int | None = None  # step at which the strategy acted
        self.flag_cats = 0
        self.stop_forced = False
        self.explanation_closed = False  # the refusal's explanation reached its budget
        self.explanation_retracted = False  # withheld whole: read over a threshold, or cut unjudged
        self.refusal_end: int | None = None  # output length once the refusal is forced
        self.retracted_at: tuple[int, int] | None = None  # (step index, categories)
        self.cut: list[tuple[int, int]] = []  # [start, end) output-token ranges withheld
        self.max_scores = [0.0] * len(names)
        self.response_scored = False  # a generated token was scored (max_scores means something)
        self._seen = -1
        self._changed = asyncio.Event()
        self.incomplete = False
        self._settled = 0  # releasable()'s last answer: what it has released stays released
        # (index, state before its first record) of the latest records: _undo_repeat, and
        # finish() undoing steps the engine ran past the end before the end was known
        self._recent: collections.deque = collections.deque(maxlen=RECENT_STATES)
        # The worker let the request go after it sampled a token: its prompt verdict is final.
        self.gone = False
        self.final_tokens: int | None = None  # output length at finish(): later records are stray
        self.heard = False  # a record arrived: the worker took the request (and args.ended)
        # A structured-output request: the worker forces nothing (it would break the
        # grammar); the first trigger stops it here, withholding the violating run and all
        # after it, and the HTTP side aborts its engine request (completions._host_stop).
        self.host_stop = host_stop
        # The config's `withhold_answer`: an action of the response rule withholds the whole answer
        # before it (from output token 0), not only the violating run.
        self.withhold_answer = withhold_answer

    # -- telemetry in ----------------------------------------------------------------------

    _DERIVED = ("trigger_index", "flag_cats", "stop_forced", "explanation_closed",
                "explanation_retracted", "refusal_end", "retracted_at")

    def _state(self) -> tuple:
        return (tuple(getattr(self, n) for n in self._DERIVED), len(self.cut),
                list(self.max_scores), self.response_scored)

    def _restore(self, state: tuple) -> None:
        derived, n_cut, max_scores, self.response_scored = state
        for name, value in zip(self._DERIVED, derived):
            setattr(self, name, value)
        del self.cut[n_cut:]
        self.max_scores = list(max_scores)

    def _undo_repeat(self, rec: W.StepRecord) -> None:
        """A record for the step index of the previous one: a prompt's chunk, or a chunk of a
        resumed request's re-prefill, whose token vLLM discarded (the worker re-decides; so
        does this). What earlier records of this index decided is undone; the last one's
        stands."""
        if self._recent and self._recent[-1][0] == rec.index:
            self._restore(self._recent[-1][1])
        else:
            self._recent.append((rec.index, self._state()))

    def add(self, rec: W.StepRecord) -> None:
        self.heard = True
        if rec.index == W.GONE:
            # Left before a token was sampled (unscheduled for a step mid-prompt): a later
            # chunk's verdict may still come, so this proves nothing.
            self.gone = rec.left_at >= 1
            self._changed.set()
            return
        self.gone = False  # it left the batch (preempted, or unscheduled for a step) and is back
        if self.final_tokens is not None and rec.index >= self.final_tokens:
            return  # a step the engine ran past the end (a stop string ends in the frontend)
        self._undo_repeat(rec)
        if rec.index == 0:
            # A chunked prefill reports index 0 per chunk: the last one is the verdict, and
            # what earlier chunks' rows (mid-prompt positions) decided was undone above.
            self.prompt = rec
        elif not (self.host_stop and self.stop_forced and rec.index > (self.trigger_index or 0)):
            # (a host-stopped request's steps past its stop read tokens nobody will see)
            self.max_scores = [max(a, b) for a, b in zip(self.max_scores, rec.scores)]
            self.response_scored = True
        if rec.event == EVENT_TRIGGER:
            acted_now = bool(rec.acted) or self.args.action == W.ACTION_ANNOTATE
            if self.trigger_index is None and acted_now:
                self.trigger_index, self.flag_cats = rec.index, rec.cats
                if self.host_stop:
                    self.cut.append((self._cut_start(rec.index), TO_THE_END))
                    self.stop_forced = True
            if rec.acted and rec.index > 0:  # the violating run that reached tau is withheld
                self.cut.append((self._cut_start(rec.index), rec.index))
        if rec.forced >= 0 and rec.forced == self.args.eos_id and rec.phase == W.PHASE_DONE:
            self.stop_forced = True
        if rec.forced >= 0 and rec.phase == W.PHASE_CLOSED:
            self.explanation_closed = True
        if rec.forced >= 0 and rec.phase in (W.PHASE_REFUSING, W.PHASE_REFUSED):
            self.refusal_end = rec.index + 1
        if rec.phase == W.PHASE_RETRACTED and not self.explanation_retracted:
            self.retract(rec.index, rec.cats)
        self._keep(rec)
        self._seen = max(self._seen, rec.index)
        self._changed.set()

    def _cut_start(self, index: int) -> int:
        """Where the withheld text of an action at step ``index`` starts: its violating run,
        or, for the first action with ``withhold_answer``, the whole answer (a later one, in
        an unbounded explanation, withholds its run: the refusal before it stands)."""
        if self.withhold_answer and index == self.trigger_index:
            return 0
        return max(0, index - self.run_length)

    def answer_hold(self, n_tokens: int, finished: bool) -> int:
        """How many of the first ``n_tokens`` may be released as far as ``withhold_answer``
        goes: none before the response has ended or the response rule has acted (an action
        later would withhold them). An action counts once its step is known to be no step
        past the end (finish() undoes those): the output has reached the token it sampled."""
        if (not self.withhold_answer or finished or self._annotating
                or (self.acted and self.trigger_index < n_tokens
                    # an earlier prompt chunk's verdict may still be replaced by the last's
                    and (self.trigger_index > 0 or self._seen >= 1 or self.gone))):
            return n_tokens
        return 0

    @property
    def _annotating(self) -> bool:
        """Annotate only: nothing is ever withheld."""
        return self.args.action == W.ACTION_ANNOTATE and not self.host_stop

    def _keep(self, rec: W.StepRecord) -> None:
        """Store what later questions need of this step (a repeated index replaces it)."""
        i = rec.index
        if i >= len(self._status):
            self._status.extend(bytes(i + 1 - len(self._status)))
        self._status[i] = (_HEARD | (_FORCED if rec.forced >= 0 else 0)
                           | (_ACTED if rec.acted else 0) | rec.event << _EVENT_SHIFT)
        if i > 0 and rec.event == EVENT_TRIGGER:
            self._triggers[i] = rec.cats
        else:
            self._triggers.pop(i, None)
        if self.want_trace:
            self.steps[i] = rec

    def has_step(self, j: int) -> bool:
        """The step that sampled output token ``j`` has been reported."""
        return 0 <= j < len(self._status) and bool(self._status[j])

    def _step(self, j: int) -> tuple[bool, int, bool] | None:
        """(forced, event, acted) of step ``j``, None before its record arrives."""
        b = self._status[j] if 0 <= j < len(self._status) else 0
        if not b:
            return None
        return bool(b & _FORCED), b >> _EVENT_SHIFT & 3, bool(b & _ACTED)

    async def wait_for(self, index: int, last: bool = False) -> None:
        """Wait until the step that sampled output token ``index`` has been reported. With
        telemetry already missing, a wait returns at once, except for the ``last`` step of a
        request, which may carry the action that withholds its final tokens."""
        await self._wait(lambda: self._seen >= index, f"at token {index}", last)

    async def wait_verdict(self) -> None:
        """Wait until the prompt verdict in hand is final. A chunked prompt reports index 0
        once per chunk; only a record after the last one proves it: a later step's, or the
        end-of-request record the worker sends when it lets the request go (all a response
        of one token has)."""
        await self._wait(lambda: self._seen >= 1 or self.gone, "after its prompt")

    async def _wait(self, done, what: str, even_if_incomplete: bool = False) -> None:
        if done() or (self.incomplete and not even_if_incomplete):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TELEMETRY_WAIT_S
        while not done():
            self._changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                log.error("safety telemetry for %s missing %s", self.rid, what)
                self.incomplete = True
                return
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    # -- decisions out ---------------------------------------------------------------------

    def releasable(self, n_tokens: int, finished: bool) -> int:
        """How many of the first ``n_tokens`` output tokens have a settled status (holdback).
        A forced token is settled at once; a sampled token j once step j+1 has shown whether
        it belongs to a violating run (open run: pending; run reached tau: withheld). The
        first token waits for step 1 even when forced: a chunked prompt reports index 0 once
        per chunk, and the record saying "forced" may be an earlier chunk's, superseded by a
        last one still in flight."""
        if finished:
            return n_tokens
        j = min(self._settled, n_tokens)  # resume: a scan from 0 per step is quadratic
        while j < n_tokens and self._is_settled(j):
            j += 1
        self._settled = j
        return j

    def _is_settled(self, j: int) -> bool:
        """Output token j's status is known: forced, or step j+1 shows it outside a violating
        run that may still reach tau."""
        if j > 0 and self.forced_at(j):
            return True
        nxt = self._step(j + 1)
        if nxt is None:
            return False
        _, event, acted = nxt
        return not (event == EVENT_VIOLATION and not acted and not self._run_closed(j + 2))

    def _run_closed(self, k: int) -> bool:
        """Has the violating run going on at step k - 1 ended by step k or later: a clean
        step (it stopped short of tau: its tokens go out) or the step that acted (withheld)?"""
        while (step := self._step(k)) is not None:
            _, event, acted = step
            if event != EVENT_VIOLATION or acted:
                return True
            k += 1
        return False

    def retract(self, index: int, cats: int = 0) -> None:
        """Withhold everything after the refusal (the explanation), judged unsafe at step
        ``index`` (which read output token index - 1)."""
        self.retracted_at = (index, cats)
        self.withhold_explanation(index)

    def withhold_explanation(self, index: int) -> None:
        """Withhold everything after the refusal (from ``index`` if it has no known end)."""
        self.explanation_retracted = True
        start = self.refusal_end if self.refusal_end is not None else index
        self.cut.append((start, TO_THE_END))

    @property
    def explanation_open(self) -> bool:
        """A refusal's bounded explanation is under way: not closed, withheld or stopped."""
        return (self.acted and self.args.explain_sentences >= 0 and self.refusal_end is not None
                and not (self.stop_forced or self.explanation_closed
                         or self.explanation_retracted))

    def finish(self, finish_reason: str | None, n_tokens: int,
               stop_string: bool = False) -> None:
        """The request ended. A bounded explanation still open that ran into ``max_tokens``
        or a stop string has a last token no step has read: unjudged, it is withheld like an
        unsafe one. (End-of-sequence is no text.)

        Steps the engine ran past the end (a stop string is found in the frontend, and under
        async scheduling a step is in flight when a request ends, end-of-sequence included)
        may have reported before this call, or may report after it: a race between the
        engine's outputs and the telemetry, which no wait can settle (with nothing else to
        run, the engine reports a finished request only when the next one comes). So what
        they decided is undone here and dropped later, step ``n_tokens`` included: the
        response's last token is never judged by the per-token rule, whichever way it ended
        and whichever message came first (an open explanation's is withheld, below). A stop
        the server made itself (``_host_stop``, at a trigger whose tokens have not all
        arrived) is final."""
        if not (self.host_stop and self.stop_forced):
            self._undo_past(max(1, n_tokens))
        if (self.explanation_open and (finish_reason == "length" or stop_string)
                and n_tokens > self.refusal_end):
            self.withhold_explanation(n_tokens)  # unjudged: withheld, but nothing flagged it
        self._recent.clear()  # a record still in flight must not undo what was decided here
        self.final_tokens = n_tokens

    def _undo_past(self, end: int) -> None:
        """Undo what records of step ``end`` and later decided (they arrive in step order)."""
        past = [state for index, state in self._recent if index >= end]
        if not past:
            return
        if len(self._recent) == self._recent.maxlen and self._recent[0][0] >= end:
            log.warning("safety telemetry for %s ran more than %d steps past its end; undoing "
                        "the last %d", self.rid, RECENT_STATES, RECENT_STATES)
        self._restore(past[0])
        del self._status[end:]
        for i in [i for i in self._triggers if i >= end]:
            del self._triggers[i]
        for i in [i for i in self.steps if i >= end]:
            del self.steps[i]

    def explanation_hold(self, n_tokens: int, finished: bool) -> int:
        """How many of the first ``n_tokens`` may be released as far as a refusal's bounded
        explanation goes: none of it until it has ended, since it is withheld whole if it
        turns unsafe (at most 40 tokens per sentence of its budget)."""
        if finished or not self.explanation_open:
            return n_tokens
        return min(n_tokens, self.refusal_end)

    def withheld(self, j: int) -> bool:
        if any(a <= j < b for a, b in self.cut):
            return True
        # Fail closed: with telemetry missing, a token whose status is not known is not
        # released: unjudged, or in a violating run whose acting step may be the one missing.
        return self.incomplete and not self.forced_at(j) and not self._is_settled(j)

    def forced_at(self, j: int) -> bool:
        """Output token ``j`` was forced by the strategy (a refusal or end-of-sequence token)."""
        step = self._step(j)
        return step is not None and step[0]

    @property
    def host_stopped(self) -> bool:
        """A structured-output request's violation is final: its engine request must end. A
        verdict at the prompt is final once a later record shows it was the last chunk's."""
        return (self.host_stop and self.stop_forced
                and (bool(self.trigger_index) or self._seen >= 1 or self.gone))

    @property
    def alerted(self) -> bool:
        """The prompt (or a prefilled request's query) verdict fell in the alert band."""
        if self.prompt is not None and self.prompt.event == EVENT_TRIGGER:
            return False  # a flagged verdict is not an alert (the worker clears it too)
        return bool((self.prompt and self.prompt.alert) or (self.query and self.query.alert))

    @property
    def run_length(self) -> int:
        """Consecutive violating steps the response rule needs for this request."""
        return self.args.tau_alerted if self.alerted else self.args.tau

    @property
    def answer_withheld(self) -> bool:
        """``withhold_answer`` acted on: the answer before the response rule's action is cut."""
        return bool(self.withhold_answer and self.trigger_index and self.trigger_index > 0
                    and any(start == 0 for start, _ in self.cut))

    @property
    def acted(self) -> bool:
        return self.trigger_index is not None

    def _cats(self, bits: int) -> list[str]:
        return [n for i, n in enumerate(self.names) if bits >> i & 1]

    def _verdict(self, rec: W.StepRecord | None) -> CategoryScores | None:
        return None if rec is None else verdict_scores(self.names, rec)

    def report(self) -> SafetyReport:
        prompt = self._verdict(self.prompt)
        response = ResponseVerdict(max_scores={n: shown_score(s) for n, s in
                                               zip(self.names, self.max_scores)})
        action = "none"
        if self.acted:
            action = self.action_name
            if self.trigger_index and self.trigger_index > 0:
                response.flagged = True
                response.token_index = max(0, self.trigger_index - self.run_length)
                response.categories = self._cats(self.flag_cats)
            if self.stop_forced:
                action = "stop"
            response.explanation_withheld = self.explanation_retracted
            response.answer_withheld = self.answer_withheld
            if self.retracted_at is not None and not response.flagged:
                # The explanation read over a threshold: flagged where it did, whatever tau.
                index, cats = self.retracted_at
                response.flagged = True
                response.token_index = max(0, index - 1)
                response.categories = self._cats(cats)
        if self._triggers and not response.flagged and not self.host_stop:  # annotate-only
            first = min(self._triggers)
            response.flagged = True
            response.token_index = max(0, first - self.run_length)
            response.categories = self._cats(self._triggers[first])
        trace = None
        if self.want_trace:
            trace = [TracePoint(token_index=i, scores=[shown_score(s) for s in r.scores],
                                event=r.event) for i, r in sorted(self.steps.items())]
        return SafetyReport(enabled=True, model_has_head=True, action=action, prompt=prompt,
                            query=self._verdict(self.query), response=response, config=self.config_echo,
                            score_names=list(self.names),
                            thresholds=echoed_thresholds(self.names, self.response_thresholds()),
                            prompt_thresholds=self.prompt_thresholds,
                            trace=trace,
                            telemetry_complete=not self.incomplete)

    def response_thresholds(self) -> list[float]:
        """What the response rule compared each output against: the compiled thresholds, the
        overall one at its sampled value when the request has one and its prompt verdict
        was clear (kernels/safety_decision.py)."""
        values = list(self.args.thresholds)
        if self.args.sampled_overall is not None and self.prompt is not None and self.prompt.clear:
            values[-1] = self.args.sampled_overall
        return values

    def refusal_ending(self, finish_reason: str | None) -> str | None:
        """How a refused response ended (None: it was not refused)."""
        if not self.acted or self.action_name != "refuse":
            return None
        if self.stop_forced:
            return "stopped"
        if self.explanation_retracted:
            return "withheld"
        if self.explanation_closed:
            return "explanation_limit"
        return {"stop": "model_end", "length": "max_tokens"}.get(finish_reason or "", "abort")

    def record_metrics(self, finish_reason: str | None = None, prompt: bool = True) -> None:
        """This response's metrics, and (``prompt``) its prompt verdict's: once per request,
        not per choice."""
        rep = self.report()
        ending = self.refusal_ending(finish_reason)
        if ending is not None:
            metrics.SAFETY_REFUSAL_ENDINGS.labels(ending).inc()
        for n, s in zip(self.names, self.prompt.scores if self.prompt and prompt else []):
            metrics.SAFETY_PROMPT_SCORE.labels(n).observe(s)
        # A response with no scored token (cancelled first, or stopped at its prompt) has no
        # maximum: its zeros would drag the histogram down.
        for n, s in zip(self.names, self.max_scores if self.response_scored else []):
            metrics.SAFETY_RESPONSE_MAX_SCORE.labels(n).observe(s)
        if prompt and rep.prompt and rep.prompt.flagged:
            for c in rep.prompt.categories or ["unsafe"]:
                metrics.SAFETY_PROMPTS_FLAGGED.labels(c, rep.action).inc()
            for c in rep.prompt.gated:
                metrics.SAFETY_PROMPTS_GATED.labels(c).inc()
        if rep.response.flagged:
            for c in rep.response.categories or ["unsafe"]:
                metrics.SAFETY_RESPONSES_FLAGGED.labels(c, rep.action).inc()


def verdict_scores(names, rec: W.StepRecord) -> CategoryScores:
    """A prompt (or query) verdict as reported: flagged, the scores, the categories it
    flagged, whether it fell in the alert band, which categories the topic gate flagged."""
    return CategoryScores(flagged=rec.event == EVENT_TRIGGER,
                          scores={n: shown_score(s) for n, s in zip(names, rec.scores)},
                          categories=[n for i, n in enumerate(names) if rec.cats >> i & 1],
                          alert=bool(rec.alert),
                          gated=[n for i, n in enumerate(names) if rec.gate >> i & 1])


def _socket_gone(e: Exception) -> bool:
    """A receive that can never succeed again (the socket or its context closed)."""
    import errno

    import zmq

    return isinstance(e, zmq.ContextTerminated) or (
        isinstance(e, zmq.ZMQError) and e.errno == errno.ENOTSOCK)


class TelemetryHub:
    """Binds the PULL socket the workers push to, and routes records to trackers."""

    def __init__(self):
        self.addr: str | None = None
        self._dir: str | None = None
        self.trackers: dict[str, RequestTracker] = {}
        # Released request ids not yet handed to the worker (bounded: under a flood of
        # releases with few new requests, the oldest go unsent and their parked state, if
        # any, is left to the worker's own bound).
        self._ended: collections.deque[str] = collections.deque(maxlen=MAX_ENDED)
        self._task: asyncio.Task | None = None
        self._sock = None

    def export_address(self) -> None:
        """Must run before the engine starts: spawned workers inherit the environment."""
        if self._dir is None:
            # A directory only this user may enter (mkdtemp: 0700): the records are pickles.
            self._dir = tempfile.mkdtemp(prefix="safeserve-")
            self.addr = f"ipc://{self._dir}/telemetry"
        os.environ[W.TELEMETRY_ENV] = self.addr

    async def start(self) -> None:
        import zmq
        import zmq.asyncio

        self.export_address()  # (a no-op if the app already did)
        self._sock = zmq.asyncio.Context.instance().socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.bind(self.addr)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            try:
                message = await self._sock.recv()
            except Exception as e:  # noqa: BLE001 - routing must outlive a failed receive
                if _socket_gone(e):
                    log.error("safety telemetry socket closed: routing stopped (requests "
                              "now fail closed)")
                    return
                # (without it every request would wait out its telemetry and fail closed)
                backoff = min(5.0, backoff * 2 or 0.05)
                log.exception("safety telemetry receive failed; retrying in %.2f s", backoff)
                await asyncio.sleep(backoff)
                continue
            backoff = 0.0
            try:
                self._route(*pickle.loads(message))
            except Exception:  # one bad message must not end the routing of every other
                log.exception("unreadable safety telemetry message dropped")

    def _route(self, records: list[W.StepRecord], seconds: float | None) -> None:
        if seconds is not None:  # None: a resumed request's deferred record, no step
            metrics.SAFETY_STEPS.inc()
            metrics.SAFETY_STEP_SECONDS.inc(seconds)
        for rec in records:
            tracker = self.trackers.get(rec.rid)
            if tracker is not None:
                try:
                    tracker.add(rec)
                except Exception:  # the other requests' records of the step still count
                    log.exception("safety telemetry record of %s dropped", rec.rid)
                    tracker.incomplete = True  # fail closed: it has a step it cannot show

    def register(self, tracker: RequestTracker) -> None:
        self.trackers[tracker.rid] = tracker

    def release(self, rid: str) -> None:
        tracker = self.trackers.pop(rid, None)
        if tracker is None:
            return
        if not tracker.heard and tracker.args.ended:
            # The worker may never have taken this request (refused by the engine's queue,
            # aborted while waiting), so the ids it carried go to the next one; handed over
            # twice, an id only drops a state already dropped.
            room = (self._ended.maxlen or 0) - len(self._ended) - 1  # (rid's place kept)
            if room > 0:  # when full, the oldest go unsent, as the bound says
                self._ended.extendleft(reversed(tracker.args.ended[-room:]))
        self._ended.append(rid)

    def take_ended(self, limit: int = ENDED_PER_REQUEST) -> list[str]:
        """Up to ``limit`` released request ids, oldest first, each handed out once (to the
        worker, with the next request: RowSafetyArgs.ended)."""
        return [self._ended.popleft() for _ in range(min(limit, len(self._ended)))]

    def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
