"""API keys and what each may ask for.

With no keys configured the server is open (development): any valid config is accepted.
With keys, every request must carry one, and the config it runs with may be no looser than
its key's ceiling; asking for more is a 403 naming what was refused, before anything is
generated. A client can never loosen safety by itself:

* The ceiling is the operator's default preset, as the server runs it (its allow-list,
  action, holdback, withhold_answer, thresholds, tau, guideline and the sentences of explanation after a
  refusal), widened only where the key's grant says so.
* A preset the grant names, and the default preset, are taken whole (the operator wrote
  them), tightened only where they are silent, and capped by `max_tau` where it is set.
  Every field any other
  preset or a custom config sets is checked against the ceiling: allow no more categories,
  no weaker action (annotate < refuse < stop; a grant with `annotate` may ask for any), no
  dropped holdback or withhold_answer, no higher threshold, no larger tau, no more sentences of explanation, and
  no guideline of its own (the guideline sits in the system prompt, where a config-conditioned
  model reads it as permission) unless the grant's `guideline` says so.
* The per-token score trace (``trace``: the body's field or ``X-Safety-Trace``) needs the
  grant's ``trace``: every token's scores beside its text are the head's decision surface,
  what an attacker tunes a jailbreak against. The prompt verdict's scores, which every
  response carries, need no grant. A preset the operator wrote with ``trace: true`` is theirs.
* Fields such a config leaves out are filled from the ceiling where the config's own
  default would be looser (e.g. a server whose default preset is `strict` gives a key's
  `{"tau": 2}` strict's thresholds, stop and holdback; a custom config, or a preset
  outside the grant, without a guideline runs with the default preset's). The response
  echoes the result.

Grants file (``--grants``), YAML::

    keys:
      studio-key-123:            # the key itself, or "sha256:<hex digest of the key>"
        name: game-studio
        presets: [game_development]  # taken whole, beside the default preset
        allow: [violence, weapons]   # the most a custom config may allow
        annotate: false              # may it ask for on_violation: annotate
        guideline: false             # may a custom config bring its own guideline
        trace: false                 # may it read the per-token score trace
        max_threshold: 0.7           # a request may set thresholds up to this (or the default's)
        max_tau: 5                   # ceiling of tau (default: the default preset's)
"""

from __future__ import annotations

import hashlib
import re
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safeserve.server.errors import APIError
from safeserve.server.safety_config import (SafetyConfig, SafetyPolicy, sets_overall_threshold,
                                            shift_probability)

ACTION_RANK = {"annotate": 0, "refuse": 1, "stop": 2}


class Grant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None  # shown in errors; the key itself never is
    presets: list[str] = Field(default_factory=list)
    allow: list[str] | None = None  # None: the default preset's allow-list
    annotate: bool = False
    guideline: bool = False  # may a custom config bring its own guideline text
    trace: bool = False  # may it read the per-token score trace
    max_threshold: float | None = Field(None, gt=0.0, lt=1.0)

    @field_validator("max_threshold")
    @classmethod
    def _max_threshold_in_float32(cls, v):
        # as the decision compares it: 0.99999999 would be 1.0 there, and no score exceeds 1
        if v is not None and not 0.0 < struct.unpack("f", struct.pack("f", v))[0] < 1.0:
            raise ValueError("max_threshold must be in (0, 1) in float32")
        return v
    max_tau: int | None = Field(None, ge=1)

    @property
    def label(self) -> str:
        return f"grant '{self.name}'" if self.name else "a grant without a name"


@dataclass(frozen=True)
class Principal:
    name: str
    grant: Grant | None  # None: open server, no limits
    # vLLM's prefix cache is shared by every request; a key's own salt keeps another key from
    # timing its requests against this key's cached prompts (None: an open server, one tenant)
    cache_salt: str | None = None


OPEN = Principal("anonymous", None)


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # a stored key's digest, lower-cased


def _masked(key) -> str:
    """A key as an error may show it: enough to find it in the file, not to use it."""
    text = repr(key)
    return text if len(text) <= 6 else f"{text[:3]}... ({len(text)} characters)"


