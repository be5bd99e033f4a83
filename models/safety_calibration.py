"""Metrics and operating points of a fitted safety head: AUROC, the server's rule replayed on
held-out conversations (prompt verdict, or tau consecutive unsafe response positions),
thresholds calibrated to a benign false-positive budget, and the fold of the prompt verdict's
own operating point into the head (``finish_head``).
"""

from __future__ import annotations

import random
import warnings

import torch

from safeserve.kernels.safety_head import head_logits, offset_prompt_rows
from safeserve.models.checkpoint import SafetyHead, load_safety_head
from safeserve.models.decision_defaults import (
    HEAD_DEFAULT_TAU,
    OPERATING_POINT,
    prompt_logit_offset,
)
from safeserve.models.safety_data import MASK_PROMPT, MASK_RESPONSE
from safeserve.models.safety_features import Features
from safeserve.models.safety_head_fit import HeadFit, prompt_end_direction, scores_of
from safeserve.models.taxonomy import Category, Taxonomy


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties averaged); None without both classes."""
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    s, idx = scores.double().sort()
    _, inv, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(s)
    ranks[idx] = avg[inv]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def flag_trajectories(scores: torch.Tensor, feats: Features, thresholds: torch.Tensor,
                      tau: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Server rule per trajectory: (prompt verdict unsafe, tau consecutive unsafe responses)."""
    viol = (scores >= thresholds).any(1)
    n = len(feats.meta)
    p_flag = torch.zeros(n, dtype=torch.bool)
    r_flag = torch.zeros(n, dtype=torch.bool)
    run = 0
    last = -1
    for v, k, t in zip(viol.tolist(), feats.kind.tolist(), feats.traj.tolist()):
        if t != last:
            run, last = 0, t
        if k == MASK_PROMPT:
            p_flag[t] = v
        else:
            run = run + 1 if v else 0
            if run >= tau:
                r_flag[t] = True
    return p_flag, r_flag


def _rate(mask: torch.Tensor, sel: torch.Tensor) -> dict:
    n = int(sel.sum())
    return {"rate": (float(mask[sel].float().mean()) if n else None), "n": n}


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def _run_max(scores: torch.Tensor, feats: Features, tau: int) -> torch.Tensor:
    """Per conversation and output: the largest score held by tau consecutive response
    positions (0 without enough response tokens). Output k alone flags the response part of a
    conversation at threshold t iff this value is >= t."""
    out = torch.zeros(len(feats.meta), scores.shape[1])
    resp = feats.kind == MASK_RESPONSE
    for t in torch.unique(feats.traj).tolist():
        r = scores[(feats.traj == t) & resp]
        if r.shape[0] >= tau:
            out[t] = r.unfold(0, tau, 1).min(dim=2).values.max(0).values
    return out


def _prompt_scores(scores: torch.Tensor, feats: Features) -> torch.Tensor:
    out = torch.zeros(len(feats.meta), scores.shape[1])
    sel = feats.kind == MASK_PROMPT
    out[feats.traj[sel]] = scores[sel]
    return out


