"""The CoSAlign job end to end: configs -> candidates -> labels -> error scores -> pairs ->
SFT -> DPO -> a servable model directory.

Output layout (``out``):
    config.json, model.safetensors, tokenizer files     the DPO-trained model (full weights)
    safety_head/                                        copied from the base, when it has one
    cosalign/  recipe.json, configs_seen.json, raw_candidates.jsonl + generation.json (sampled
               texts, saved before labelling), candidates.jsonl (labelled), pairs.jsonl, sft.jsonl
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safeserve.models.cosalign.configs import (
    MODES, SynthConfig, config_key, render_config, synthesize, system_prompt)
from safeserve.models.cosalign.preferences import (
    Candidate, Weights, error_score, preference_pairs, sft_target)
from safeserve.models.cosalign.prompts import LabelledPrompt, load_prompts
from safeserve.models.cosalign.trainer import (
    TrainOptions, check_out, copy_chat_template, copy_head, is_main_process, run_dpo, run_sft)
from safeserve.models.evaluation.judge import FULL_REFUSAL, judge
from safeserve.models.taxonomy import Taxonomy

log = logging.getLogger("safeserve.cosalign")
DATA_DIR = "cosalign"
SHORT_RULE = "empty_or_short"  # the refusal judge's rule for a reply of too few words
RAW_NAME, GENERATION_NAME = "raw_candidates.jsonl", "generation.json"


class JobInputError(ValueError):
    """Bad input or a missing earlier stage: the CLI reports it as one line, no traceback."""


# Written refusals added to every prompt-config's sampled candidates. A small base model
# rarely refuses on its own, and without a refusal among the candidates a disallowed
# request has nothing better to prefer than its (equally bad) sampled answers.
REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I can't help with this, as it falls outside what I'm allowed to assist with here.",
    "Sorry, I won't be able to provide that. Is there something else I can help you with?",
    "I cannot assist with that request under this conversation's safety guideline.",
)


@dataclass
class JobOptions:
    limit: int = 0
    seed: int = 0
    modes: tuple[str, ...] = MODES
    holdout: tuple[str, ...] = ()
    num_candidates: int = 4
    max_tokens: int = 256
    temperature: float = 1.0
    kv_cache_gib: float = 1.0
    dtype: str = "float32"  # candidate generation's (bfloat16 for large models on GPUs)
    weights: Weights = field(default_factory=Weights)
    max_pairs: int = 4
    refusal_candidates: int = 1
    head_checkpoint: str | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key: str = "EMPTY"


@dataclass
class Job:
    prompt: LabelledPrompt
    config: SynthConfig
    config_text: str

    def messages(self) -> list[dict]:
        return [{"role": "system", "content": system_prompt(self.config_text)},
                {"role": "user", "content": self.prompt.prompt}]


def holdout_keys(specs, taxonomy: Taxonomy) -> set[str]:
    """Held-out configs as canonical keys: 'weapons+violence' is 'violence+weapons', and a
    misspelt category is an error, not a config that silently stays in training."""
    keys = set()
    for spec in specs:
        ids = [] if spec.strip() == "safe" else [x.strip() for x in spec.split("+") if x.strip()]
        if unknown := sorted(set(ids) - set(taxonomy.ids)):
            raise JobInputError(f"holdout config {spec!r}: unknown categories {unknown} (known: "
                                f"{', '.join(taxonomy.ids)}, or 'safe')")
        keys.add(config_key(ids))
    return keys


def plan_jobs(prompts: list[LabelledPrompt], taxonomy: Taxonomy, opts: JobOptions) -> list[Job]:
    rng = random.Random(opts.seed)
    holdout = holdout_keys(opts.holdout, taxonomy)
    jobs = []
    for p in prompts:
        for cfg in synthesize(p.categories, taxonomy, rng, opts.modes, holdout):
            jobs.append(Job(p, cfg, render_config(cfg.allow, taxonomy, cfg.template)))
    return jobs


def _write_jsonl(rows, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


@dataclass
class Labellers:
    """The category judges of a job: a safety head and/or an LLM judge (either may be absent)."""
    head: object | None = None  # HeadLabeller
    judge: object | None = None  # LLMJudge

    @property
    def source(self) -> str:
        return "+".join(n for n, on in (("head", self.head), ("judge", self.judge))
                        if on is not None) or "prompt_labels"


def open_labellers(opts: JobOptions, taxonomy: Taxonomy) -> Labellers:
    """Load the head and reach the judge now, so a wrong checkpoint, URL or model name fails
    before generation spends its time."""
    head = judge = None
    if opts.head_checkpoint:
        from safeserve.models.checkpoint import CheckpointError
        from safeserve.models.cosalign.head_labeller import HeadLabeller

        try:
            head = HeadLabeller(opts.head_checkpoint)
        except (CheckpointError, OSError) as exc:
            raise JobInputError(f"--head-checkpoint {opts.head_checkpoint}: {exc}") from exc
    if opts.judge_url:
        from safeserve.models.cosalign.llm_judge import LLMJudge

        try:
            judge = LLMJudge(opts.judge_url, opts.judge_model, opts.judge_api_key, taxonomy)
            judge.check()
        except Exception as exc:  # the client's connection, auth, HTTP and empty-list errors
            raise JobInputError(f"--judge-url {opts.judge_url}: cannot use the judge "
                                f"({type(exc).__name__}: {exc})") from exc
    return Labellers(head, judge)


def label_candidates(jobs: list[Job], candidates: list[list[str]], taxonomy: Taxonomy,
                     opts: JobOptions, labellers: Labellers | None = None) -> tuple[list[dict], str]:
    """Per candidate: addressed (refusal judge, or the LLM judge when given) and the risk
    categories present (head and/or LLM judge; with neither, the prompt's own labels stand
    in for an answered candidate). Empty or very short candidates get no row. Returns rows
    and the name of the category source. ``labellers`` default: ``open_labellers(opts)``."""
    labellers = labellers if labellers is not None else open_labellers(opts, taxonomy)
    # An empty or few-word sample ('', 'Sure') is no answer, yet the refusal judge calls it a
    # refusal, so it would score like one and could become the SFT target or a chosen
    # response. Such candidates are dropped here, before any labelling; the written refusals
    # stay the refusals to prefer.
    flat = [(j, text, v) for j, texts in zip(jobs, candidates) for text in texts
            if (v := judge(text)).rule != SHORT_RULE]
    pairs = [(j.prompt.prompt, text) for j, text, _ in flat]
    head_cats = labellers.head.categories(pairs) if labellers.head is not None else None
    judge_labels = labellers.judge.label_many(pairs) if labellers.judge is not None else None
    source = labellers.source
    rows = []
    for i, (job, text, verdict) in enumerate(flat):
        addressed = verdict.label != FULL_REFUSAL
        present: set[str] = set()
        judge_unread = judge_labels is not None and judge_labels[i] is None
        if judge_labels is not None and not judge_unread:
            addressed = judge_labels[i].addressed != "none"
            present |= set(judge_labels[i].categories)
        if head_cats is not None and addressed:
            # A refusal carries no risk (the paper scores it by gamma alone; the LLM judge is
            # told so): the head firing on one that restates the topic ("I can't help you
            # build a bomb") would put it at >= beta, never chosen, and the configs that
            # should prefer refusing would lose exactly those pairs.
            present |= set(head_cats[i])
        # An unreadable judge reply gives no categories, which would score a harmful answer as
        # risk-free (error 0) and make it the chosen response. Dropping the candidate instead
        # would also drop the pairs in which it should be the rejected one. So it is labelled
        # as in a run without a category judge: the refusal judge decides addressed, and an
        # answer that addressed the prompt is assumed to carry the prompt's risks
        # (conservative: under a config that disallows them it counts as harmful).
        if addressed and (source == "prompt_labels" or judge_unread):
            present |= set(job.prompt.categories)
        rows.append({"prompt": job.prompt.prompt, "prompt_categories": job.prompt.categories,
                     "mode": job.config.mode, "allow": list(job.config.allow),
                     "config_text": job.config_text, "response": text,
                     "refusal_judge": verdict.label, "addressed": addressed,
                     "judge_unread": judge_unread, "present": sorted(present),
                     "error": error_score(present, job.config.allow, addressed, opts.weights)})
    return rows, source


def build_pairs(labelled: list[dict], weights: Weights, max_pairs: int) -> tuple[list[dict], list[dict]]:
    """Group candidates by (prompt, config text); DPO pair rows and SFT rows."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in labelled:
        groups.setdefault((r["prompt"], r["config_text"]), []).append(r)
    dpo_rows, sft_rows = [], []
    for (prompt, text), rows in groups.items():
        cands = [Candidate(r["response"], r["error"]) for r in rows]
        pairs = preference_pairs(cands, weights.beta, max_pairs)
        msgs = [{"role": "system", "content": system_prompt(text)}, {"role": "user", "content": prompt}]
        meta = {"mode": rows[0]["mode"], "allow": rows[0]["allow"]}
        for chosen, rejected in pairs:
            dpo_rows.append({"prompt": msgs, "chosen": [{"role": "assistant", "content": chosen.text}],
                             "rejected": [{"role": "assistant", "content": rejected.text}],
                             "chosen_error": chosen.score, "rejected_error": rejected.score, **meta})
        best = sft_target(pairs)
        if best is not None:
            sft_rows.append({"prompt": msgs, "completion": [{"role": "assistant", "content": best.text}],
                             "error": best.score, **meta})
    return dpo_rows, sft_rows


