"""A separate linear read-out for the prompt verdict (``safeserve train prompt-head``).

The served head computes the prompt verdict and the per-token response rule from the same
linear part (the response rule adds a gated MLP); its training mixes prompt ends with every
response token, so the prompt verdict is a compromise. An offline comparison on the embedded
model (2026-12-04; README, "a separate prompt read-out") found a read-out trained on prompt ends
alone, class-balanced, with the harmful and benign requests also wrapped in this project's
rephrasings and payload splits, flagging 95% of the direct evaluation requests and 43% of the
split-variable jailbreaks at 4.4% of XSTest's safe prompts, where the served head flags no split
request at all. This job fits that read-out for an existing head and stores it beside the
head's own weights (checkpoint format 4): the server reads prompt rows through it and every
generated token through the head as before, so the response rule is unchanged to the bit.
Served over the default head it traded rather than improved (docs/history/safety-head.md, "a separate prompt
read-out": fewer payload-split jailbreaks through, more direct ones and more over-refusal), so
the default head does not carry one.

Data: prompts only (no generation), from the data root's training sources with every
evaluation set's prompts removed (``safety_data_build``): harmful requests (refusal-direction
train/val, HarmBench val and adversarial-training behaviours, TDC 2023) each as written, in one
rephrasing and in one payload split; Alpaca instructions as written, rephrased and split;
GPTeacher role-play and the written hard negatives. A fifth of the prompt groups is held out:
it sets the thresholds (``--target-fpr`` of held-out benign prompts flagged, any output) and is
reported. The thresholds are folded into the read-out's biases relative to the head's served
thresholds and prompt offset, so the server's rule is unchanged.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class PromptRow:
    text: str
    harmful: bool
    categories: list[str]
    group: str


def build_prompt_rows(root: Path, seed: int = 0, n_alpaca: int = 600, n_wrapped: int = 200,
                      n_roleplay: int = 250, questions: bool = False,
                      wildguard: bool = False, heldout_questions: bool = False,
                      warn=print) -> list[PromptRow]:
    """Training prompts with the leakage rules of ``build_safety_data``: no evaluation set's
    prompt (normalised) in any source; a hard-negative entry dropped whole when one of its
    wordings is one, and only the training groups of ``build-hard-negatives``' split; harmful
    prompts de-duplicated (the sources overlap); contextual HarmBench
    behaviours (a pasted context) kept as written, not wrapped. ``questions``: also the
    project-labelled conversational questions (``question_data``: HH first turns, harmful and
    harmless, none a near copy of an evaluation prompt), as written, only those of
    ``build-question-data``'s training groups unless ``heldout_questions`` (how the bundled
    read-outs up to the default head v17 were fitted). ``wildguard``: also the
    project-labelled WildGuardMix prompts (``question_data.labelled_wildguard_prompts``).
    ``seed`` draws the wordings and samples; both held-out splits are fixed (seed 0, the
    data builders' defaults), whatever it is."""
    from safeserve.models.augment import split_wrap
    from safeserve.models.hard_negatives import hard_negative_prompts, split_hard_negatives
    from safeserve.models.safety_data_sources import (normalise, read_benign_sources,
                                                      read_eval_keys, read_harmful_sources)
    from safeserve.models.safety_data_texts import PHRASINGS, rephrase

    if not Path(root).is_dir():
        raise FileNotFoundError(f"--data-root {root} is not a directory")
    rng = random.Random(seed)
    eval_keys = read_eval_keys(root, warn)
    if not eval_keys:
        raise ValueError(f"no evaluation set found under {root}: leakage cannot be checked")
    keys = set().union(*eval_keys.values())
    kinds = sorted(PHRASINGS)
    rows: list[PromptRow] = []
    seen: set[str] = set()
    for p in read_harmful_sources(root, warn):
        key = normalise(p.text)
        if key in keys or key in seen:
            continue
        seen.add(key)
        group = f"harm:{len(seen)}"
        texts = [p.text] if "\n---\n" in p.text else [
            p.text, rephrase(p.text, rng.choice(kinds), rng), split_wrap(p.text, rng)[0]]
        rows += [PromptRow(t, True, list(p.categories), group) for t in texts]
    if not rows:
        raise ValueError(f"no harmful training prompts under {root}")
    benign = read_benign_sources(root, warn)
    alpaca = [t for t in benign["alpaca"] if normalise(t) not in keys and 0 < len(t) < 300]
    rng.shuffle(alpaca)
    for i, t in enumerate(alpaca[:n_alpaca]):
        rows.append(PromptRow(t, False, [], f"alpaca:{i}"))
    for i, t in enumerate(alpaca[n_alpaca:n_alpaca + n_wrapped]):
        group = f"alpaca_wrapped:{i}"
        rows.append(PromptRow(rephrase(t, rng.choice(kinds), rng), False, [], group))
        rows.append(PromptRow(split_wrap(t, rng)[0], False, [], group))
    roleplay = [t for t in benign["gpteacher_roleplay"]
                if 0 < len(t) < 600 and normalise(t) not in keys]
    rng.shuffle(roleplay)
    for i, t in enumerate(roleplay[:n_roleplay]):
        rows.append(PromptRow(t, False, [], f"roleplay:{i}"))
    # Only build-hard-negatives' training groups (its default split, seed 0): its held-out
    # groups are the safety job's calibration data and `eval allow-benign`'s hard negatives.
    negatives, _, _ = split_hard_negatives(hard_negative_prompts(0), keys, seed=0)
    rows += [PromptRow(h.prompt, False, [], f"hn:{h.group}") for h in negatives]
    labelled: set[str] = set()
    if questions:
        from safeserve.models.question_data import (labelled_questions, prompt_key,
                                                    question_group, question_split)

        found = labelled_questions(root, log=warn)[0]
        # build-question-data's held-out groups are its held-out file (calibration data,
        # the development question rows): left out like the hard negatives' ones.
        held = set() if heldout_questions else question_split(found)[1]
        for text, label, cats in found:
            if normalise(text) not in keys:
                labelled.add(prompt_key(text))
                if question_group(text) not in held:
                    rows.append(PromptRow(text, label == "unsafe", cats,
                                          f"hhq:{prompt_key(text)}"))
    if wildguard:
        from safeserve.models.question_data import labelled_wildguard_prompts, prompt_key

        # A text in both label files keeps its HH label: one group, one side of the split.
        for text, label, cats in labelled_wildguard_prompts(root, log=warn)[0]:
            if normalise(text) not in keys and prompt_key(text) not in labelled:
                rows.append(PromptRow(text, label == "unsafe", cats, f"wgq:{prompt_key(text)}"))
    return rows


def prompt_end_features(model, tok, texts: list[str], log=print, layer: int | None = None,
                        batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The final hidden state at the end of each prompt as the server renders it, and with
    ``layer`` the residual stream there after that many decoder layers. Prompts of similar
    length go through together, right-padded (causal attention: a real position never sees
    the padding after it)."""
    from tqdm import tqdm

    from safeserve.models.head_check import render_prompt
    from safeserve.models.safety_features import backbone

    rows = [render_prompt(tok, text) for text in texts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    width = model.config.hidden_size
    final = torch.zeros(len(rows), width)
    middle = torch.zeros(len(rows), width) if layer is not None else None
    device = next(model.parameters()).device
    with torch.no_grad(), tqdm(total=len(rows), desc="prompt ends", mininterval=10) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            longest = max(len(rows[i]) for i in batch)
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            mask = torch.zeros(len(batch), longest, dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, :len(rows[i])] = torch.tensor(rows[i])
                mask[r, :len(rows[i])] = 1
            res = backbone(model)(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  output_hidden_states=layer is not None)
            at = (torch.arange(len(batch)), torch.tensor([len(rows[i]) - 1 for i in batch]))
            final[batch] = res.last_hidden_state.float().cpu()[at]
            if layer is not None:
                middle[batch] = res.hidden_states[layer].float().cpu()[at]
            bar.update(len(batch))
    return final, middle


def fit_readout(x: torch.Tensor, y: torch.Tensor, weight_decay: float = 1e-3,
                max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-label logistic read-out [K, H], [K]: standardised inputs, each output's classes
    weighted equally, L-BFGS; the standardisation is folded into the returned weights."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xn = (x - mu) / sd
    k = y.shape[1]
    w = torch.zeros(k, x.shape[1], requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    pos = y.float().mean(0).clamp(1e-3, 1 - 1e-3)
    weight = torch.where(y == 1, 0.5 / pos, 0.5 / (1 - pos))
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            xn @ w.T + b, y.float(), weight=weight) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return w / sd, b - (w / sd) @ mu


def union_thresholds(benign_logits: torch.Tensor, target_fpr: float,
                     already: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output thresholds at one common benign quantile, chosen so that at most
    ``target_fpr`` of the benign rows have any output at or over its threshold (the decision
    flags ``score >= threshold``) or are ``already`` flagged ([N] bool: by the head's own
    verdict, when the read-out is added to it). Each threshold sits just above a benign
    score, never on one, so the rows the rate counts are the rows the server flags."""
    base = (torch.zeros(benign_logits.shape[0], dtype=torch.bool) if already is None
            else already.to(torch.bool))
    def at(q: float) -> torch.Tensor:
        thr = torch.quantile(benign_logits, 1 - q, dim=0)
        return torch.nextafter(thr, torch.full_like(thr, float("inf")))

    def rate(thr: torch.Tensor) -> float:
        return ((benign_logits >= thr).any(1) | base).float().mean().item()

    lo, hi = 0.0, target_fpr
    for _ in range(40):
        q = (lo + hi) / 2
        lo, hi = (q, hi) if rate(at(q)) <= target_fpr else (lo, q)
    return at(lo)


def fold_thresholds(bias: torch.Tensor, thresholds: torch.Tensor, served: torch.Tensor,
                    prompt_offset: float) -> torch.Tensor:
    """Biases under which the server's rule for output k at a prompt row, sigmoid(z_k +
    offset) >= t_k (``served`` t), holds exactly when the unfolded logit reaches
    ``thresholds`` k."""
    return bias - thresholds + torch.log(served / (1 - served)) - prompt_offset


def train_prompt_head(head_dir: Path, out: Path, data_root: Path, model_dir: Path | None = None,
                      target_fpr: float = 0.05, seed: int = 0, either: bool = False,
                      questions: bool = False, layer: int | None = None,
                      heldout_questions: bool = False, log=print) -> dict:
    """Fit the read-out for the head in ``head_dir`` and write ``<out>/safety_head/``.
    ``either``: the read-out is added to the head's own prompt verdict (format 5) and
    ``target_fpr`` bounds the held-out benign prompts that either of them flags. ``layer``:
    the read-out reads the residual stream after that many decoder layers instead of the
    final state (format 6)."""
    from safeserve.kernels.safety_head import head_logits
    from safeserve.models.checkpoint import load_safety_head
    from safeserve.models.decision_defaults import (prompt_logit_offset,
                                                    without_no_allowlist_rule)
    from safeserve.models.head_check import served_model_for
    from safeserve.models.safety_features import load_lm

    t0 = time.time()
    head = load_safety_head(head_dir)
    lm_dir = served_model_for(Path(head_dir), model_dir)
    rows = build_prompt_rows(Path(data_root), seed, questions=questions,
                             heldout_questions=heldout_questions, warn=log)
    # a fifth of the harmful prompts' groups and a fifth of the others' held out, so that
    # both kinds are always measured
    harmful = sorted({r.group for r in rows if r.harmful})
    others = sorted({r.group for r in rows} - set(harmful))
    rng = random.Random(seed)
    held = set(rng.sample(harmful, len(harmful) // 5)) | set(rng.sample(others, len(others) // 5))
    tax = head.taxonomy
    y = torch.zeros(len(rows), tax.num_outputs)
    for i, r in enumerate(rows):
        if r.harmful:
            y[i, -1] = 1
            for c in r.categories:
                y[i, tax.index(c)] = 1
    model, tok = load_lm(lm_dir)
    model.eval()
    num_layers = model.config.num_hidden_layers
    if layer is not None and not 1 <= layer < num_layers:
        raise ValueError(f"--layer {layer}: this model has {num_layers} decoder layers "
                         f"(want 1..{num_layers - 1}, or none for the final state)")
    x, mid = prompt_end_features(model, tok, [r.text for r in rows], log, layer)
    feats = x if mid is None else mid  # what the read-out reads
    is_held = torch.tensor([r.group in held for r in rows])
    w, b = fit_readout(feats[~is_held], y[~is_held])
    z = feats[is_held] @ w.T + b
    yh = y[is_held]
    benign = yh[:, -1] == 0
    served = torch.tensor([c.threshold for c in tax.categories]
                          + [float(head.extra.get("overall_threshold", 0.5))])
    offset = prompt_logit_offset(head.extra)
    # The head's own prompt verdict on the same prompts, as the server reads it.
    own = (head_logits(x[is_held], head.weight, head.bias, head.mlp) + offset
           >= torch.log(served / (1 - served))).any(1)
    if either and own[benign].float().mean().item() > target_fpr:
        log(f"note: the head alone flags {own[benign].float().mean().item():.1%} of the "
            f"held-out benign prompts, over --target-fpr {target_fpr}: the read-out's "
            "thresholds go above every held-out benign prompt (it adds no false alarm there)")
    thr = union_thresholds(z[benign], target_fpr, own[benign] if either else None)
    readout_flagged = (z >= thr).any(1)
    flagged = readout_flagged | own if either else readout_flagged
    head.prompt = (w, fold_thresholds(b, thr, served, offset))
    head.prompt_either = either
    if head.veto is not None and head.prompt_layer != layer:
        # the veto reads the rows the kernel reads at a prompt end, which the layer sets
        head.veto = None
        log("note: the head's prompt veto read the old read-out's layer and is dropped; fit "
            "it again with `safeserve train prompt-veto`")
    head.prompt_layer = layer
    head.extra, dropped = without_no_allowlist_rule(head.extra)
    if dropped:
        log("note: the head's prompt rule for requests without an allow-list was chosen for "
            "its old read-out and is dropped; set it again with `safeserve train "
            "operating-point --no-allowlist-prompt-own ... --no-allowlist-readout-shift ...`")
    metrics = {"prompt_head": {
        "combine": "either" if either else "replace", "questions": questions,
        "layer": "final" if layer is None else layer,
        "train_prompts": int((~is_held).sum()), "heldout_prompts": int(is_held.sum()),
        "target_fpr": target_fpr,
        "heldout_benign_flagged": round(flagged[benign].float().mean().item(), 4),
        "heldout_harmful_flagged": round(flagged[~benign].float().mean().item(), 4),
        "heldout_by_head_alone": {
            "benign_flagged": round(own[benign].float().mean().item(), 4),
            "harmful_flagged": round(own[~benign].float().mean().item(), 4)},
        "heldout_by_readout_alone": {
            "benign_flagged": round(readout_flagged[benign].float().mean().item(), 4),
            "harmful_flagged": round(readout_flagged[~benign].float().mean().item(), 4)},
        "heldout_questions": heldout_questions,
        "data_root": str(data_root), "seed": seed, "seconds": round(time.time() - t0)}}
    return write_readout_checkpoint(
        head, head_dir, out, model_dir, lm_dir, "prompt_head", metrics["prompt_head"],
        model, tok, log, note="prompt-verdict metrics above prompt_head were measured with the "
                              "head's own weights, before the prompt read-out")


def write_readout_checkpoint(head, head_dir: Path, out: Path, model_dir: Path | None,
                             lm_dir: Path, key: str, stats: dict, model, tok, log=print,
                             note: str | None = None) -> dict:
    """Write ``head`` (the head of ``head_dir`` with a read-out added) to ``<out>/safety_head/``
    with its self-check record on the served LM: the old metrics with ``stats`` under ``key``
    (also in ``head_config.json``), and ``head_dir``'s LoRA adapter beside it. Returns
    ``stats``."""
    from safeserve.models.head_writer import carry_lm, check_lm_carried, write_checkpoint

    full_model = check_lm_carried(head, Path(head_dir), Path(out))
    old = Path(head_dir) / "safety_head" / "metrics.json"
    all_metrics = {**(json.loads(old.read_text()) if old.is_file() else {}), key: stats,
                   **({"note": note} if note else {})}
    extra = {**head.extra, key: stats}
    if model_dir is not None:
        extra["base_model"] = str(model_dir)
    write_checkpoint(head, all_metrics, Path(out), extra, self_check_model=lm_dir, log=log,
                     model=model, tok=tok)
    carry_lm(Path(head_dir), Path(out), full_model)
    log(json.dumps(stats))
    return stats