def calibrate(logits: torch.Tensor, feats: Features, tau: int, target_fpr: float,
              overall_share: float = 0.5, prompt_share: float = 0.4
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Separate prompt and response thresholds per output from benign conversations.

    The benign false-positive budget ``target_fpr`` is split between the prompt verdict
    (``prompt_share``) and the response rule, and between the overall output
    (``overall_share``) and the categories (the rest, evenly). Each output's prompt threshold
    is the matching upper quantile of benign prompt-end scores, its response threshold that of
    the benign conversations' tau-run maxima. Budgets shrink until the combined rule (any
    output) stays within ``target_fpr`` on these conversations.
    Returns (prompt thresholds, response thresholds, budget scale used).
    """
    scores = torch.sigmoid(logits)
    benign = torch.tensor([m["benign"] for m in feats.meta])
    k = scores.shape[1]
    ps, rm = _prompt_scores(scores, feats)[benign], _run_max(scores, feats, tau)[benign]
    share = torch.full((k,), (1 - overall_share) / max(k - 1, 1))
    share[-1] = overall_share

    def thresholds(ref: torch.Tensor, budget: float) -> torch.Tensor:
        """Just above the (m+1)-th largest benign value, m = floor(budget * share * n): at
        most m benign conversations reach it (an interpolated quantile would let the top
        one through at any budget)."""
        if ref.shape[0] == 0:
            return torch.full((k,), 0.5)
        top = ref.sort(0, descending=True).values
        m = [min(int(budget * float(share[j]) * ref.shape[0]), ref.shape[0] - 1)
             for j in range(k)]
        q = torch.stack([top[m[j], j] for j in range(k)])
        return (q + 1e-6).clamp(0.01, 0.9999)

    # Prompt and response budgets shrink separately, each until its own part of the rule
    # stays within its share of the target on these conversations.
    sp = sr = 1.0
    for _ in range(20):
        thr_p = thresholds(ps, target_fpr * prompt_share * sp)
        thr_r = thresholds(rm, target_fpr * (1 - prompt_share) * sr)
        p_flag, r_flag = flag_trajectories_split(scores, feats, thr_p, thr_r, tau)
        p_rate = float(p_flag[benign].float().mean()) if ps.shape[0] else 0.0
        r_rate = float(r_flag[benign].float().mean()) if ps.shape[0] else 0.0
        ok_p = p_rate <= target_fpr * prompt_share + 1e-9
        ok_r = r_rate <= target_fpr * (1 - prompt_share) + 1e-9
        if ok_p and ok_r:
            break
        sp, sr = sp * (1 if ok_p else 0.7), sr * (1 if ok_r else 0.7)
    else:
        # Thresholds capped at 0.9999 (or ties at the top) can keep the rule over budget:
        # say so rather than return a head that silently misses its target.
        warnings.warn(f"calibration missed its target: benign flagged {p_rate:.3f} at the "
                      f"prompt, {r_rate:.3f} in responses, for a target of {target_fpr} "
                      f"({prompt_share:.0%} / {1 - prompt_share:.0%})", stacklevel=2)
    return thr_p, thr_r, min(sp, sr)


def flag_trajectories_split(scores: torch.Tensor, feats: Features, thr_p: torch.Tensor,
                            thr_r: torch.Tensor, tau: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The server rule with separate prompt / response thresholds (before folding)."""
    thr = torch.where((feats.kind == MASK_PROMPT)[:, None], thr_p[None, :], thr_r[None, :])
    return flag_trajectories(scores, feats, thr, tau)


def evaluate(scores: torch.Tensor, feats: Features, thresholds: torch.Tensor, names: list[str],
             tau: int) -> dict:
    """Held-out metrics: AUROC and accuracy per output at prompt and token level, and the
    server-rule detection and false-positive rates per conversation."""
    hit = scores >= thresholds
    out: dict = {"prompt_level": {}, "token_level": {}}
    for level, k in (("prompt_level", MASK_PROMPT), ("token_level", MASK_RESPONSE)):
        sel = feats.kind == k
        for j, name in enumerate(names):
            y = feats.labels[sel, j]
            out[level][name] = {
                "auroc": auroc(scores[sel, j], y),
                "accuracy": float((hit[sel, j] == (y > 0.5)).float().mean()) if sel.any() else None,
                "positives": int(y.sum()), "n": int(sel.sum())}
    p, r = flag_trajectories(scores, feats, thresholds, tau)
    m = feats.meta
    t = lambda key: torch.tensor([bool(x[key]) for x in m])  # noqa: E731
    benign, hard = t("benign"), t("hard_negative")
    prompt_unsafe, resp_unsafe = t("prompt_unsafe"), t("response_unsafe")
    prefill = torch.tensor(["/prefill" in x["source"] for x in m])
    out["conversation_level"] = {
        "harmful_prompt_flagged_at_prompt": _rate(p, prompt_unsafe),
        "harmful_prompt_flagged_any": _rate(p | r, prompt_unsafe),
        "unsafe_response_flagged_by_response": _rate(r, resp_unsafe),
        "prefill_attack_flagged_by_response": _rate(r, resp_unsafe & prefill),
        "benign_flagged_any (false positive)": _rate(p | r, benign),
        "benign_flagged_at_prompt": _rate(p, benign),
        "hard_negative_flagged_any (false positive)": _rate(p | r, hard),
        "hard_negative_flagged_at_prompt": _rate(p, hard),
    }
    by_src: dict[str, dict] = {}
    for i, x in enumerate(m):
        s = by_src.setdefault(x["source"].split("/")[0], {"n": 0, "flagged": 0})
        s["n"] += 1
        s["flagged"] += int(p[i] | r[i])
    out["flag_rate_by_source"] = {k: round(v["flagged"] / v["n"], 4) for k, v in by_src.items()}
    return out