class KeyRing:
    def __init__(self, keys: list[str], grants_path: Path | None, default_grant: Grant | None = None):
        self.default_grant = default_grant or Grant()
        self._plain: dict[str, Grant] = {}
        self._hashed: dict[str, Grant] = {}
        for key in keys:  # --api-key / SAFESERVE_API_KEYS: plain, or stored as sha256:<hex>
            self._add(key, self.default_grant, "--api-key")
        if grants_path is not None:
            try:
                data = yaml.safe_load(Path(grants_path).read_text())
            except yaml.YAMLError as e:
                # where, not what: YAML's message quotes the text around it, keys included
                mark = getattr(e, "problem_mark", None)
                at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ValueError(f"grants file {grants_path} is not valid YAML{at} "
                                 f"({type(e).__name__})") from None
            keys = data.get("keys") if isinstance(data, dict) else None
            if not isinstance(keys, dict) or not keys or set(data) != {"keys"}:
                # never an open server by accident: a typo here must not switch auth off
                raise ValueError(f"grants file {grants_path}: want a top-level 'keys:' mapping "
                                 "each key to its grant, and nothing else")
            for key, raw in keys.items():
                if not isinstance(key, str):
                    # YAML reads 0x1F, 012, on, null, 2024-01-01 as numbers, booleans, dates:
                    # the key written would never match, and another string would
                    raise ValueError(f"grants file {grants_path}: key {_masked(key)} is read "
                                     f"by YAML as a {type(key).__name__}, not text; quote it")
                if not isinstance(raw, dict | None):
                    raise ValueError(f"grants file {grants_path}: the grant of a key must be a "
                                     f"mapping, got {type(raw).__name__}")
                self._add(key, Grant(**(raw or {})), f"grants file {grants_path}")

    def _add(self, key: str, grant: Grant, where: str) -> None:
        if key[:7].lower() == "sha256:":
            digest = key[7:].strip().lower()
            if not _SHA256_HEX.fullmatch(digest):
                # anything else would never match (or, read as a plain key, make the stored
                # hash itself a working key)
                raise ValueError(f"{where}: key {_masked(key)} is not sha256: followed by 64 "
                                 "hex digits")
            self._hashed[digest] = grant
        else:
            if key != key.strip() or not key:
                raise ValueError(f"{where}: key {_masked(key)} is empty or has blanks around "
                                 "it (it could never match)")
            self._plain[key] = grant

    def check(self, policy: SafetyPolicy) -> None:
        """A startup error (ValueError) for a grant naming a preset or category the server
        does not have: such a grant would silently give less (or more) than its author meant."""
        known = set(policy.taxonomy.ids)
        for grant in {id(g): g for g in (*self._plain.values(), *self._hashed.values())}.values():
            if missing := sorted(set(grant.presets) - set(policy.presets)):
                raise ValueError(f"{grant.label}: unknown presets {missing} (known: "
                                 f"{', '.join(sorted(policy.presets))})")
            if missing := sorted(set(grant.allow or ()) - known):
                raise ValueError(f"{grant.label}: unknown categories {missing} in allow")

    @property
    def enabled(self) -> bool:
        return bool(self._plain or self._hashed)

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return OPEN
        header = authorization or ""
        # Only ASCII blanks are stripped: str.strip() would also take \x85 and \xa0, the last
        # byte of UTF-8's à, Å, ą, Š... as the header's latin-1 reading holds them.
        token = header[7:].strip(" \t") if header.lower().startswith("bearer ") else ""
        if token:
            sent = _header_bytes(token)
            salt = hashlib.sha256(b"safeserve prefix cache\0" + sent).hexdigest()[:32]
            for key, grant in self._plain.items():
                # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError,
                # i.e. a 500 for any client that sends one).
                if secrets.compare_digest(sent, key.encode("utf-8", "surrogatepass")):
                    return Principal(grant.name or "api-key", grant, salt)
            digest = hashlib.sha256(sent).hexdigest()
            for key, grant in self._hashed.items():
                if secrets.compare_digest(digest, key):
                    return Principal(grant.name or "api-key", grant, salt)
        raise APIError(401, "invalid or missing API key", type="authentication_error",
                       code="invalid_api_key")


