"""Per-request safety orchestration on the HTTP side: resolve the request's config, give each
engine request its compiled row args and a tracker, and shape what the client receives."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from safeserve.kernels.safety_decision import EVENT_TRIGGER
from safeserve.models.decision_defaults import GUIDELINE_TEMPLATE
from safeserve.server.auth import Principal, authorize_config
from safeserve.server.protocol import SafetyReport
from safeserve.server.safety_config import (
    DEFAULT_REFUSAL,
    DEFAULT_STOP_TEXT,
    SafetyConfig,
    SafetyPolicy,
)
from safeserve.server.safety_tracker import RequestTracker, TelemetryHub
from safeserve.server.safety_wire import ACTION_ANNOTATE, StepRecord

REFUSAL_SEPARATOR = "\n\n"


@dataclass
class RequestSafety:
    """The resolved safety config of one HTTP request."""

    preset: str | None
    config: SafetyConfig
    tau: int  # the effective tau: the config's, or the head's operating point
    alert_margin: float = 0.0  # the head's alert band, logits below the prompt thresholds
    alert_tau: int | None = None  # the response run after a prompt in the band
    explain_sentences: int = -1  # sentences after a refusal (-1: no limit)
    # Where the config came from, and where its trace was asked for: a 403 names them
    source: str = "safety_config"
    trace_source: str = "safety_config"

    def echo(self) -> dict:
        return {"preset": self.preset, **self.config.echo(), "tau": self.tau,
                "alert_margin": self.alert_margin if self.alert_tau else None,
                "alert_tau": self.alert_tau, "explain_sentences": self.explain_sentences}


class SafetyService:
    def __init__(self, policy: SafetyPolicy, hub: TelemetryHub, tokenizer_getter):
        self.policy, self.hub = policy, hub
        self._tokenizer = tokenizer_getter
        self._refusal_ids: list[int] | None = None
        self._refusal_sep = 0

    @property
    def names(self) -> tuple[str, ...]:
        return self.policy.taxonomy.output_names

    def resolve(self, header: str | None, body, trace: bool = False) -> RequestSafety:
        preset, cfg = self.policy.resolve(header, body)
        source = ("X-Safety-Config" if header is not None and header.strip() != ""
                  else "safety_config")
        trace_source = source
        if trace and not cfg.trace:
            cfg = cfg.model_copy(update={"trace": True})
            trace_source = "X-Safety-Trace"
        return RequestSafety(preset, cfg, self.policy.tau_of(cfg), self.policy.alert_margin,
                             self.policy.alert_tau_of(cfg), self.policy.explain_sentences_of(cfg),
                             source, trace_source)

    def authorize(self, principal: Principal, req: RequestSafety,
                  trace_returned: bool = True) -> None:
        """403 if the key may not ask for ``req``; else ``req`` becomes the config it runs
        with (fields it left out tightened to the key's ceiling). ``trace_returned``: False
        for verdict-only requests, which never return a trace."""
        req.config = authorize_config(principal, req.preset, req.config, self.policy,
                                      trace_returned, param=req.source,
                                      trace_param=req.trace_source)
        req.tau = self.policy.tau_of(req.config)
        req.alert_tau = self.policy.alert_tau_of(req.config)
        req.explain_sentences = self.policy.explain_sentences_of(req.config)

    def prompt_thresholds(self, req: RequestSafety) -> dict[str, float | None]:
        """Each head output's threshold for ``req``'s prompt verdict (the allow-list shift
        of the overall output included), as the decision kernel compares it (None: not
        compared, see ``SafetyPolicy.prompt_thresholds_echo``)."""
        return self.policy.prompt_thresholds_echo(self.policy.compile(req.config, "", [], 0))

    def refusal_ids(self) -> list[int]:
        """The separator's ids, then the refusal's (``_refusal_sep`` of them are the former);
        each tokenized on its own so the refusal's tokens are the same with or without it.
        The refusal ends on its full stop, not a space: byte-level BPE vocabularies put a
        word's space in front of it, so a lone trailing space token pushed the model's
        explanation off its usual tokens (it mostly began on a new line) and stayed behind
        as a trailing space when the explanation was withheld."""
        if self._refusal_ids is None:
            tok = self._tokenizer()
            sep = tok(REFUSAL_SEPARATOR, add_special_tokens=False)["input_ids"]
            refusal = tok(DEFAULT_REFUSAL, add_special_tokens=False)["input_ids"]
            self._refusal_ids, self._refusal_sep = sep + refusal, len(sep)
        return self._refusal_ids

    def open(self, rid: str, req: RequestSafety, eos_id: int,
             query: StepRecord | None = None, prefilled: bool = False,
             verdict_only: bool = False, structured: bool = False,
             temperature: float = 0.0) -> tuple[dict, RequestTracker]:
        """Compiled row args for one engine request, and the tracker that receives its
        telemetry. ``query``: the verdict on a prefilled request's query (see
        ``helper_requests.query_verdict``), carried to the worker so it acts on it.
        ``verdict_only``: a helper request whose output is discarded (see
        ``helper_requests.prompt_verdict``). ``structured``: the output is decoded under a
        grammar (``response_format``), which a forced token would break (vLLM fails the
        request): the worker forces nothing, and a violation stops the request from here
        (``RequestTracker.host_stop``), whatever the config's action. ``temperature``: the
        request's sampling temperature, which moves the overall output's response threshold
        by the head's sampled-decoding shift (echoed as ``sampled_overall_shift``)."""
        ids = self.refusal_ids()
        args = self.policy.compile(req.config, rid, ids, eos_id, self._refusal_sep,
                                   temperature=temperature, prefilled=prefilled)
        echo = req.echo()
        sampled = self.policy.sampled_shift_of(req.config, temperature)
        margin = self.policy.sampled_clear_margin
        if sampled and (margin is None or args.sampled_overall is not None):
            echo["sampled_overall_shift"] = sampled
            if margin is not None:  # it applies only if the prompt verdict was clear
                echo["sampled_shift_clear_margin"] = margin
        args.prefilled, args.verdict_only = prefilled, verdict_only
        args.ended = self.hub.take_ended()
        if query is not None and query.event == EVENT_TRIGGER:
            args.query_flagged, args.query_cats = True, query.cats
        elif query is not None and query.alert:
            args.query_alert = True
        action = req.config.on_violation
        host_stop = structured and args.action != ACTION_ANNOTATE
        if host_stop:
            args.action, action = ACTION_ANNOTATE, "stop"
        tracker = RequestTracker(rid, self.names, args, action, echo,
                                 req.config.trace, self.policy.prompt_thresholds_echo(args),
                                 host_stop=host_stop, withhold_answer=req.config.withhold_answer)
        tracker.query = query
        self.hub.register(tracker)
        return args.to_extra_args(), tracker

    def discard(self, tracker: RequestTracker) -> None:
        """Stop routing telemetry to a helper request's tracker (no metrics recorded)."""
        self.hub.release(tracker.rid)

    def close(self, tracker: RequestTracker, finish_reason: str | None = None,
              prompt_metrics: bool = True) -> None:
        try:
            tracker.record_metrics(finish_reason, prompt_metrics)
        finally:  # registered trackers are never left behind
            self.hub.release(tracker.rid)

    @staticmethod
    def stop_text() -> str:
        return DEFAULT_STOP_TEXT