def generation_key(model_dir: Path, jobs: list[Job], opts: JobOptions) -> str:
    """What the sampled candidates depend on: a saved generation is reused only on a match."""
    doc = {"model": str(Path(model_dir).resolve()), "num_candidates": opts.num_candidates,
           "max_tokens": opts.max_tokens, "temperature": opts.temperature, "seed": opts.seed,
           **({"dtype": opts.dtype} if opts.dtype != "float32" else {}),
           "jobs": [[j.prompt.prompt, j.config_text] for j in jobs]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def sampled_candidates(model_dir: Path, jobs: list[Job], opts: JobOptions,
                       data: Path) -> tuple[list[list[str]], float, bool]:
    """Sampled texts per job, the generation seconds, and whether they were reused. They are saved (raw_candidates.jsonl,
    then generation.json with their key) before anything labels them, so a labelling failure
    costs a rerun of the labelling only: a rerun with the same jobs and settings reuses them."""
    from safeserve.models.cosalign.generate import generate_candidates

    raw, meta_path = data / RAW_NAME, data / GENERATION_NAME
    key = generation_key(model_dir, jobs, opts)
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("key") == key and raw.is_file():
        rows = _read_jsonl(raw)
        if len(rows) == len(jobs):
            log.info("reusing %d jobs' sampled candidates from %s", len(rows), raw)
            return [r["responses"] for r in rows], meta.get("seconds", 0.0), True
    meta_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    candidates = generate_candidates(model_dir, [j.messages() for j in jobs],
                                     num_candidates=opts.num_candidates, max_tokens=opts.max_tokens,
                                     temperature=opts.temperature, seed=opts.seed,
                                     kv_cache_gib=opts.kv_cache_gib, dtype=opts.dtype)
    seconds = round(time.perf_counter() - t0, 1)
    _write_jsonl(({"prompt": j.prompt.prompt, "prompt_categories": j.prompt.categories,
                   "mode": j.config.mode, "allow": list(j.config.allow),
                   "config_text": j.config_text, "responses": texts}
                  for j, texts in zip(jobs, candidates)), raw)
    meta_path.write_text(json.dumps({"key": key, "seconds": seconds, "jobs": len(jobs)}))
    return candidates, seconds, False


def read_prompts(prompts_path: Path, opts: JobOptions, taxonomy: Taxonomy) -> list[LabelledPrompt]:
    try:
        prompts = load_prompts(prompts_path, taxonomy)
    except ValueError as exc:  # a malformed row, with its file and line
        raise JobInputError(str(exc)) from exc
    if not prompts:
        raise JobInputError(f"no prompts in {prompts_path}")
    if opts.limit and len(prompts) > opts.limit:
        prompts = random.Random(opts.seed).sample(prompts, opts.limit)
    return prompts


def make_data(prompts_path: Path, model_dir: Path, out: Path, opts: JobOptions,
              taxonomy: Taxonomy) -> dict:
    prompts = read_prompts(prompts_path, opts, taxonomy)  # a bad file leaves nothing behind
    data = out / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(prompts, taxonomy, opts)
    if not jobs:
        raise JobInputError("no prompt-config jobs: the --modes give these prompts no config "
                            "outside --holdout")
    labellers = open_labellers(opts, taxonomy)
    log.info("%d prompts -> %d prompt-config jobs x %d candidates", len(prompts), len(jobs),
             opts.num_candidates)
    candidates, gen_s, reused = sampled_candidates(model_dir, jobs, opts, data)
    rng = random.Random(opts.seed + 1)
    if opts.refusal_candidates > 0:
        candidates = [texts + rng.sample(REFUSALS, min(opts.refusal_candidates, len(REFUSALS)))
                      for texts in candidates]
    labelled, source = label_candidates(jobs, candidates, taxonomy, opts, labellers)
    _write_jsonl(labelled, data / "candidates.jsonl")
    dpo_rows, sft_rows = build_pairs(labelled, opts.weights, opts.max_pairs)
    _write_jsonl(dpo_rows, data / "pairs.jsonl")
    _write_jsonl(sft_rows, data / "sft.jsonl")
    seen = sorted({config_key(j.config.allow) for j in jobs})
    written = set(REFUSALS)
    sampled = [r for r in labelled if r["response"] not in written]
    (data / "configs_seen.json").write_text(json.dumps(seen, indent=1))
    stats = {"prompts": len(prompts), "jobs": len(jobs), "candidates": len(labelled),
             "dropped_empty_or_short": sum(map(len, candidates)) - len(labelled),
             "category_source": source, "generation_s": gen_s, "generation_reused": reused,
             # judge replies that could not be read: labelled from the prompt (label_candidates)
             "judge_unread": sum(r["judge_unread"] for r in labelled),
             "pairs": len(dpo_rows), "sft_rows": len(sft_rows),
             "jobs_by_mode": {m: sum(j.config.mode == m for j in jobs) for m in MODES},
             # the model's own candidates only: the written refusals never address a prompt
             "sampled_candidates": len(sampled),
             "addressed_rate": round(sum(r["addressed"] for r in sampled) / max(1, len(sampled)), 4),
             "seen_configs": len(seen)}
    if stats["judge_unread"]:
        log.warning("%d of %d judge replies were unreadable; those candidates carry their "
                    "prompt's categories", stats["judge_unread"], len(labelled))
    return stats


def train_from_data(model_dir: Path, out: Path, topts: TrainOptions, keep_sft: bool = False) -> dict:
    data = out / DATA_DIR
    if not (data / "pairs.jsonl").is_file():
        raise JobInputError(f"no CoSAlign data in {data} (pairs.jsonl): run --stage data first")
    # SFT is optional (skipped when there are no rows): hand-made pairs may come without it.
    sft_path = data / "sft.jsonl"
    sft_rows = [{"prompt": r["prompt"], "completion": r["completion"]}
                for r in (_read_jsonl(sft_path) if sft_path.is_file() else [])]
    dpo_rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                for r in _read_jsonl(data / "pairs.jsonl")]
    if not dpo_rows:
        raise JobInputError("no preference pairs: every prompt-config's candidates tied or were "
                            "all unsafe; sample more candidates or use more prompts")
    stats = {}
    start = Path(model_dir)
    sft_dir = data / "sft_model"
    if sft_rows and topts.sft_epochs > 0:
        stats["sft"] = run_sft(start, sft_rows, sft_dir, topts)
        copy_chat_template(model_dir, sft_dir)
        start = sft_dir
    stats["dpo"] = run_dpo(start, dpo_rows, out, topts)
    copy_chat_template(model_dir, out)
    stats["head_copied"] = copy_head(model_dir, out)
    if not keep_sft and is_main_process():
        shutil.rmtree(sft_dir, ignore_errors=True)
    return stats