def external_prompt_metrics(scores: torch.Tensor, feats: Features,
                            thresholds: torch.Tensor) -> dict:
    """Prompt verdict on prompt-only rows, per source and label (never used for any choice)."""
    sel = feats.kind == MASK_PROMPT
    s, trajs = scores[sel], feats.traj[sel]
    flag = (s >= thresholds).any(1)
    keys = [f"{feats.meta[int(t)]['source']}/"
            f"{'unsafe' if feats.meta[int(t)]['prompt_unsafe'] else 'safe'}" for t in trajs]
    out = {}
    for key in sorted(set(keys)):
        m = torch.tensor([k == key for k in keys])
        out[key] = {"n": int(m.sum()), "flagged_rate": float(flag[m].float().mean())}
    y = torch.tensor([feats.meta[int(t)]["prompt_unsafe"] for t in trajs]).float()
    out["all_auroc_overall"] = auroc(s[:, -1], y)
    return out


def head_external_metrics(head: SafetyHead, ex: Features) -> dict:
    """``external_prompt_metrics`` of a finished head at its served thresholds, its prompt
    offset (``operating_point.prompt_logit_offset``, kept from an --init-head) applied as
    the server applies it."""
    scores = offset_prompt_rows(scores_of(ex.hidden[head.layer], head.weight, head.bias,
                                          mlp=head.mlp),
                                ex.kind == MASK_PROMPT, prompt_logit_offset(head.extra))
    return external_prompt_metrics(
        scores, ex, torch.tensor([c.threshold for c in head.taxonomy.categories] + [0.5]))


def split_groups(meta: list[dict], fraction: float, seed: int) -> tuple[set[int], set[int]]:
    groups = sorted({m["group"] for m in meta})
    random.Random(seed).shuffle(groups)
    # each side gets a group when there are two (a half without one has nothing to measure)
    n = int(round(len(groups) * fraction))
    pick = set(groups[: min(max(n, 1), len(groups) - 1) if len(groups) >= 2 else n])
    a = {i for i, m in enumerate(meta) if m["group"] in pick}
    return a, set(range(len(meta))) - a


def with_thresholds(taxonomy: Taxonomy, thresholds: list[float]) -> Taxonomy:
    """The taxonomy with new thresholds, unrounded: they sit near 1, where 6 decimals would
    move a moved operating point by a third of a logit (and 4 by half a logit). A threshold
    that is not inside (0, 1) in float32, as the decision compares it, is an error naming the
    category: it could never fire (1) or always would (0)."""
    import numpy as np

    for c, t in zip(taxonomy.categories, thresholds):
        if not 0.0 < float(np.float32(t)) < 1.0:
            raise ValueError(f"the threshold of {c.id} would be {float(t)!r}, which is "
                             f"{float(np.float32(t))!r} in float32: outside (0, 1), so the "
                             "decision could never (or would always) act on it")
    return Taxonomy(tuple(Category(c.id, c.definition, float(t))
                          for c, t in zip(taxonomy.categories, thresholds)))


