"""Per-request safety configs (CoSAlign-style): the request contract, presets, and the
compilation of a config into the per-row arrays the decision kernel reads.

A config arrives in the ``X-Safety-Config`` header (a preset name or a JSON object) or in the
body's ``safety_config``; it is validated once here, into a typed ``SafetyConfig``."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from safeserve.kernels.safety_decision import MASK_ATTRIBUTED, MASK_LIVE
from safeserve.models.decision_defaults import (
    DEFAULT_ALLOWLIST_OVERALL_SHIFT,
    HEAD_DEFAULT_TAU,
    overall_shift_at,
)
from safeserve.models.taxonomy import OVERALL, Taxonomy
from safeserve.server import safety_wire as W
from safeserve.server.body_json import MAX_JSON_VALUES, RepeatedKey, TooManyValues, loads_checked
from safeserve.server.errors import APIError, bad_request
from safeserve.server.protocol import SafeStr, find_lone_surrogate, shown_score, surrogate_error

PRESET_NAME = re.compile(r"[a-z0-9_-]+")  # used with fullmatch ($ would pass a final newline)
DEFAULT_PRESETS = Path(__file__).with_name("presets") / "presets.yaml"
MAX_GUIDELINE_CHARS = 2000
MIN_THRESHOLD_SHIFT = -8.0  # logits: sigmoid(logit(0.9998) - 8) = 0.4
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
DEFAULT_STOP_TEXT = "I can't continue with this request."


DEFAULT_TAU = HEAD_DEFAULT_TAU  # consecutive violating steps, for heads that name none
# After a refusal the model explains; small models soon loop ("I'm here to help with ..."
# again and again), so by default one sentence, then the response ends.
DEFAULT_EXPLAIN_SENTENCES = 1
MAX_EXPLAIN_SENTENCES = 16


def shift_probability(p: float, logits: float) -> float:
    """``p`` moved by ``logits`` on the logit scale (clamped off 0 and 1 first)."""
    p = min(max(p, 1e-7), 1 - 1e-7)
    return 1.0 / (1.0 + math.exp(-(math.log(p / (1 - p)) + logits)))


def echoed_thresholds(names, values) -> dict[str, float]:
    """Thresholds as the kernel compares them, shown as scores are (``shown_score``)."""
    return {n: shown_score(v) for n, v in zip(names, values)}


def _float32(x: float) -> float:
    """``x`` rounded to float32, as the decision kernel holds thresholds."""
    return struct.unpack("f", struct.pack("f", x))[0]


class SafetyConfig(BaseModel):
    """Strict types: ``"0.5"`` is not a threshold, ``true`` / ``"3"`` are not a tau."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow: tuple[SafeStr, ...] = ()
    threshold: StrictFloat | dict[SafeStr, StrictFloat] | None = None
    on_violation: Literal["refuse", "stop", "annotate"] = "refuse"
    holdback: StrictBool = False
    # On an action of the response rule, withhold the whole answer before it, not only the
    # violating run: what the model wrote before the signal fired may already be the harm.
    # Streamed, nothing is released until the response has ended or been acted on.
    withhold_answer: StrictBool = False
    guideline: SafeStr | None = None
    # Logits added to every output's threshold for generated tokens (the response rule), on
    # the logit scale where the head's thresholds live (0.991-0.99998 for the default head: no single
    # probability suits them all); the prompt verdict keeps `threshold`'s (or the head's).
    # Negative: the response rule acts sooner. Never positive: a request loosens only through
    # `threshold`, which authorization checks per output.
    threshold_shift: StrictFloat | StrictInt | None = Field(None, ge=MIN_THRESHOLD_SHIFT, le=0)
    trace: StrictBool = False
    # None: the head's operating point (``operating_point.tau`` in its checkpoint, else 3).
    tau: StrictInt | None = Field(None, ge=1, le=16)
    # Sentences the model may write after a spliced refusal (0: none). None: the operator's
    # default (--refusal-explain-sentences), which is also the most a request may ask for.
    explain_sentences: StrictInt | None = Field(None, ge=0, le=MAX_EXPLAIN_SENTENCES)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        # An explicit null is the field's default, as for the request's own fields (every
        # default here is None or means the same), and counts as left out, as authorization
        # and the header-versus-body comparison treat an omitted field.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    @field_validator("allow")
    @classmethod
    def _allow(cls, v):
        return tuple(sorted(set(v)))  # a set: the same categories in any order are one config

    @field_validator("guideline")
    @classmethod
    def _guideline(cls, v):
        if v is not None and len(v) > MAX_GUIDELINE_CHARS:
            raise ValueError(f"at most {MAX_GUIDELINE_CHARS} characters (got {len(v)})")
        # only blanks: no guideline (a header over nothing would run into the client's system
        # message)
        return v if v is None or v.strip() else None

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v):
        values = v.values() if isinstance(v, dict) else [] if v is None else [v]
        for x in values:
            # In (0, 1) as the kernel compares it (float32): 0.99999999 would be 1.0 there.
            if not 0.0 < x < 1.0 or not 0.0 < _float32(x) < 1.0:
                raise ValueError("thresholds must be numbers in (0, 1) (in float32, as the "
                                 "decision compares them)")
        return v

    def echo(self) -> dict:
        return self.model_dump(exclude_none=True, mode="json")