def train_base(recipe: dict, model_dir: Path | None, recipe_path: Path) -> Path:
    """The model ``--stage train`` starts from: the one the data was sampled from (its
    recipe.json), not whatever ``--model`` defaults to. The pairs rank that model's own
    answers; training another model on them is off-policy and silently so."""
    built = recipe.get("base_model")
    if built is None:
        if model_dir is None:
            raise JobInputError(f"no data recipe at {recipe_path}: run --stage data first "
                                "(or give --model for hand-made pairs)")
        return Path(model_dir)
    if model_dir is not None and Path(model_dir).resolve() != Path(built).resolve():
        raise JobInputError(f"--model {model_dir} is not the model the data was built from "
                            f"({built}, per {recipe_path}); leave --model out")
    return Path(built)


def _check_out(model_dir: Path, out: Path) -> None:
    try:
        check_out(model_dir, out)
    except ValueError as exc:
        raise JobInputError(str(exc)) from None


def _warn_unused_data_options(recipe: dict, opts: JobOptions, prompts_path: Path | None) -> None:
    """``--stage train`` trains on the pairs already built: data options that differ from the
    ones they were built with do not apply, and a user who changed one should know."""
    built = recipe.get("job") or {}
    given = {**asdict(opts), "judge_api_key": None}
    differ = sorted(k for k, v in given.items()
                    if k in built and json.loads(json.dumps(v)) != built[k])
    if prompts_path is not None and str(prompts_path) != recipe.get("prompts"):
        differ.insert(0, "prompts")
    if differ:
        log.warning("--stage train reuses the data under %s/ as built; these data options differ "
                    "from that build and do not apply: %s (rebuild with --stage data or all to "
                    "use them)", DATA_DIR, ", ".join(differ))