def finish_head(weight: torch.Tensor, bias: torch.Tensor, eval_feats: Features,
                taxonomy: Taxonomy, args: dict, layer: int, log=print,
                mlp=None) -> tuple[SafetyHead, dict]:
    """Calibrate on half the held-out groups, report on the other half, build the head.

    The prompt verdict and the response rule get separate operating points (prompt
    thresholds t_p, response thresholds t_r; see ``calibrate``). The server has one threshold
    per output, so the difference is folded into the head along the prompt-end read-out
    (v, c): logit' = logit + delta * (v.h + c) with delta = logit(t_r) - logit(t_p), which adds
    delta at prompt ends and ~0 on response tokens; t_r is then the served threshold. The
    overall output's threshold is folded into its bias (it fires at 0.5). All reported
    thresholded rates come from the final head under the server rule.
    """
    names = list(taxonomy.output_names)
    cal_ids, test_ids = split_groups(eval_feats.meta, 0.5, args.get("seed", 0))
    if not cal_ids or not test_ids:  # the callers check this before the model loads
        n = len({m["group"] for m in eval_feats.meta})
        raise ValueError(f"the held-out set has {n} prompt group(s): calibration and the "
                         "report need at least two")
    cal, test = eval_feats.subset(cal_ids), eval_feats.subset(test_ids)
    hc = cal.hidden[layer]
    logits_cal = torch.cat([head_logits(hc[i:i + 65536], weight, bias, mlp)
                            for i in range(0, hc.shape[0], 65536)])
    thr_p, thr_r, scale = calibrate(logits_cal, cal, args["tau"], args["target_fpr"])
    weight, bias = weight.clone(), bias.clone()
    v, c = prompt_end_direction(hc, cal.kind)
    ind = hc.float() @ v + c
    delta = _logit(thr_r) - _logit(thr_p)
    if args.get("prompt_offset", True):
        weight += delta[:, None] * v[None, :]
        bias += delta * c
    thr = thr_r.clone()
    shift = float(_logit(thr[-1]))
    bias[-1] -= shift
    thr[-1] = 0.5
    # The fold and the overall shift are linear in the logits, so they land in the linear
    # part whether or not the head has the residual MLP.
    tau = args["tau"]
    # The tau these thresholds were calibrated for goes with them: the server reads it from
    # the operating point (without one it would use its default, and the budget would not hold).
    head = SafetyHead(weight, bias, with_thresholds(taxonomy, thr[:-1].tolist()), layer=layer,
                      mlp=mlp, extra={OPERATING_POINT: {"tau": int(tau)}})
    metrics = {
        # AUROC is threshold-free: the whole held-out set; thresholded rates: the test half.
        "auroc_all_heldout": evaluate(scores_of(eval_feats.hidden[layer], head.weight,
                                                head.bias, mlp=mlp), eval_feats, thr, names, tau),
        "thresholded_on_test_half": evaluate(scores_of(test.hidden[layer], head.weight,
                                                       head.bias, mlp=mlp), test, thr, names, tau),
        "thresholded_on_calibration_half": evaluate(scores_of(hc, head.weight, head.bias,
                                                              mlp=mlp), cal,
                                                    thr, names, tau)["conversation_level"],
        "calibration": {
            "target_fpr": args["target_fpr"], "tau": tau, "budget_scale": scale,
            "prompt_thresholds": dict(zip(names, thr_p.tolist())),
            "response_thresholds": dict(zip(names, thr_r.tolist())),
            "prompt_offset_logits": dict(zip(names, delta.tolist())),
            "prompt_end_readout": {
                "at_prompt_end_mean": float(ind[cal.kind == MASK_PROMPT].mean()),
                "at_response_mean": float(ind[cal.kind == MASK_RESPONSE].mean()),
                "at_response_std": float(ind[cal.kind == MASK_RESPONSE].std())},
            "overall_bias_shift": shift,
            "served_thresholds": dict(zip(names, thr.tolist())),
            "calibration_conversations": len(cal.meta),
            "test_conversations": len(test.meta)},
    }
    return head, metrics


def keep_init_operating_point(init_head, fit: HeadFit, heldout: Features,
                              args: dict) -> tuple[SafetyHead, dict]:
    """``--keep-thresholds``: the init head's linear part, thresholds, fold and operating point
    (its exact prompt offset included) as they were, plus the fitted (gated) MLP. With the gate closed at prompt ends the prompt verdict is the
    init head's; the response rule reads the new scores at the old thresholds (move them with
    ``train operating-point``). Metrics are measured at that point, nothing is calibrated."""
    init = load_safety_head(init_head)
    point = {k: v for k, v in init.extra.items() if k == OPERATING_POINT}
    head = SafetyHead(init.weight, init.bias, init.taxonomy, init.layer, extra=point,
                      mlp=fit.mlp)
    thr = torch.tensor([c.threshold for c in init.taxonomy.categories] + [0.5])
    names = list(init.taxonomy.output_names)
    h = heldout.hidden[init.layer]
    scores = offset_prompt_rows(scores_of(h, head.weight, head.bias, mlp=head.mlp),
                                heldout.kind == MASK_PROMPT, prompt_logit_offset(init.extra))
    # Measured at the rule the init head is served with: its own tau (the alert band, which
    # needs per-conversation prompt verdicts, is not replayed here).
    tau = int((point.get(OPERATING_POINT) or {}).get("tau", HEAD_DEFAULT_TAU))
    measured = evaluate(scores, heldout, thr, names, tau)
    # Nothing is calibrated here, but the init head's thresholds may have been calibrated on
    # these same held-out files: the rates are reported as "all held-out", not as a test half.
    metrics = {"auroc_all_heldout": measured, "thresholded_on_all_heldout": measured,
               "calibration": {"kept_operating_point_of": str(init_head), "tau": tau,
                               "alert_band_applied": False,
                               "served_thresholds": dict(zip(names, thr.tolist()))}}
    return head, metrics
