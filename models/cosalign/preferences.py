"""CoSAlign's error score and the preference pairs built from it.

For a response to a prompt under a config that allows ``allowed``:

    error = alpha * |present & allowed| + beta * |present - allowed| + gamma * [not addressed]

A small alpha keeps allowed risk from being free (of two otherwise equal answers the less
risky wins); a large beta makes any disallowed risk worse than refusing (gamma).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

ALPHA, BETA, GAMMA = 0.1, 3.0, 1.0


@dataclass(frozen=True)
class Weights:
    alpha: float = ALPHA
    beta: float = BETA
    gamma: float = GAMMA


def check_weights(w: Weights, num_categories: int) -> None:
    """Any disallowed risk must cost more than the worst answer without one (every category
    allowed and present, not addressed: alpha * num_categories + gamma); otherwise such an
    answer reaches the "chosen is unsafe" bar (beta) and loses its pairs, or ties an unsafe
    one. With beta <= gamma every refusal reaches it and the safe config gets no pairs."""
    worst = w.alpha * num_categories + w.gamma
    if not worst < w.beta:
        raise ValueError(f"--beta ({w.beta}) must be greater than --gamma ({w.gamma}) plus --alpha "
                         f"({w.alpha}) x {num_categories} categories = {worst:g}")


def error_score(present, allowed, addressed: bool, w: Weights = Weights()) -> float:
    present, allowed = set(present), set(allowed)
    return (w.alpha * len(present & allowed) + w.beta * len(present - allowed)
            + (0.0 if addressed else w.gamma))


@dataclass(frozen=True)
class Candidate:
    text: str
    score: float


def preference_pairs(candidates: list[Candidate], beta: float = BETA,
                     max_pairs: int = 0) -> list[tuple[Candidate, Candidate]]:
    """(chosen, rejected) pairs among one prompt-config's candidates: the lower error is
    chosen; equal scores carry no preference and are skipped, and so is any pair whose
    chosen response still has a disallowed risk (score >= beta) - both sides are bad.
    Widest gaps come first; ``max_pairs`` > 0 keeps that many."""
    pairs = []
    for a, b in itertools.combinations(candidates, 2):
        if a.score == b.score or a.text.strip() == b.text.strip():
            continue
        chosen, rejected = (a, b) if a.score < b.score else (b, a)
        if chosen.score >= beta:
            continue
        pairs.append((chosen, rejected))
    pairs.sort(key=lambda p: p[1].score - p[0].score, reverse=True)
    return pairs[:max_pairs] if max_pairs > 0 else pairs


def sft_target(pairs: list[tuple[Candidate, Candidate]]) -> Candidate | None:
    """The SFT target of a prompt-config: the lowest-error chosen response of its pairs
    (a prompt-config without pairs teaches nothing and has none)."""
    return min((c for c, _ in pairs), key=lambda c: c.score) if pairs else None
