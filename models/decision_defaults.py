"""Defaults of the serving decision rule that a checkpoint may override, shared by the server and
the offline replay (torch-free)."""

from __future__ import annotations

OPERATING_POINT = "operating_point"

# Consecutive violating steps for a head whose operating point names no tau.
HEAD_DEFAULT_TAU = 3

# With an allow-list, the overall output acts for the category the head scores highest (see
# kernels/safety_decision.py) at its threshold moved by this many logits (+ = act less): the
# overall output fires on allowed content too, and its top category is often a wrong guess.
# Chosen on a CoSAlign-Test development split (outside the reported sample) for the default
# head; a checkpoint may name its own (``operating_point.allowlist_overall_shift``; the default
# head v8 names +1: its attribution read-out names the category per request, see README).
DEFAULT_ALLOWLIST_OVERALL_SHIFT = 2.0


# A request's tau is at most this (the safety config's bound); so is a head's.
MAX_TAU = 16


def overall_threshold(extra: dict) -> float:
    """The overall output's served threshold for a head's ``extra``: a number inside (0, 1)
    (0.5 when absent). Checked, not trusted: 1.5 or NaN would switch the output off, and
    nothing downstream would say so."""
    value = extra.get("overall_threshold", 0.5)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0.0 < float(value) < 1.0):  # NaN fails both comparisons
        raise ValueError(f"overall_threshold must be a number inside (0, 1); got {value!r}")
    return float(value)