def disabled_report(has_head: bool) -> SafetyReport:
    return SafetyReport(enabled=False, model_has_head=has_head, action="none",
                        config={"unsafe_allowed": True})


def guideline_message(cfg: SafetyConfig) -> str | None:
    return GUIDELINE_TEMPLATE.format(guideline=cfg.guideline.strip()) if cfg.guideline else None




# Letters drawn like Latin ones (lower case: matched after casefold): Cyrillic, Greek,
# Armenian, small capitals; and the letters that pass for "l" or "i" (an upper-case I reads as
# l in many fonts, so i and l are one letter here, as are o and 0). Not "|": punctuation,
# dropped like the rest, so it cannot split the words.
_LOOKALIKES = str.maketrans("аеорсухіјѕԁһкмнтвɡοαειντκρυүսꜱӏıl1ǀ0ɑոпгԍ",
                            "aeopcyxijsdhkmhtbgoaeivtkpuyusiiiiioannrg")


def _latin_forms() -> dict[int, str]:
    """Latin letters that NFKD leaves alone but that are drawn as a plain one (small capitals
    ``ᴀ``, ``ꜰ``, ``ʀ``; letters like ``ɪ``): every code point of the Latin extension blocks whose
    Unicode name ends in a single letter, read as that letter."""
    named = re.compile(r"^LATIN (?:SMALL |CAPITAL )?LETTER (?:SMALL CAPITAL )?([A-Z])$")
    out = {}
    for lo, hi in ((0x0180, 0x02AF), (0x1D00, 0x1DBF), (0xA720, 0xA7FF)):
        for cp in range(lo, hi + 1):
            m = named.match(unicodedata.name(chr(cp), ""))
            if m:
                out[cp] = m.group(1).lower()
    return out


_LOOKALIKES.update({cp: c for cp, c in _latin_forms().items() if cp not in _LOOKALIKES})
# (i and l are one letter here, o and 0 another: the table above folds them; so here)
_LOOKALIKES.update({cp: "i" for cp, c in _latin_forms().items() if c == "l"})


def _letters_and_digits(text: str) -> str:
    """Compatibility forms (full-width, ligatures) unfolded and accents split off (NFKD),
    case folded, look-alike letters read as Latin, and everything but letters and digits
    dropped (the split-off accents with the rest)."""
    folded = unicodedata.normalize("NFKD", text).casefold().translate(_LOOKALIKES)
    return re.sub(r"[\W_]+", "", folded)


# The header's words before its parenthesis, folded as the text is: punctuation, spacing,
# case, accents, invisible characters (zero-width spaces) and look-alike letters do not hide
# it, nor its near wordings (plural, "this chat").
_GUIDELINE_HEADER = re.compile(
    r"safetyguidelines?(?:for|of|in)this(?:conversation|chat|dialogu?e|session|thread|exchange)"
    .replace("l", "i"))  # the pattern's only letter the folding moves


def carries_guideline_header(text: str) -> bool:
    """Whether a client's message text holds the server's guideline header (its words in
    order, whatever stands between them). The guideline is a config field that authorization governs; the same words
    typed into a message would reach a config-conditioned model as a guideline no one
    authorized, so the HTTP layer refuses them."""
    return _GUIDELINE_HEADER.search(_letters_and_digits(text)) is not None