def _header_bytes(value: str) -> bytes:
    """The bytes a client sent in a header: ASGI servers decode header bytes as latin-1, so a
    key typed in UTF-8 (``clé``) arrives as its bytes' latin-1 reading and matches only as
    bytes. A str that latin-1 cannot hold did not come from a header (a direct call)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class Ceiling:
    """The loosest effective config a key may run with."""

    allow: frozenset[str]
    on_violation: str  # the weakest action (annotate only with the grant's `annotate`)
    annotate: bool
    holdback: bool
    withhold_answer: bool
    thresholds: dict[str, float]  # per head output: the most a request may set
    default_thresholds: dict[str, float]  # the default preset's: what omitted ones become at most
    tau: int
    threshold_shift: float  # the default preset's response-rule shift: the loosest allowed
    explain_sentences: int  # the most sentences after a refusal (-1: no limit)
    guideline: str | None  # the default preset's: what a custom config without one runs with
    own_guideline: bool  # may a custom config set a different one
    # The default preset sets the overall output's threshold itself, so no head shift (the
    # allow-list's, sampled decoding's) moves it; one a config leaves out would move.
    pins_overall: bool = False


def _more_explanation(asked: int, limit: int) -> bool:
    """Is ``asked`` more sentences than ``limit`` (-1 on either side: no limit)?"""
    return limit >= 0 and (asked < 0 or asked > limit)


def ceiling_of(grant: Grant, policy: SafetyPolicy) -> Ceiling:
    base = policy.presets[policy.default_preset]
    defaults = policy.thresholds_of(base)
    thresholds = defaults
    if grant.max_threshold is not None:  # widens only: one number cannot fit every output's scale
        thresholds = {n: max(t, grant.max_threshold) for n, t in defaults.items()}
    allow = base.allow if grant.allow is None else grant.allow
    return Ceiling(frozenset(allow), base.on_violation, grant.annotate, base.holdback,
                   base.withhold_answer, thresholds,
                   defaults, grant.max_tau if grant.max_tau is not None else policy.tau_of(base),
                   float(base.threshold_shift or 0.0),
                   policy.explain_sentences_of(base), base.guideline, grant.guideline,
                   sets_overall_threshold(base))


def looser_fields(cfg: SafetyConfig, fields: set[str], ceiling: Ceiling,
                  policy: SafetyPolicy) -> list[str]:
    """What of ``cfg`` (only the ``fields`` it sets) is looser than ``ceiling``."""
    refused = []
    if "allow" in fields and (extra := sorted(set(cfg.allow) - ceiling.allow)):
        refused.append(f"allow {extra}")
    if ("on_violation" in fields and not ceiling.annotate  # annotate, the weakest, admits all
            and ACTION_RANK[cfg.on_violation] < ACTION_RANK[ceiling.on_violation]):
        refused.append(f"on_violation '{cfg.on_violation}' (at least '{ceiling.on_violation}')")
    if "holdback" in fields and ceiling.holdback and not cfg.holdback:
        refused.append("holdback false")
    if "withhold_answer" in fields and ceiling.withhold_answer and not cfg.withhold_answer:
        refused.append("withhold_answer false")
    if "tau" in fields and cfg.tau is not None and cfg.tau > ceiling.tau:
        refused.append(f"tau {cfg.tau} (max {ceiling.tau})")
    if "threshold_shift" in fields and cfg.threshold_shift > ceiling.threshold_shift + 1e-9:
        refused.append(f"threshold_shift {cfg.threshold_shift:g} "
                       f"(at most {ceiling.threshold_shift:g})")
    if ("explain_sentences" in fields
            and _more_explanation(cfg.explain_sentences, ceiling.explain_sentences)):
        refused.append(f"explain_sentences {cfg.explain_sentences} "
                       f"(max {ceiling.explain_sentences})")
    if ("guideline" in fields and not ceiling.own_guideline
            and (cfg.guideline or None) != (ceiling.guideline or None)):  # "": none
        refused.append("guideline (this key may not set its own)")
    if "threshold" in fields:
        asked = policy.thresholds_of(cfg)
        names = asked if not isinstance(cfg.threshold, dict) else cfg.threshold
        for name in names:
            if asked[name] > ceiling.thresholds[name] + 1e-9:
                refused.append(f"threshold {name}={asked[name]:g} (max {ceiling.thresholds[name]:g})")
    return refused


def set_fields(cfg: SafetyConfig) -> set[str]:
    """The fields a request set (an explicit null counts as left out)."""
    return {f for f in cfg.model_fields_set if getattr(cfg, f) is not None}


def fill_from_ceiling(cfg: SafetyConfig, ceiling: Ceiling, policy: SafetyPolicy, *,
                      preset: bool = False) -> SafetyConfig:
    """``cfg`` with the fields it leaves out tightened to the ceiling where needed. A preset
    keeps its own (absent) guideline: the default's could contradict its allow-list."""
    fields, update = set_fields(cfg), {}
    if not preset and "guideline" not in fields and ceiling.guideline is not None:
        update["guideline"] = ceiling.guideline
    if ("explain_sentences" not in fields and _more_explanation(
            policy.explain_sentences_of(cfg), ceiling.explain_sentences)):
        update["explain_sentences"] = ceiling.explain_sentences
    if "on_violation" not in fields and ACTION_RANK[cfg.on_violation] < ACTION_RANK[ceiling.on_violation]:
        update["on_violation"] = ceiling.on_violation
    if "holdback" not in fields and ceiling.holdback:
        update["holdback"] = True
    if "withhold_answer" not in fields and ceiling.withhold_answer:
        update["withhold_answer"] = True
    if "tau" not in fields and policy.tau_of(cfg) > ceiling.tau:
        update["tau"] = ceiling.tau
    current = policy.thresholds_of(cfg)
    explicit = (set(cfg.threshold) if isinstance(cfg.threshold, dict)
                else set(current) if cfg.threshold is not None else set())
    limit = ceiling.default_thresholds
    tightened = {n: limit[n] for n in current
                 if n not in explicit and current[n] > limit[n] + 1e-9}
    overall = policy.taxonomy.output_names[-1]
    if ceiling.pins_overall and overall not in explicit:
        # Left out, the overall threshold would move by the head's shifts (the allow-list's,
        # sampled decoding's) past the pin the default preset runs with. Set, it moves by none:
        # the allow-list's is kept as far as the pin (sampled decoding's, which the default
        # preset does not get either, is not).
        shifted = current[overall]
        if cfg.allow:
            shifted = shift_probability(shifted, policy.allowlist_overall_shift)
        tightened[overall] = min(shifted, limit[overall])
    if tightened:
        update["threshold"] = {**{n: current[n] for n in explicit}, **tightened}
    if "threshold_shift" not in fields and ceiling.threshold_shift < 0:
        update["threshold_shift"] = ceiling.threshold_shift
    return cfg.model_copy(update=update) if update else cfg