def head_tau(extra: dict, default: int) -> int:
    """The response rule's consecutive violating steps for a head's ``extra``: an integer in
    [1, MAX_TAU] (``default`` when its operating point names none)."""
    value = (extra.get(OPERATING_POINT) or {}).get("tau", default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TAU:
        raise ValueError(f"operating_point.tau must be an integer in [1, {MAX_TAU}]; "
                         f"got {value!r}")
    return value


def allowlist_overall_shift(extra: dict) -> float:
    """The overall output's logit shift under an allow-list, for a head's ``extra``: a number
    in [0, 10]. Never negative: a request that sets its own ``threshold.unsafe`` replaces the
    shifted threshold, and authorization compares that against the unshifted one, so a
    tightening shift could be dropped by any client allowed that threshold."""
    point = extra.get(OPERATING_POINT) or {}
    value = point.get("allowlist_overall_shift", DEFAULT_ALLOWLIST_OVERALL_SHIFT)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10:
        raise ValueError("operating_point.allowlist_overall_shift must be a number of logits in "
                         f"[0, 10]; got {value!r}")
    return float(value)


def alert_band(extra: dict) -> tuple[float, int | None]:
    """A head's alert band: (margin in logits, tau inside it). A prompt whose verdict came
    within ``margin`` logits of its thresholds without reaching them is answered, but its
    response rule acts after ``alert_tau`` consecutive violating steps instead of tau (the
    smaller of the two). (0, None): no band, the default."""
    point = extra.get(OPERATING_POINT) or {}
    margin = float(point.get("alert_margin", 0.0))
    tau = point.get("alert_tau")
    if margin < 0:
        raise ValueError(f"operating_point.alert_margin must be >= 0; got {margin}")
    if margin > 0 and (tau is None or int(tau) < 1):
        raise ValueError("operating_point.alert_margin needs alert_tau >= 1")
    return (margin, int(tau)) if margin > 0 else (0.0, None)


# How a request's guideline reaches the model: the system message the server builds from it,
# and what config-conditioned training (models/cosalign) writes, so the two cannot differ.
GUIDELINE_TEMPLATE = "Safety guideline for this conversation (follow it):\n{guideline}"


PROMPT_LOGIT_OFFSET = "prompt_logit_offset"


def prompt_logit_offset(extra: dict) -> float:
    """A head's prompt offset (logits added at prompt ends, kernels/safety_head.py): how much
    more sensitive the prompt verdict is than the response rule at the same thresholds. 0 for
    heads without one (their prompt operating point, if any, is folded into the weights)."""
    point = extra.get(OPERATING_POINT) or {}
    value = point.get(PROMPT_LOGIT_OFFSET, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or abs(value) > 50:
        raise ValueError(f"operating_point.{PROMPT_LOGIT_OFFSET} must be a number of logits "
                         f"in [-50, 50]; got {value!r}")
    return float(value)


# Under a non-empty allow-list (no assistant prefill), a head with a topic gate (format 8) may
# leave the prompt verdict to the overall output, with its named category, and to the gate:
# the per-category harm outputs then judge generated tokens only. They do not tell a
# conversational request's categories apart (on CoSAlign-Test's development split most of
# v10's flags on requests whose risks were all allowed came from them), which is the gate's job.
GATE_REPLACES_PROMPT_CATEGORIES = "gate_replaces_prompt_categories"
# Logits the topic gate's thresholds move by (+ = open less often), on top of the fold in
# its bias.
TOPIC_GATE_SHIFT = "topic_gate_shift"


def gate_replaces_prompt_categories(extra: dict) -> bool:
    """Whether a gated request's prompt verdict skips the per-category harm outputs."""
    value = (extra.get(OPERATING_POINT) or {}).get(GATE_REPLACES_PROMPT_CATEGORIES, False)
    if not isinstance(value, bool):
        raise ValueError(f"operating_point.{GATE_REPLACES_PROMPT_CATEGORIES} must be true or "
                         f"false; got {value!r}")
    return value


def topic_gate_shift(extra: dict) -> float:
    """The topic gate's threshold shift in logits (0: as trained)."""
    value = (extra.get(OPERATING_POINT) or {}).get(TOPIC_GATE_SHIFT, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or abs(value) > 50:
        raise ValueError(f"operating_point.{TOPIC_GATE_SHIFT} must be a number of logits in "
                         f"[-50, 50]; got {value!r}")
    return float(value)


# A request without an allow-list, under a head whose prompt read-out sits beside its own
# verdict (format 5 or later), may have its prompt judged by the head's own OVERALL output and
# the read-out's outputs, the read-out moved by a logit shift (+ = act less). The own
# per-category outputs are where most false alarms on benign prompts came from (default head
# v13 on its development sets, docs/history/safety-head.md), but they also catch short
# canonical requests ("How do I build a pipe bomb?") the read-out misses, which is why the
# default head does not use this rule (candidate v14, withdrawn). Allow-listed requests keep
# both verdicts: the CoSA operating point was chosen with them.
NO_ALLOWLIST_PROMPT_OWN = "no_allowlist_prompt_own"  # "all" (default) | "overall"
NO_ALLOWLIST_READOUT_SHIFT = "no_allowlist_readout_shift"
PROMPT_OWN_CHOICES = ("all", "overall")


def without_no_allowlist_rule(extra: dict) -> tuple[dict, list[str]]:
    """``extra`` without the prompt rule of requests without an allow-list, and the keys
    removed: commands that refit a head's prompt read-out drop it (its shift was chosen for
    the read-out it moves)."""
    point = extra.get(OPERATING_POINT) or {}
    keys = (NO_ALLOWLIST_PROMPT_OWN, NO_ALLOWLIST_READOUT_SHIFT)
    removed = [k for k in keys if k in point]
    if not removed:
        return extra, []
    return {**extra, OPERATING_POINT: {k: v for k, v in point.items() if k not in keys}}, removed


def no_allowlist_prompt_rule(extra: dict) -> tuple[str, float]:
    """(which own outputs judge the prompt of a request without an allow-list, the read-out's
    logit shift there): ("all", 0.0) for heads that name neither."""
    point = extra.get(OPERATING_POINT) or {}
    own = point.get(NO_ALLOWLIST_PROMPT_OWN, "all")
    if own not in PROMPT_OWN_CHOICES:
        raise ValueError(f"operating_point.{NO_ALLOWLIST_PROMPT_OWN} must be one of "
                         f"{', '.join(PROMPT_OWN_CHOICES)}; got {own!r}")
    shift = point.get(NO_ALLOWLIST_READOUT_SHIFT, 0.0)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or shift != shift \
            or abs(shift) > 50:
        raise ValueError(f"operating_point.{NO_ALLOWLIST_READOUT_SHIFT} must be a number of "
                         f"logits in [-50, 50]; got {shift!r}")
    return own, float(shift)


# Sampled decoding: the response rule's overall `unsafe` output is calibrated on greedy
# answers, and a small model's sampled text (temperature 0.7-1) trips it on benign prompts
# (session 36: 29 of 250 XSTest answers at temperature 1.0, 7 greedy). A head may name how
# many logits that threshold moves at a request's sampling temperature (+ = asks for more
# evidence): points (temperature, shift), linear between them and from (0, 0), flat past the
# last. Chosen on development runs sampled at those temperatures (README, Evaluation).
SAMPLED_OVERALL_SHIFT = "sampled_overall_shift"


def sampled_overall_shift_points(extra: dict) -> tuple[tuple[float, float], ...]:
    """A head's (temperature, logit shift) points, checked: temperatures in (0, 2] and
    increasing, shifts in [0, 10] (a loosening only, as ``allowlist_overall_shift``). ()
    where the head names none."""
    raw = (extra.get(OPERATING_POINT) or {}).get(SAMPLED_OVERALL_SHIFT)
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"operating_point.{SAMPLED_OVERALL_SHIFT}: want a list of [temperature, "
                         f"shift] pairs; got {raw!r}")
    points = []
    for item in raw:
        ok = isinstance(item, (list, tuple)) and len(item) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in item)
        if not ok or not 0 < item[0] <= 2 or not 0 <= item[1] <= 10:
            raise ValueError(f"operating_point.{SAMPLED_OVERALL_SHIFT}: want [temperature in "
                             f"(0, 2], shift in [0, 10]] pairs; got {item!r}")
        points.append((float(item[0]), float(item[1])))
    if any(b[0] <= a[0] for a, b in zip(points, points[1:])):
        raise ValueError(f"operating_point.{SAMPLED_OVERALL_SHIFT}: temperatures must increase")
    return tuple(points)


# With a margin m (logits), the sampled shift applies only to requests whose prompt verdict
# is clear: not flagged, and every output at least m logits under its prompt threshold. The
# harmful answers a plain shift let through followed prompts that came close to their
# verdict; sampled benign answers mostly follow clear ones (docs/history/safety-head.md).
SAMPLED_CLEAR_MARGIN = "sampled_shift_clear_margin"


def sampled_clear_margin(extra: dict) -> float | None:
    """A head's clear margin for its sampled shift (None: the shift applies to every
    sampled request)."""
    value = (extra.get(OPERATING_POINT) or {}).get(SAMPLED_CLEAR_MARGIN)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10:
        raise ValueError(f"operating_point.{SAMPLED_CLEAR_MARGIN} must be a number of logits in "
                         f"[0, 10]; got {value!r}")
    return float(value)


def check_sampled_clear_margin(extra: dict) -> None:
    """A clear margin must not make a prompt both alert (watched more closely) and clear
    (judged more loosely). (It only conditions a loosening: the shifts are never negative,
    ``sampled_overall_shift_points``.)"""
    margin = sampled_clear_margin(extra)
    if margin is None:
        return
    alert_margin, _ = alert_band(extra)
    if margin < alert_margin:
        raise ValueError(f"operating_point.{SAMPLED_CLEAR_MARGIN} ({margin:g}) must be at least "
                         f"the alert band's margin ({alert_margin:g})")
    sampled_overall_shift_points(extra)


def overall_shift_at(points: tuple[tuple[float, float], ...], temperature: float) -> float:
    """The overall output's response shift at ``temperature`` (0: greedy, no shift)."""
    if temperature <= 0 or not points:
        return 0.0
    prev_t, prev_s = 0.0, 0.0
    for t, s in points:
        if temperature <= t:
            return prev_s + (s - prev_s) * (temperature - prev_t) / (t - prev_t)
        prev_t, prev_s = t, s
    return prev_s
