"""``safeserve eval`` commands: ``safety``, ``moderation``, ``judge-check``, ``compare`` and
``replay``.

The lead's CLI calls ``register(eval_app)`` with its ``eval`` typer group.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console()


def parse_safety_config(value: Optional[str]) -> dict | str | None:
    """A preset name or a JSON object, as the server's ``safety_config`` accepts."""
    if value is None:
        return None
    value = value.strip()
    if not value.startswith("{"):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--safety-config is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise typer.BadParameter("--safety-config must be a preset name or a JSON object")
    return parsed


def parse_sampling(value: Optional[str]) -> dict | None:
    """--sampling: a JSON object of further request fields (e.g. vLLM's repetition_penalty),
    sent with every request; the fields the eval sets itself are refused."""
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="--sampling") from exc
    if not isinstance(parsed, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--sampling")
    from safeserve.models.evaluation.safety_eval import check_sampling

    try:
        return check_sampling(parsed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--sampling") from None


def _file_fact(path) -> dict:
    """A data file as a summary records it: its name and a digest of its bytes (not its path,
    which differs between machines for the same file)."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
    return {"file": path.name, "sha256_16": digest}


def _parse_data(specs: list[str]) -> list[tuple[str, Path]]:
    parsed = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--data expects NAME=PATH, got {spec!r}")
        if not Path(path).is_file():
            raise typer.BadParameter(f"--data {name}: no such file {path}")
        parsed.append((name.strip(), Path(path)))
    return parsed


def load_checked(option: str, loader, *args, **kwargs) -> list:
    """A dataset loader's samples, or one clear line (not a traceback) naming the option when
    the file is missing, malformed, of the wrong kind for its loader, or holds no prompts."""
    try:
        samples = loader(*args, **kwargs)
    except (OSError, ValueError, KeyError, csv.Error) as e:
        raise typer.BadParameter(str(e), param_hint=option) from None
    if not samples:
        raise typer.BadParameter("no prompts in that file (the wrong file for this dataset?)",
                                 param_hint=option)
    return samples


def safety(
    base_url: str = typer.Option(..., "--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1"),
    model: str = typer.Option(..., "--model", help="Model name the server serves."),
    data: list[str] = typer.Option([], "--data", help="Harmful prompt set as NAME=PATH; NAME is harmbench, advbench, jbb, strongreject, jsonl, or any label with a .jsonl file. Repeatable."),
    xstest: Optional[Path] = typer.Option(None, "--xstest", help="XSTest prompts CSV: its safe prompts measure over-refusal."),
    xstest_unsafe: bool = typer.Option(False, "--xstest-unsafe", help="Also run XSTest's unsafe contrast prompts (as harmful dataset 'xstest')."),
    xstest_limit: int = typer.Option(0, "--xstest-limit", min=0, help="Sample this many of XSTest's safe prompts, and as many unsafe ones with --xstest-unsafe (0 = all)."),
    attacks: str = typer.Option("direct,prefill,jailbreak", "--attacks", help="Comma-separated attacks: direct, prefill, jailbreak."),
    limit: int = typer.Option(0, "--limit", min=0, help="Seeded random sample of N prompts per harmful dataset (0 = all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --limit sample."),
    exclude_sample: int = typer.Option(0, "--exclude-sample", min=0, help="Leave out of each harmful dataset the N prompts that --limit N --seed <--exclude-seed> would pick (a reported sample), then apply --limit and --seed to the rest: a development set beside it (0 = leave nothing out)."),
    exclude_seed: int = typer.Option(0, "--exclude-seed", help="Seed of the sample --exclude-sample leaves out."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Requests in flight at once."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="Generation length per request."),
    retries: int = typer.Option(3, "--retries", help="Retries per request on connection errors, timeouts, 429 and 5xx."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds per request attempt."),
    harmbench_contextual: bool = typer.Option(False, "--harmbench-contextual", help="Include HarmBench contextual behaviours (context prepended)."),
    harmbench_copyright: bool = typer.Option(False, "--harmbench-copyright", help="Include HarmBench copyright behaviours."),
    harmbench_targets: Optional[Path] = typer.Option(None, "--harmbench-targets", help="HarmBench BehaviorID->target JSON, used as prefills."),
    out: Path = typer.Option(..., "--out", help="Output folder for results.jsonl, summary.json, summary.md, asr.png."),
    safety_config: Optional[str] = typer.Option(None, "--safety-config", help="Preset name or JSON object sent as safety_config with every request, e.g. '{\"on_violation\": \"annotate\", \"trace\": true}' to record traces for `eval replay`."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, max=2.0, help="Sampling temperature of every request (0: greedy, the reported tables' setting; above 0, add '{\"seed\": N}' with --sampling for a repeatable run)."),
    sampling: Optional[str] = typer.Option(None, "--sampling", help="JSON object of further request fields sent with every request, e.g. '{\"repetition_penalty\": 1.2}' (not the fields the eval sets: model, messages, max_tokens, temperature, n, stream, safety_config, the prefill switches). At temperature 0 vLLM ignores top_k, top_p and min_p; penalties and logit_bias act."),
    label: str = typer.Option("", "--label", help="Name of this run in reports, e.g. 'safety on'."),
    api_key: str = typer.Option(os.environ.get("OPENAI_API_KEY", "EMPTY"), "--api-key", help="API key if the server wants one.", show_default=False),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of an earlier run in --out."),
) -> None:
    """Measure attack success and over-refusal of a running OpenAI-compatible server."""
    from safeserve.models.evaluation import datasets as ds
    from safeserve.models.evaluation.report import asr_table, over_refusal_table
    from safeserve.models.evaluation.safety_eval import evaluate

    from safeserve.models.evaluation.safety_eval import ATTACKS

    sampling_fields = parse_sampling(sampling)
    earlier = [n for n in ("results.jsonl", "results.partial.jsonl") if (out / n).is_file()]
    if earlier and not overwrite:  # a measured run, or what an interrupted one kept
        raise typer.BadParameter(f"{out} holds an earlier run's {earlier[0]}: choose another "
                                 "folder, or pass --overwrite to replace it", param_hint="--out")
    attack_list = [a.strip() for a in attacks.split(",") if a.strip()]
    if unknown := sorted(set(attack_list) - set(ATTACKS)) or (None if attack_list else ["(none)"]):
        raise typer.BadParameter(f"unknown attacks {unknown}; known: {', '.join(ATTACKS)}",
                                 param_hint="--attacks")
    if xstest is not None and "direct" not in attack_list:
        # over-refusal is measured on the safe prompts sent as they are
        raise typer.BadParameter("--xstest's safe prompts are sent directly: add direct to "
                                 "--attacks, or leave --xstest out", param_hint="--attacks")
    if xstest is not None and exclude_sample:
        # the reported runs draw XSTest apart from the harmful sets; no exclusion here could
        # know which of its prompts they sent
        raise typer.BadParameter("--exclude-sample leaves a reported sample out of the harmful "
                                 "datasets only, so XSTest's prompts would overlap a reported "
                                 "run's: measure development over-refusal on other benign "
                                 "prompts (--data NAME=PATH.jsonl with harmful false)",
                                 param_hint="--xstest")
    samples: list[ds.Sample] = []
    for name, path in _parse_data(data):
        options = {}
        if name.lower() == "harmbench":
            options = {"include_contextual": harmbench_contextual, "include_copyright": harmbench_copyright, "targets_path": harmbench_targets}
        loaded = load_checked(f"--data {name}", ds.load_named, name, path, **options)
        picked = ds.sample_outside(loaded, exclude_sample, exclude_seed, limit or None, seed)
        console.print(f"{name}: {len(picked)} of {len(loaded)} prompts"
                      + (f" (outside the {exclude_sample} of seed {exclude_seed})"
                         if exclude_sample else ""))
        samples += picked
    if xstest is not None:
        # Safe and unsafe prompts sampled apart, so that asking for the contrast prompts too
        # leaves the over-refusal sample as it is without them.
        for which in ("safe", "unsafe") if xstest_unsafe else ("safe",):
            loaded = load_checked("--xstest", ds.load_xstest, xstest, which=which)
            picked = ds.sample_limit(loaded, xstest_limit or None, seed)
            console.print(f"xstest ({which}): {len(picked)} of {len(loaded)} prompts")
            samples += picked
    if not samples:
        raise typer.BadParameter("nothing to evaluate: give --data and/or --xstest")

    summary = evaluate(
        samples,
        base_url=base_url,
        model=model,
        attacks=attack_list,
        out_dir=out,
        concurrency=concurrency,
        max_tokens=max_tokens,
        temperature=temperature,
        max_retries=retries,
        timeout=timeout,
        api_key=api_key,
        progress=progress,
        safety_config=parse_safety_config(safety_config),
        sampling=sampling_fields,
        meta={"label": label, "limit": limit or None, "seed": seed, "xstest_limit": xstest_limit or None,
              **({"exclude_sample": exclude_sample, "exclude_seed": exclude_seed}
                 if exclude_sample else {}),
              # what was read: two runs over different files are not comparable
              "data": {name: _file_fact(path) for name, path in _parse_data(data)},
              **({"xstest": _file_fact(xstest), "xstest_unsafe": xstest_unsafe}
                 if xstest is not None else {}),
              **({"harmbench_options": {"contextual": harmbench_contextual,
                                        "copyright": harmbench_copyright,
                                        "targets": _file_fact(harmbench_targets)
                                        if harmbench_targets else None}}
                 if any(n.lower() == "harmbench" for n, _ in _parse_data(data)) else {})},
    )
    # Plain echo for markdown: rich would re-wrap long table rows.
    if summary["asr"]:
        typer.echo("\n".join(asr_table(summary)))
    if summary["over_refusal"]:
        typer.echo("\n".join(over_refusal_table(summary)))
    console.print(f"{summary['n_rows']} requests in {summary['duration_s']:.1f} s, {summary['n_errors']} errors; wrote {out}")
    if summary["n_errors"] == summary["n_rows"]:
        console.print(f"[red]every request failed; see the error field in {out / 'results.jsonl'}[/red]")
        raise typer.Exit(1)


def moderation(
    base_url: str = typer.Option(..., "--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1"),
    model: Optional[str] = typer.Option(None, "--model", help="Model name to send (SafeServe: its served name, or leave out)."),
    data: list[str] = typer.Option([], "--data", help="Prompt set as NAME=PATH (harmful, as in `eval safety`; a .jsonl row may say \"harmful\": false). Repeatable."),
    xstest: Optional[Path] = typer.Option(None, "--xstest", help="XSTest prompts CSV: its safe prompts (benign) and its unsafe contrast prompts (harmful)."),
    limit: int = typer.Option(0, "--limit", min=0, help="Seeded random sample of N prompts per dataset (0 = all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --limit sample."),
    batch_size: int = typer.Option(32, "--batch-size", help="Inputs per moderation request (1-32)."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Requests in flight at once."),
    safety_config: Optional[str] = typer.Option(None, "--safety-config", help="Preset name or JSON object sent as safety_config (SafeServe)."),
    out: Path = typer.Option(..., "--out", help="Output folder for results.jsonl, summary.json, summary.md."),
    api_key: str = typer.Option(os.environ.get("OPENAI_API_KEY", "EMPTY"), "--api-key", help="API key if the server wants one.", show_default=False),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Flag rates of a moderation endpoint on harmful and benign prompt sets, and the AUROC of
    its scores."""
    from safeserve.models.evaluation import datasets as ds
    from safeserve.models.evaluation.moderation_eval import evaluate_moderation, summary_table

    samples: list[ds.Sample] = []
    for name, path in _parse_data(data):
        picked = ds.sample_limit(load_checked(f"--data {name}", ds.load_named, name, path),
                                 limit or None, seed)
        console.print(f"{name}: {len(picked)} prompts")
        samples += picked
    if xstest is not None:
        for which, label in (("safe", "xstest_safe"), ("unsafe", "xstest_unsafe")):
            picked = ds.sample_limit(load_checked("--xstest", ds.load_xstest, xstest, which=which,
                                                  name=label), limit or None, seed)
            console.print(f"{label}: {len(picked)} prompts")
            samples += picked
    if not samples:
        raise typer.BadParameter("nothing to evaluate: give --data and/or --xstest")
    if not 1 <= batch_size <= 32 or concurrency < 1:
        raise typer.BadParameter("--batch-size takes 1 to 32, --concurrency at least 1")
    summary = evaluate_moderation(samples, base_url=base_url, out_dir=out, model=model,
                                  api_key=api_key, batch_size=batch_size,
                                  concurrency=concurrency,
                                  safety_config=parse_safety_config(safety_config),
                                  progress=progress, meta={"limit": limit or None, "seed": seed})
    typer.echo("\n".join(summary_table(summary)))
    console.print(f"{len(samples)} prompts in {summary['duration_s']:.1f} s; wrote {out}")
    if summary.get("errors") == len(samples):
        console.print(f"[red]every request failed; see the error field in {out / 'results.jsonl'}[/red]")
        raise typer.Exit(1)


def judge_check(
    xstest_completions: Path = typer.Option(..., "--xstest-completions", help="Folder of XSTest model-completion CSVs with human final_label."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Also write the full report as JSON."),
) -> None:
    """Measure the offline refusal judge against XSTest's human-labelled completions."""
    from safeserve.models.evaluation.judge_check import check_dir, format_report

    report = check_dir(xstest_completions)
    typer.echo(format_report(report))
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2), encoding="utf-8")


def compare(
    run_dirs: list[Path] = typer.Argument(..., help="Output folders of `safeserve eval safety` runs."),
    out: Path = typer.Option(Path("report.md"), "--out", help="Markdown report to write."),
) -> None:
    """Put several safety-eval runs side by side (e.g. base model vs safety on)."""
    from safeserve.models.evaluation.report import compare_runs

    text = compare_runs(run_dirs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    typer.echo(text)


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = None
    if values is None or not all(math.isfinite(v) for v in values):
        raise typer.BadParameter(f"{option} expects comma-separated numbers, got {text!r}")
    return values


def _whole(text: str, option: str) -> list[int]:
    values = _floats(text, option)
    if any(v != int(v) or v < 1 for v in values):
        raise typer.BadParameter(f"{option} takes whole numbers >= 1, got {text!r}")
    return [int(v) for v in values]


def replay(
    runs: list[Path] = typer.Argument(None, help="Traced `eval safety` output folders (made with --safety-config '{\"on_violation\": \"annotate\", \"trace\": true}')."),
    head: Path = typer.Option(..., "--head", help="The checkpoint the runs were served with (its thresholds are the starting point)."),
    exclude: list[Path] = typer.Option([], "--exclude", help="Runs (eval safety or eval cosa) whose requests (same id, attack or config, and prompt) are left out: e.g. the test run, when tuning on a development run."),
    cosa: list[Path] = typer.Option([], "--cosa", help="Traced `eval cosa --mode enforce` output folders (same --base-config)."),
    prompt_shift: str = typer.Option("0", "--prompt-shift", help="Logit shift(s) of the prompt/query thresholds, comma-separated (+ = act less)."),
    response_shift: str = typer.Option("0", "--response-shift", help="Logit shift(s) of the response thresholds, comma-separated."),
    overall_response_shift: str = typer.Option("0", "--overall-response-shift", help="Logit shift(s) of the overall output's response threshold on top, comma-separated: what a head's sampled-decoding shift (operating_point.sampled_overall_shift) does at a run's temperature."),
    tau: Optional[str] = typer.Option(None, "--tau", help="Consecutive violating steps, comma-separated (default: the head's own, else 3)."),
    alert_margin: Optional[str] = typer.Option(None, "--alert-margin", help="Alert band width(s) in logits below the prompt thresholds, comma-separated; 0 = no band (default: the head's own)."),
    alert_tau: Optional[str] = typer.Option(None, "--alert-tau", help="Consecutive violating steps after a prompt in the alert band, comma-separated (default: the head's own)."),
    max_over_refusal: Optional[float] = typer.Option(None, "--max-over-refusal", help="With several rules: keep only those within this over-refusal budget, best attack success first."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write every scored rule as JSON."),
) -> None:
    """Replay the decision rule over traced runs at other thresholds and tau, without generating
    again: attack success, over-refusal and CoSA answered rates per rule."""
    from safeserve.models.evaluation import replay as rp

    try:
        base = rp.served_rule(head)
        rows = [r for run in runs or () for r in rp.load_safety_run(run, base.names)]
        held_out = set().union(*(rp.run_requests(run) for run in exclude))
        rows += [r for run in cosa for r in rp.load_cosa_run(run, base.names)]
        rows = [r for r in rows if r.extra["key"] not in held_out]
        if base.per_request_attribution and any(r.allow for r in rows):
            named = rp.name_categories(rows, head, log=lambda *a: None)
            typer.echo(f"named the category of {named} allow-list requests with the head's "
                       "attribution read-out (transformers forward)")
            unnamed = [r for r in rows if rp.needs_name(r, base) and r.named is None]
            if unnamed:
                raise rp.TraceError(
                    f"{len(unnamed)} allow-list requests cannot be named (a safety run, "
                    "another --mode than enforce, or a guideline), and this head names each "
                    "request's category from the prompt the server rendered: leave them out")
    except (rp.TraceError, OSError, KeyError, ValueError) as exc:  # incl. a bad checkpoint or JSON
        raise typer.BadParameter(str(exc)) from exc
    if not rows:
        raise typer.BadParameter("no traced requests to replay (all excluded, or empty runs)")
    taus = [base.tau] if tau is None else _whole(tau, "--tau")
    if not taus or min(taus) < 1:
        raise typer.BadParameter("--tau takes whole numbers >= 1")
    margins = None if alert_margin is None else _floats(alert_margin, "--alert-margin")
    band_taus = None if alert_tau is None else _whole(alert_tau, "--alert-tau")
    if margins is not None and min(margins, default=0) < 0:
        raise typer.BadParameter("--alert-margin takes numbers >= 0")
    if band_taus is not None and min(band_taus, default=1) < 1:
        raise typer.BadParameter("--alert-tau takes whole numbers >= 1")
    if margins and max(margins) > 0 and (band_taus or [base.alert_tau])[0] is None:
        raise typer.BadParameter("an alert band needs --alert-tau (the head has none)")
    prompt_shifts = _floats(prompt_shift, "--prompt-shift")
    if any(prompt_shifts) and rp.has_prompt_veto(head):
        # (served, a move keeps the veto's cut at 0 whatever the shift: SafetyHead.veto_logits)
        typer.echo("note: this head's prompt veto caps the traced prompt scores at its outputs' "
                   "thresholds, so a prompt shift here also moves the veto's cut by the shift, "
                   "which a served move does not; the prompt-shifted rows are estimates: serve "
                   "the moved head to measure them")
    results = rp.sweep(rows, base, prompt_shifts,
                       _floats(response_shift, "--response-shift"), taus, margins, band_taus,
                       _floats(overall_response_shift, "--overall-response-shift"))
    same, n = rp.agreement(rows, base)
    typer.echo(f"{n} traced requests; the served rule replayed triggers where the server did on {same} of {n}")
    moved = sum(1 for r in rows if float(r.extra.get("shift") or 0.0)
                or float(r.extra.get("sampled") or 0.0))
    if moved:
        # agreement replays each row as echoed; the sweep's rows are the head's greedy rule
        typer.echo(f"note: {moved} of {n} requests were served with a threshold_shift or a "
                   "sampled-decoding shift, which the sweep does not apply: its 0 row is the "
                   "head's greedy rule, not what those requests ran (--overall-response-shift "
                   "S adds the sampled shift)")
    shown = results
    if len(results) > 1:
        if max_over_refusal is not None:
            shown = sorted((r for r in results if r["over_refusal"] and r["over_refusal"]["rate"] <= max_over_refusal),
                           key=rp.mean_asr)[:15]
        else:
            shown = rp.pareto(results)
    typer.echo("\n".join(rp.results_table(shown)))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=1), encoding="utf-8")


def allow_benign(
    data_root: Path = typer.Option(..., "--data-root", exists=True, file_okay=False,
                                   help="Shared data root (refusal_direction_splits/, "
                                   "cosa_microsoft/)."),
    out: Path = typer.Option(..., "--out", help="JSONL to write ({prompt, allow, expect, source})."),
    n_alpaca: int = typer.Option(150, "--n-alpaca", min=0, help="Alpaca validation instructions."),
    n_hard: int = typer.Option(150, "--n-hard", min=0, help="Held-out written hard negatives."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    split_seed: int = typer.Option(0, "--split-seed", help="The hard negatives' train/held-out split seed: the --seed the heads' training jobs ran with (0 for every bundled head). Another one would hand training prompts to this set."),
) -> None:
    """Write the benign development set for allow-list requests: prompts to answer, each
    sent with one of CoSAlign-Test's non-empty allow-lists (run it with `eval cosa --data`)."""
    from safeserve.models.evaluation.allow_benign import build_allow_benign, write_allow_benign

    rows = build_allow_benign(data_root, n_alpaca, n_hard, seed, split_seed=split_seed)
    write_allow_benign(rows, out)
    console.print(f"wrote {len(rows)} prompts to {out}")


def register(app: typer.Typer) -> None:
    app.command("allow-benign")(allow_benign)
    """Add ``safety``, ``moderation``, ``judge-check``, ``compare`` and ``replay`` to the
    ``eval`` group."""
    app.command("replay")(replay)
    app.command("safety")(safety)
    app.command("moderation")(moderation)
    app.command("judge-check")(judge_check)
    app.command("compare")(compare)
