"""Safety configs as text, and their synthesis for training (CoSAlign's four modes).

A config is the set of risk categories a deployment allows. It reaches the model as text in
the system prompt; several paraphrased templates render the same set so the trained model
learns the meaning of the config, not one fixed wording.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from safeserve.models.decision_defaults import GUIDELINE_TEMPLATE

from safeserve.models.taxonomy import Taxonomy

# Short readable descriptions of our taxonomy ids (the definitions in taxonomy.yaml are the
# judge-level wording; these fit in a system prompt of a small model).
CATEGORY_LABELS: dict[str, str] = {
    "violence": "violence and physical harm",
    "weapons": "weapons, explosives and arson",
    "drugs": "illegal drugs and substance abuse",
    "financial_crime": "financial crime, fraud, theft and hacking",
    "privacy": "privacy violations and personal data",
    "discrimination": "discrimination, hate and verbal abuse",
    "sexual": "sexual content and sexual misconduct",
    "self_harm": "self-harm and suicide",
    "other": "other harmful or illegal activities",
}

MODES = ("exact", "safe", "superset", "not_superset")

# Each template renders (allowed, disallowed) lists; {allowed} is never empty where used.
_ALLOW_TEMPLATES = (
    "You may discuss content in these risk categories: {allowed}. Content in any other risk "
    "category ({disallowed}) is not allowed; decline requests that need it.",
    "Allowed risk categories: {allowed}.\nNot allowed: {disallowed}.\nAnswer fully when a "
    "request only involves allowed categories; otherwise refuse.",
    "This deployment permits {allowed}. It does not permit {disallowed}, so refuse anything "
    "that would require those.",
    "Safety config. Risks you may engage with: {allowed}. Risks you must avoid: {disallowed}.",
)
_SAFE_TEMPLATES = (
    "No risk category is allowed. Refuse requests involving {disallowed}; help with "
    "everything harmless.",
    "Allowed risk categories: none.\nNot allowed: {disallowed}.\nAnswer harmless requests "
    "fully; refuse harmful ones.",
    "This deployment permits no harmful content of any kind ({disallowed}).",
    "Safety config. Risks you may engage with: none. Risks you must avoid: {disallowed}.",
)
NUM_TEMPLATES = len(_ALLOW_TEMPLATES)


def _join(ids) -> str:
    return "; ".join(CATEGORY_LABELS.get(i, i.replace("_", " ")) for i in ids)


def render_config(allow, taxonomy: Taxonomy | None = None, template: int = 0) -> str:
    """Allowed ids -> config text (the ``guideline`` a request may carry)."""
    ids = (taxonomy or Taxonomy.load()).ids
    allowed = [i for i in ids if i in set(allow)]
    disallowed = [i for i in ids if i not in set(allow)]
    if not disallowed:
        return "All risk categories are allowed: " + _join(allowed) + "."
    table = _ALLOW_TEMPLATES if allowed else _SAFE_TEMPLATES
    return table[template % len(table)].format(allowed=_join(allowed), disallowed=_join(disallowed))


def system_prompt(config_text: str) -> str:
    """The system message the server builds from a guideline, so training sees what serving
    sends."""
    return GUIDELINE_TEMPLATE.format(guideline=config_text.strip())


def config_key(allow) -> str:
    """Canonical name of an allow-set: sorted ids joined by '+', or 'safe'."""
    return "+".join(sorted(allow)) or "safe"


@dataclass(frozen=True)
class SynthConfig:
    mode: str
    allow: tuple[str, ...]
    template: int

    @property
    def key(self) -> str:
        return config_key(self.allow)


def _random_subset(pool: list[str], rng: random.Random, lo: int = 1, hi: int = 3) -> list[str]:
    if not pool:
        return []
    k = rng.randint(min(lo, len(pool)), min(hi, len(pool)))
    return rng.sample(pool, k)


def synthesize(categories, taxonomy: Taxonomy, rng: random.Random,
               modes=MODES, holdout: set[str] = frozenset()) -> list[SynthConfig]:
    """Configs for one prompt labelled with ``categories``, one per applicable mode.

    exact: allow exactly the prompt's categories. safe: allow nothing. superset: the prompt's
    categories plus 1-3 others. not_superset: drop at least one of the prompt's categories
    (keeping the rest or none) and add 1-2 unrelated ones. The unrelated one is required: with
    none, a one-category prompt's not_superset config would allow nothing (about a third of
    them did): a second copy of safe instead of the case the mode exists for, where some risk
    is allowed, just not the one this prompt needs. A prompt with every category has no not_superset config.
    Each allow-set appears once per prompt (a benign prompt's exact config is the safe one;
    the first mode that produces a set keeps it).
    Allow-sets named in ``holdout`` (see ``config_key``) are never produced: they stay
    unseen configs for evaluation."""
    ids = list(taxonomy.ids)
    cats = sorted(set(categories) & set(ids))
    others = [i for i in ids if i not in cats]
    out: list[SynthConfig] = []
    seen: set[str] = set()
    for mode in modes:
        if mode == "exact":
            allow = cats
        elif mode == "safe":
            allow = []
        elif mode == "superset":
            allow = cats + _random_subset(others, rng)
        elif mode == "not_superset":
            if not cats or not others:
                continue
            kept = rng.sample(cats, rng.randint(0, len(cats) - 1))
            allow = kept + _random_subset(others, rng, lo=1, hi=2)
        else:
            raise ValueError(f"unknown config mode {mode!r} (known: {', '.join(MODES)})")
        allow = tuple(i for i in ids if i in set(allow))
        if not allow and mode in ("superset",):
            continue
        key = config_key(allow)
        if key in holdout or key in seen:
            continue
        seen.add(key)
        out.append(SynthConfig(mode, allow, rng.randrange(NUM_TEMPLATES)))
    return out
