"""Category names of public safety datasets, mapped onto our taxonomy ids: CoSAlign's and
BeaverTails' names, HarmBench's semantic categories, and a documented keyword heuristic for
sources that have no usable category. Training data (safety head, CoSAlign prompts) and the
CoSA evaluation all label through this one module, so their labels cannot drift apart.

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


# ----------------------------------------------------------------------------- harmful sources

# Source category -> taxonomy ids. None means "decide by keywords" (categorise_text), which also
# runs for sources without categories. HarmBench's chemical_biological is mostly chemical and
# biological weapons (weapons), but its drug-synthesis behaviours get 'drugs' from keywords;
# cybercrime_intrusion is intrusion and malware, which our taxonomy files under financial_crime;
# harassment_bullying is targeted abuse (discrimination); misinformation falls under 'other'.
# Copyright behaviours (song lyrics, book passages) are no harm category here: skipped.
SOURCE_CATEGORY_MAP: dict[str, list[str] | None] = {
    "chemical_biological": ["weapons"],
    "cybercrime_intrusion": ["financial_crime"],
    "harassment_bullying": ["discrimination"],
    "misinformation_disinformation": ["other"],
    "illegal": None,
    "harmful": None,
    # CoSAlign (BeaverTails) config names, used for the external evaluation prompts.
    **{name: [tid] for name, tid in COSA_NAMES.items() if tid != "other"},
}
SKIPPED_SOURCE_CATEGORIES = {"copyright"}
# Copyright-style requests in uncategorised sources (HarmBench's adversarial-training set has
# some): skipped like HarmBench's copyright category.
_COPYRIGHT_RE = re.compile(r"\b(lyrics|long passage from|full script of|entire contents of|"
                           r"final chapter of|chapter \d+ of)\b", re.I)

# Keyword cues per category (word-start regexes over the lowercased prompt). A heuristic for
# sources without categories; a prompt matching none gets 'other'.
_KEYWORDS: dict[str, str] = {
    "violence": r"kill|murder|assault|attack|tortur|kidnap|terror|shoot|stab|hurt|beat (up|some)|"
                r"massacre|genocid|violen|assassin|hostage|lynch|poison(ing)? (a |some|my|her|his)|"
                r"corpse|flay|beats? (their|his|her)|fight club|booby|fall down the stairs|"
                r"child soldier|children in military|caus(e|ing) (an )?accident|strangl",
    "weapons": r"weapon|gun|firearm|rifle|pistol|ammunition|explosive|bomb|grenade|detonat|napalm|"
               r"nerve agent|sarin|anthrax|bioweapon|chemical warfare|nuclear|uranium|ricin|"
               r"pathogen|mustard gas|molotov|arson|incendiar|glock|full auto|booby trap|"
               r"military hardware|dna sequences",
    "drugs": r"drug|cocaine|heroin|meth|fentanyl|mdma|lsd|opioid|narcotic|marijuana|cannabis|crack "
             r"cocaine|controlled substance|dmt|ketamine|safrole|precursor|steroid|inhalant|"
             r"hallucinogen|get high|psychoactive|underage drinking",
    "financial_crime": r"fraud|scam|phish|launder|counterfeit|steal|stole|theft|embezzl|tax evasion|"
                       r"evade tax|insider trading|ponzi|credit card|identity theft|hack|malware|"
                       r"ransomware|virus|exploit|ddos|botnet|keylogger|password|extort|blackmail|"
                       r"bribe|shoplift|rob |robbing|forg|sql injection|cheat (the|on (a|an|the) "
                       r"(test|exam))|tax|defraud|siphon|burglar|hijack|torrent|pirat|"
                       r"stock prices|offshore accounts|black market|invoic|donations|trojan|skimm|"
                       r"atm ",
    "privacy": r"personal (information|data|details)|private information|dox|stalk|spy on|"
               r"surveil|home address|social security|track (someone|a person|their|my)|"
               r"location of|without (their |his |her )?(consent|knowledge)|hidden camera|"
               r"facial recognition|de-?anonym|phone number|email address|wiretap|"
               r"medical records|intercept|impersonat|confidential information",
    "discrimination": r"racis|sexis|hate|slur|discriminat|inferior|harass|bully|insult|demean|"
                      r"homophob|transphob|antisemit|islamophob|xenophob|ethnic|minorit|"
                      r"immigrant|derogatory|offensive (joke|message)|bull(y|ies|ied|ying)|"
                      r"harrass|queer|lgbt|disabilit|racial|smear|defam|rumou?rs|women being|"
                      r"men being|inherently less",
    "sexual": r"sex|porn|explicit|nude|erotic|prostitut|escort|rape|molest|grooming|"
              r"affair|cheat on (my|your|his|her)",
    "self_harm": r"suicid|self-harm|self harm|cut myself|kill myself|eating disorder|anorexi|"
                 r"bulimi|starv|overdose|hurt myself",
}
_KEYWORD_RES = {c: re.compile(r"\b(" + p + ")") for c, p in _KEYWORDS.items()}


def categorise_text(text: str, max_categories: int = 2) -> list[str]:
    """Keyword categories, most matches first; ['other'] when none match."""
    low = text.lower()
    hits = [(len(rx.findall(low)), c) for c, rx in _KEYWORD_RES.items()]
    hits = sorted([h for h in hits if h[0] > 0], key=lambda h: -h[0])
    return [c for _, c in hits[:max_categories]] or ["other"]


def map_categories(source_category: str | None, text: str) -> list[str] | None:
    """Taxonomy ids for a source category (None = skip this prompt)."""
    if source_category in SKIPPED_SOURCE_CATEGORIES or _COPYRIGHT_RE.search(text):
        return None
    mapped = SOURCE_CATEGORY_MAP.get(source_category or "")
    if mapped is None:
        return categorise_text(text)
    kw = categorise_text(text)
    if mapped == ["weapons"] and "drugs" in kw:
        return ["drugs"]  # chemical_biological drug-synthesis behaviours
    return list(mapped)
