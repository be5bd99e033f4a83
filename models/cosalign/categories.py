"""Category names used by CoSAlign's data and by BeaverTails, mapped onto our taxonomy ids.

Names are compared after dropping case and every non-alphanumeric character, so the test
set's ``Illegal_Drug.Related_Activities_and_Substance_Abuse`` and the training lists'
``Illegal Drug_Related Activities and Substance Abuse`` are the same key.
"""

from __future__ import annotations

import re

# CoSAlign's seven categories (+ "Other Harms") -> taxonomy ids.
COSA_NAMES: dict[str, str] = {
    "Financial_Crime_and_Theft": "financial_crime",
    "Discrimination_and_Verbal_Abuse": "discrimination",
    "Violence": "violence",
    "Illegal_Drug.Related_Activities_and_Substance_Abuse": "drugs",
    "Privacy_Violations": "privacy",
    "Sexual_Misconduct_Exploitation_and_Infidelity": "sexual",
    "Weapons_Explosives_Arson_and_Illegal_Firearm_Transactions": "weapons",
    "Other_Harms": "other",
}

# BeaverTails' fourteen harm labels -> taxonomy ids (None: no counterpart, dropped).
BEAVERTAILS_NAMES: dict[str, str | None] = {
    "animal_abuse": "violence",
    "child_abuse": "violence",
    "controversial_topics,politics": None,
    "discrimination,stereotype,injustice": "discrimination",
    "drug_abuse,weapons,banned_substance": "drugs",
    "financial_crime,property_crime,theft": "financial_crime",
    "hate_speech,offensive_language": "discrimination",
    "misinformation_regarding_ethics,laws_and_safety": "other",
    "non_violent_unethical_behavior": "other",
    "privacy_violation": "privacy",
    "self_harm": "self_harm",
    "sexually_explicit,adult_content": "sexual",
    "terrorism,organized_crime": "violence",
    "violence,aiding_and_abetting,incitement": "violence",
}

SAFE_SPEC = "safe"  # CoSAlign-Test's name of the config that allows nothing


def name_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_COSA_BY_KEY = {name_key(k): v for k, v in COSA_NAMES.items()}
_BT_BY_KEY = {name_key(k): v for k, v in BEAVERTAILS_NAMES.items()}


def cosa_category(name: str) -> str:
    """One CoSAlign category name (any spelling) -> taxonomy id; KeyError if unknown."""
    try:
        return _COSA_BY_KEY[name_key(name)]
    except KeyError:
        raise KeyError(f"unknown CoSAlign category {name!r}") from None


def beavertails_categories(labels: dict[str, bool] | list[str]) -> list[str]:
    """BeaverTails ``category`` (a name -> bool map, or a list of names) -> sorted unique ids."""
    names = [k for k, v in labels.items() if v] if isinstance(labels, dict) else list(labels)
    out = set()
    for n in names:
        key = name_key(n)
        if key in _BT_BY_KEY:
            if _BT_BY_KEY[key]:
                out.add(_BT_BY_KEY[key])
        else:
            out.add(cosa_category(n))
    return sorted(out)


def parse_spec(spec: str) -> tuple[str, ...]:
    """A CoSAlign-Test ``test spec`` -> allowed taxonomy ids, in spec order.

    Tokens are joined by '.', and the drugs name contains a '.' itself, so the spec is read
    left to right by matching whole known names rather than by splitting on dots."""
    spec = spec.strip()
    if spec.lower() == SAFE_SPEC:
        return ()
    names = sorted(COSA_NAMES, key=len, reverse=True)
    out: list[str] = []
    pos = 0
    while pos < len(spec):
        for name in names:
            end = pos + len(name)
            if spec.startswith(name, pos) and (end == len(spec) or spec[end] == "."):
                if COSA_NAMES[name] not in out:
                    out.append(COSA_NAMES[name])
                pos = end + 1
                break
        else:
            raise ValueError(f"unknown category at {spec[pos:]!r} in spec {spec!r}")
    return tuple(out)
