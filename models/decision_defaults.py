"""Defaults of the serving decision rule that a checkpoint may override, shared by the server and
the offline replay (torch-free)."""

from __future__ import annotations

OPERATING_POINT = "operating_point"

# With an allow-list, the overall output acts for the category the head scores highest (see
# kernels/safety_decision.py) at its threshold moved by this many logits (+ = act less): the
# overall output fires on allowed content too, and its top category is often a wrong guess.
# Chosen on a CoSAlign-Test development split (outside the reported sample) for the default
# head; a checkpoint may name its own (``operating_point.allowlist_overall_shift``).
DEFAULT_ALLOWLIST_OVERALL_SHIFT = 2.0


def allowlist_overall_shift(extra: dict) -> float:
    """The overall output's logit shift under an allow-list, for a head's ``extra``."""
    point = extra.get(OPERATING_POINT) or {}
    return float(point.get("allowlist_overall_shift", DEFAULT_ALLOWLIST_OVERALL_SHIFT))