_TYPE_TAGS = {"str", "int", "float", "bool"}


def _config_error(source: str, err: ValidationError) -> APIError:
    first = err.errors()[0]
    if first["type"] == "extra_forbidden":
        # the client's own key, verbatim (it may look like a union tag: "str", "a[b]", "")
        field = ".".join(str(p) for p in first["loc"])[:64]
        return bad_request(f"unknown safety config field '{field}'",
                           param=f"{source}.{field}", code="invalid_safety_config")
    # drop the union members pydantic adds to a location ("threshold.float")
    field = ".".join(str(p) for p in first["loc"]
                     if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))) or source
    return bad_request(f"invalid safety config field '{field}': {first['msg']}",
                       param=f"{source}.{field}", code="invalid_safety_config")


def sets_overall_threshold(cfg: SafetyConfig) -> bool:
    """The config names the overall output's threshold itself: no head shift moves it."""
    return isinstance(cfg.threshold, float) or (
        isinstance(cfg.threshold, dict) and OVERALL in cfg.threshold)


class SafetyPolicy:
    """The server's taxonomy and presets; parses, checks and compiles request configs."""

    def __init__(self, taxonomy: Taxonomy, presets_path: Path | None = None,
                 default_preset: str = "default", overall_threshold: float = 0.5,
                 default_tau: int = DEFAULT_TAU,
                 allowlist_overall_shift: float = DEFAULT_ALLOWLIST_OVERALL_SHIFT,
                 sampled_overall_shift: tuple[tuple[float, float], ...] = (),
                 sampled_clear_margin: float | None = None,
                 alert_margin: float = 0.0, alert_tau: int | None = None,
                 explain_sentences: int = DEFAULT_EXPLAIN_SENTENCES,
                 gate_replaces_prompt_categories: bool = False):
        self.taxonomy = taxonomy
        # A head whose topic gate judges an allow-listed prompt's categories (format 9): its
        # per-category outputs are not compared there (prompt_thresholds_echo).
        self.gate_replaces_prompt_categories = gate_replaces_prompt_categories
        if not -1 <= explain_sentences <= MAX_EXPLAIN_SENTENCES:
            raise ValueError(f"explain_sentences must be in [-1, {MAX_EXPLAIN_SENTENCES}] "
                             "(-1: no limit)")
        self.explain_sentences = explain_sentences
        self.overall_threshold = overall_threshold
        self.default_tau = default_tau
        # The head's alert band (models/decision_defaults.alert_band): margin in logits below
        # the request's own prompt thresholds; inside it the response run is min(alert_tau, tau).
        self.alert_margin = alert_margin if alert_tau else 0.0
        self.alert_tau = alert_tau if self.alert_margin > 0 else None
        self.allowlist_overall_shift = allowlist_overall_shift
        # The head's (temperature, shift) points for the overall output's response threshold
        # under sampled decoding (models/decision_defaults.overall_shift_at)
        self.sampled_overall_shift = tuple(sampled_overall_shift)
        # None: the shift applies to every sampled request; a number m: only to requests
        # whose prompt verdict is clear by m logits (decided in the decision kernel)
        self.sampled_clear_margin = sampled_clear_margin
        path = presets_path or DEFAULT_PRESETS
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: " + " ".join(str(e).split())) from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: want a mapping of preset names to configs")
        self.presets: dict[str, SafetyConfig] = {}
        for name, body in raw.items():
            if not isinstance(name, str) or not PRESET_NAME.fullmatch(name):
                raise ValueError(f"preset name {name!r} must match {PRESET_NAME.pattern}")
            if not isinstance(body, dict | None):
                raise ValueError(f"preset {name}: want a mapping of config fields, got "
                                 f"{type(body).__name__}")
            try:
                self.presets[name] = self._checked(SafetyConfig(**(body or {})), f"preset {name}")
            except (ValidationError, TypeError) as e:  # TypeError: a key that is no name
                raise ValueError(f"preset {name}: {e}") from None
            except APIError as e:  # an unknown category, worded for a request
                raise ValueError(e.message) from None
            asked = self.presets[name].explain_sentences
            if asked is not None and 0 <= self.explain_sentences < asked:
                raise ValueError(f"preset {name}: explain_sentences {asked} is over this "
                                 f"server's limit ({self.explain_sentences})")
        if default_preset not in self.presets:
            raise ValueError(f"default preset {default_preset!r} is not defined")
        self.default_preset = default_preset

    def _checked(self, cfg: SafetyConfig, source: str) -> SafetyConfig:
        known = set(self.taxonomy.ids)
        for c in cfg.allow:
            if c not in known:
                raise bad_request(f"unknown category '{c}' in {source}.allow (known: "
                                  f"{', '.join(self.taxonomy.ids)})", param=f"{source}.allow",
                                  code="invalid_safety_config")
        if isinstance(cfg.threshold, dict):
            for c in cfg.threshold:
                if c not in known and c != "unsafe":
                    raise bad_request(f"unknown category '{c}' in {source}.threshold",
                                      param=f"{source}.threshold", code="invalid_safety_config")
        return cfg

    def parse(self, value, source: str) -> tuple[str | None, SafetyConfig]:
        """A header string or a body value -> (preset name or None, config)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                try:
                    value = loads_checked(text)
                except TooManyValues:
                    raise bad_request(f"{source} holds more than {MAX_JSON_VALUES} JSON values",
                                      param=source, code="invalid_safety_config") from None
                except RepeatedKey as e:
                    # JSON parsers differ on which value wins (a proxy or an audit log may read
                    # the first): one config, said once
                    raise bad_request(f"{source} sets '{e.key}' more than once",
                                      param=f"{source}.{e.key}",
                                      code="invalid_safety_config") from None
                except (ValueError, RecursionError):  # JSONDecodeError, or nesting too deep
                    raise bad_request(f"{source} is not valid JSON", param=source,
                                      code="invalid_safety_config") from None
            else:
                if not PRESET_NAME.fullmatch(text):
                    raise bad_request(f"{source} must be a preset name ([a-z0-9_-]+) or a JSON "
                                      "object", param=source, code="invalid_safety_config")
                if text not in self.presets:
                    raise bad_request(f"unknown safety preset '{text}' (known: "
                                      f"{', '.join(sorted(self.presets))})", param=source,
                                      code="unknown_preset")
                return text, self.presets[text]
        if not isinstance(value, dict):
            raise bad_request(f"{source} must be a preset name or an object", param=source,
                              code="invalid_safety_config")
        path = find_lone_surrogate(value)  # JSON in a header may escape one: "\ud800"
        if path is not None:
            param, message = surrogate_error(path, source)
            raise bad_request(message, param=param, code="invalid_string")
        try:
            cfg = SafetyConfig(**value)
        except ValidationError as e:
            raise _config_error(source, e) from None
        limit = self.explain_sentences
        if cfg.explain_sentences is not None and 0 <= limit < cfg.explain_sentences:
            raise bad_request(f"invalid safety config field 'explain_sentences': at most {limit} "
                              "on this server", param=f"{source}.explain_sentences",
                              code="invalid_safety_config")
        return None, self._checked(cfg, source)

    def resolve(self, header: str | None, body) -> tuple[str | None, SafetyConfig]:
        got_header = header is not None and header.strip() != ""
        got_body = body is not None
        if got_header and got_body:
            h, b = self.parse(header, "X-Safety-Config"), self.parse(body, "safety_config")
            # A preset's name and its fields written out agree; so do two objects setting
            # the same fields to the same values (a field one sets and the other leaves to
            # its default, e.g. holdback false beside nothing, is a disagreement: one would
            # be ignored).
            if (h[1] != b[1] or h[1].model_dump(exclude_unset=True)
                    != b[1].model_dump(exclude_unset=True)):
                raise bad_request("X-Safety-Config and safety_config disagree; send one",
                                  param="safety_config", code="conflicting_safety_config")
            return h if h[0] is not None else b
        if got_header:
            return self.parse(header, "X-Safety-Config")
        if got_body:
            return self.parse(body, "safety_config")
        return self.default_preset, self.presets[self.default_preset]

    def tau_of(self, cfg: SafetyConfig) -> int:
        return cfg.tau if cfg.tau is not None else self.default_tau

    def explain_sentences_of(self, cfg: SafetyConfig) -> int:
        """Sentences of explanation after a refusal (-1: no limit)."""
        return cfg.explain_sentences if cfg.explain_sentences is not None else self.explain_sentences

    def alert_tau_of(self, cfg: SafetyConfig) -> int | None:
        """The response run after a prompt in the alert band (never longer than tau), or
        None when the head has no band."""
        return min(self.alert_tau, self.tau_of(cfg)) if self.alert_tau else None

    def thresholds_of(self, cfg: SafetyConfig) -> dict[str, float]:
        """The threshold of every head output (categories, then the overall) ``cfg`` runs
        with at the prompt verdict; the response rule's are these moved by its
        ``threshold_shift`` (``response_thresholds_of``)."""
        out = {c.id: c.threshold for c in self.taxonomy.categories}
        out["unsafe"] = self.overall_threshold
        if isinstance(cfg.threshold, dict):
            out.update(cfg.threshold)
        elif cfg.threshold is not None:
            out = dict.fromkeys(out, float(cfg.threshold))
        return out

    def response_thresholds_of(self, cfg: SafetyConfig) -> dict[str, float]:
        out = self.thresholds_of(cfg)
        if cfg.threshold_shift:
            out = {n: shift_probability(t, cfg.threshold_shift) for n, t in out.items()}
        return out

    def prompt_thresholds_echo(self, args) -> dict[str, float | None]:
        """What the prompt (and query) verdict compared each output against for a request
        compiled to ``args``. None for the per-category outputs where they were not compared:
        an allow-listed, unprefilled prompt under a head whose topic gate judges the
        categories there (format 9; the overall output still acts for its named category)."""
        echo: dict[str, float | None] = dict(echoed_thresholds(
            self.taxonomy.output_names, args.prompt_thresholds or args.thresholds))
        if (self.gate_replaces_prompt_categories and args.masked[-1] == MASK_ATTRIBUTED
                and not args.prefilled):
            for name in self.taxonomy.output_names[:-1]:
                echo[name] = None
        return echo

    def sampled_shift_of(self, cfg: SafetyConfig, temperature: float) -> float:
        """Logits the overall output's response threshold moves by for a request sampling at
        ``temperature`` (0 when greedy, or when the request set that threshold itself)."""
        if sets_overall_threshold(cfg):
            return 0.0
        # rounded once: what the kernel runs is exactly what the response echoes and a
        # replay of the echo applies
        return round(overall_shift_at(self.sampled_overall_shift, temperature), 4)

    def compile(self, cfg: SafetyConfig, rid: str, refusal_ids: list[int],
                eos_id: int, refusal_sep: int = 0, temperature: float = 0.0,
                prefilled: bool = False) -> W.RowSafetyArgs:
        ids = self.taxonomy.ids
        thresholds = list(self.response_thresholds_of(cfg).values())  # categories, then overall
        prompt_thresholds = list(self.thresholds_of(cfg).values())
        allowed = set(cfg.allow)
        masked = [1 if c in allowed else 0 for c in ids]
        # The overall score cannot say which category it saw: with an allow-list it acts for
        # the category the head scores highest, unless that one is allowed (MASK_ATTRIBUTED),
        # so allowing one category never switches the overall detector off for the others.
        # Its threshold moves by the head's allow-list shift unless the request set it.
        masked.append(MASK_ATTRIBUTED if allowed else MASK_LIVE)
        if allowed and not sets_overall_threshold(cfg):
            thresholds[-1] = shift_probability(thresholds[-1], self.allowlist_overall_shift)
            prompt_thresholds[-1] = shift_probability(prompt_thresholds[-1],
                                                      self.allowlist_overall_shift)
        sampled = self.sampled_shift_of(cfg, temperature)
        sampled_overall, clear_scale = None, 1.0
        if sampled and self.sampled_clear_margin is None:
            # generated tokens only: the prompt verdict does not depend on sampling
            thresholds[-1] = shift_probability(thresholds[-1], sampled)
        elif sampled and not prefilled:
            # only if the prompt verdict turns out clear, which the kernel decides (a prefilled
            # request's prompt row reads the attacker's opening: never clear, no shift)
            sampled_overall = shift_probability(thresholds[-1], sampled)
            clear_scale = math.exp(self.sampled_clear_margin)
            sampled = 0.0  # the response thresholds stand as compiled
        alert_tau = self.alert_tau_of(cfg)
        return W.RowSafetyArgs(rid=rid, thresholds=thresholds, masked=masked, tau=self.tau_of(cfg),
                               action=W.ACTION_CODES[cfg.on_violation],
                               refusal_ids=refusal_ids, refusal_sep=refusal_sep, eos_id=eos_id,
                               alert_scale=math.exp(self.alert_margin) if alert_tau else 1.0,
                               alert_tau=alert_tau or 0,
                               explain_sentences=self.explain_sentences_of(cfg),
                               prompt_thresholds=(prompt_thresholds
                                                  if cfg.threshold_shift or sampled else None),
                               sampled_overall=sampled_overall, clear_scale=clear_scale)