def authorize_config(principal: Principal, preset: str | None, cfg: SafetyConfig,
                     policy: SafetyPolicy, trace_returned: bool = True,
                     param: str = "safety_config", trace_param: str | None = None
                     ) -> SafetyConfig:
    """The config the request runs with, or a 403 if it asks for more than its key permits.
    ``trace_returned``: False where no trace is ever returned (moderation's verdicts), so
    asking for one there reveals nothing and needs no grant. ``param``: where the config
    came from (the body's ``safety_config`` or the ``X-Safety-Config`` header), and
    ``trace_param`` where its trace was asked for (default: the same), named by a 403."""
    grant = principal.grant
    if grant is None:
        # no keys: nothing is refused, but a custom config's omitted fields still come from
        # the operator's default preset, as on a keyed server (a preset is taken whole)
        return cfg if preset is not None else fill_from_ceiling(cfg, ceiling_of(Grant(), policy),
                                                                policy)
    whole = preset is not None and (preset == policy.default_preset or preset in grant.presets)
    if (trace_returned and cfg.trace and not grant.trace
            and not (whole and policy.presets[preset].trace)):
        # (a preset taken whole that traces is the operator's word; any other is an ask)
        who = f"API key '{grant.name}'" if grant.name else "this API key"
        raise APIError(403, f"{who} may not request: trace (the per-token scores; the "
                       "grant's 'trace' allows it)", type="permission_error",
                       param=trace_param or param, code="safety_config_not_permitted")
    ceiling = ceiling_of(grant, policy)
    if whole:
        # taken whole; the key's caps still apply (max_tau too, where the preset sets a tau)
        cfg = fill_from_ceiling(cfg, ceiling, policy, preset=True)
        if grant.max_tau is not None and policy.tau_of(cfg) > grant.max_tau:
            cfg = cfg.model_copy(update={"tau": grant.max_tau})
        return cfg
    refused = looser_fields(cfg, set_fields(cfg), ceiling, policy)
    if refused and preset is not None:
        refused = [f"preset '{preset}': " + "; ".join(refused)]
    if refused:
        who = f"API key '{grant.name}'" if grant.name else "this API key"
        raise APIError(403, f"{who} may not request: " + "; ".join(refused),
                       type="permission_error", param=param,
                       code="safety_config_not_permitted")
    # A preset outside the grant is checked field by field like a custom config, and like
    # one it runs with the ceiling's guideline when it has none: dropping the operator's
    # guideline is not stricter.
    return fill_from_ceiling(cfg, ceiling, policy)