def run(prompts_path: Path | None, model_dir: Path | None, out: Path, opts: JobOptions,
        topts: TrainOptions, stage: str = "all", keep_sft: bool = False) -> dict:
    """``model_dir`` None: the embedded default model to build data, the data's own model to
    train (``--stage train``)."""
    taxonomy = Taxonomy.load()
    recipe_path = out / DATA_DIR / "recipe.json"
    recipe = json.loads(recipe_path.read_text()) if recipe_path.is_file() else {}
    if stage in ("all", "data"):
        if prompts_path is None:
            raise JobInputError("--prompts is required to build the data")
        if model_dir is None:
            from safeserve.models.model_store import ensure_default_model

            model_dir = ensure_default_model()
        _check_out(model_dir, out)
        out.mkdir(parents=True, exist_ok=True)
        model_dir = Path(model_dir).resolve()  # stage train may run from another directory
        recipe = {"base_model": str(model_dir), "prompts": str(prompts_path),
                  "job": {**asdict(opts), "judge_api_key": None}, "data": make_data(
                      prompts_path, Path(model_dir), out, opts, taxonomy)}
        recipe_path.write_text(json.dumps(recipe, indent=2))
    if stage == "train":
        _warn_unused_data_options(recipe, opts, prompts_path)
    if stage in ("all", "train"):
        base = train_base(recipe, model_dir, recipe_path)
        _check_out(base, out)
        recipe["train_options"] = asdict(topts)
        recipe["train"] = train_from_data(base, out, topts, keep_sft)
        if is_main_process():
            recipe_path.write_text(json.dumps(recipe, indent=2))
    return recipe
