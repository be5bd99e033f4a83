"""The ``train`` commands of the safety-signal job and its neighbours (``safety``,
``calibrate``, ``operating-point``, ``prompt-head``, ``attribution``, ``topic-gate``,
``self-check``, ``probe-layers``, and the data builds): typer options, checked input, the
printed summary. The work is in models/safety_train.py and the modules each command names."""

from __future__ import annotations

import json
import time
from pathlib import Path

from safeserve.models.safety_features import head_features
from safeserve.models.safety_train import (TrainInputError, probe_layers, recalibrate,
                                           train_safety)
from safeserve.models.taxonomy import Taxonomy


def _thresholded(metrics: dict) -> dict:
    """The thresholded rates a run reports: on the test half, or (--keep-thresholds, nothing
    calibrated) on all held-out conversations."""
    return metrics.get("thresholded_on_test_half") or metrics["thresholded_on_all_heldout"]


# The read-out jobs (`train prompt-head`, `train attribution`) take the same four options.
_READOUT_HEAD_HELP = ("A bundled head (default, guarded, strict) or a directory holding "
                      "safety_head/.")
_READOUT_DATA_HELP = ("Folder of the public datasets (training sources; every evaluation set's "
                      "prompts are removed).")
_READOUT_MODEL_HELP = ("Base model the head reads (default: the one the head records, if "
                       "present, else the embedded one).")


def summary_table(metrics: dict, names: list[str]):
    from rich.table import Table

    t = Table(title="held-out AUROC (prompt / token)")
    t.add_column("output")
    t.add_column("prompt AUROC")
    t.add_column("token AUROC")
    t.add_column("threshold")
    a = metrics["auroc_all_heldout"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for n in names:
        t.add_row(n, fmt(a["prompt_level"][n]["auroc"]), fmt(a["token_level"][n]["auroc"]),
                  fmt(metrics["calibration"]["served_thresholds"][n]))
    return t


def register(app) -> None:
    """Add ``safety``, ``probe-layers`` and the data builds (``build-safety-data``,
    ``build-hard-negatives``, ``build-question-data``, ``augment-split``) to the ``train``
    group."""
    import typer

    from safeserve.models import augment, hard_negatives, question_data, safety_data_build

    safety_data_build.register(app)
    hard_negatives.register(app)
    question_data.register(app)
    augment.register(app)

    def _model(model: Path | None) -> Path:
        if model is not None:
            return model
        from safeserve.models.model_store import ensure_default_model

        return ensure_default_model()

    @app.command("calibrate")
    def calibrate_cmd(
        head: Path = typer.Option(..., help="Checkpoint directory holding safety_head/ "
                                  "(and adapter/ for LoRA heads)."),
        model: Path = typer.Option(None, help="The LM the head reads: the merged model of a "
                                   "LoRA run, or the base model (default: --head itself when it "
                                   "holds a model, else the embedded one)."),
        eval_data: list[Path] = typer.Option(..., help="Held-out trajectories (repeatable); "
                                             "half calibrate, half are reported."),
        out: Path = typer.Option(..., help="Output directory (safety_head/, adapter/)."),
        target_fpr: float = typer.Option(..., min=0.0, max=1.0, help="Benign conversations flagged, at most."),
        tau: int = typer.Option(3, min=1, help="Consecutive unsafe response positions."),
        max_length: int = typer.Option(512, help="Tokens per conversation."),
        seed: int = typer.Option(0, help="Seed of the calibration / report split."),
    ) -> None:
        """Re-threshold a trained head at another benign budget (no retraining)."""
        if model is None and (head / "config.json").is_file():
            model = head  # a LoRA / full run's checkpoint: its own LM, not the embedded base
        elif model is None and (head / "adapter").is_dir():
            from safeserve.models.head_check import served_model_for

            model = served_model_for(head)  # the base with the adapter merged, as served
        try:
            metrics = recalibrate(_model(model), head, eval_data, out, target_fpr=target_fpr,
                                  tau=tau, max_length=max_length, seed=seed, log=typer.echo)
        except TrainInputError as exc:  # bad --eval-data, found before the model loads
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(json.dumps(_thresholded(metrics)["conversation_level"],
                              indent=2))

    def _sampled_points(text: str | None):
        if text is None:
            return None
        if text.strip().lower() == "none":
            return ()
        try:
            pairs = [item.split("=") for item in text.split(",") if item.strip()]
            points = tuple((float(t), float(v)) for t, v in pairs)
        except ValueError:
            raise typer.BadParameter(f"--sampled-overall-shift wants TEMP=SHIFT pairs "
                                     f"(e.g. 0.7=1,1.0=2), got {text!r}") from None
        return points

    @app.command("operating-point")
    def operating_point_cmd(
        head: Path = typer.Option(..., help="Checkpoint directory holding safety_head/."),
        out: Path = typer.Option(..., help="Output directory (safety_head/, adapter/)."),
        prompt_shift: float = typer.Option(0.0, help="Logits added to the prompt-verdict "
                                           "thresholds (+ = flag fewer prompts)."),
        response_shift: float = typer.Option(0.0, help="Logits added to the response-rule "
                                             "thresholds."),
        tau: int = typer.Option(None, min=1, help="Consecutive violating steps for requests that "
                                "do not set tau (default: keep the head's own, else 3)."),
        alert_margin: float = typer.Option(None, min=0.0, help="Alert band: a prompt verdict within this "
                                           "many logits below its thresholds gets the "
                                           "shorter response run --alert-tau (0: no band; "
                                           "default: keep the head's own band)."),
        alert_tau: int = typer.Option(None, min=1, help="Consecutive violating steps after a prompt "
                                      "in the alert band (default: the head's own band's; "
                                      "a head without a band needs --alert-margin too)."),
        allowlist_shift: float = typer.Option(None, help="Logits the overall output's threshold "
                                              "moves by under an allow-list (+ = act less; "
                                              "default: keep the head's own, else the "
                                              "server's +2)."),
        gate_shift: float = typer.Option(0.0, help="Logits the topic gate's thresholds move by "
                                         "(+ = opens less often; format-8 heads)."),
        gate_replaces: bool = typer.Option(None, "--gate-replaces-prompt-categories/"
                                           "--gate-beside-prompt-categories",
                                           help="Under a non-empty allow-list, whether the "
                                           "prompt verdict leaves the per-category outputs to "
                                           "the topic gate (default: keep the head's own)."),
        no_allowlist_prompt_own: str = typer.Option(
            None, help="Requests without an allow-list: which of the head's own outputs judge "
            "their prompt beside the read-out, all or overall (format 10; a head with a "
            "read-out beside its own verdict; default: keep the head's own, else all)."),
        no_allowlist_readout_shift: float = typer.Option(
            None, help="Requests without an allow-list: logits their prompt read-out's "
            "thresholds move by (+ = act less; default: keep the head's own, else 0)."),
        sampled_overall_shift: str = typer.Option(
            None, help="Sampled decoding: logits the overall output's response threshold "
            "moves by at a request's temperature, as TEMP=SHIFT pairs, e.g. 0.7=1,1.0=2 "
            "(linear between them and from 0 at greedy, flat past the last; 'none' drops "
            "them; default: keep the head's own)."),
        sampled_clear_margin: float = typer.Option(
            None, help="Apply the sampled-decoding shift only to requests whose prompt verdict "
            "is clear: every output at least this many logits under its prompt threshold "
            "(a negative number drops the condition; default: keep the head's own)."),
    ) -> None:
        """Move a head's operating point (chosen with `eval replay`) without retraining or
        data: exact logit shifts of the prompt verdict and the response rule."""
        from safeserve.models.operating_point import move_operating_point

        # a head it cannot load or a move it cannot take: one line, exit 2 (server/cli.main)
        point = move_operating_point(head, out, prompt_shift=prompt_shift,
                                     response_shift=response_shift, tau=tau,
                                     alert_margin=alert_margin, alert_tau=alert_tau,
                                     allowlist_shift=allowlist_shift, gate_shift=gate_shift,
                                     gate_replaces=gate_replaces,
                                     no_allowlist_own=no_allowlist_prompt_own,
                                     no_allowlist_readout_shift=no_allowlist_readout_shift,
                                     sampled_shift=_sampled_points(sampled_overall_shift),
                                     clear_margin=sampled_clear_margin,
                                     log=typer.echo)
        typer.echo(json.dumps(point, indent=2))

    @app.command("prompt-head")
    def prompt_head_cmd(
        head: str = typer.Option(..., help=_READOUT_HEAD_HELP),
        out: Path = typer.Option(..., help="Output directory (safety_head/, adapter/)."),
        data_root: Path = typer.Option(..., help=_READOUT_DATA_HELP),
        model: Path = typer.Option(None, help=_READOUT_MODEL_HELP),
        target_fpr: float = typer.Option(0.05, min=0.0, max=1.0, help="Held-out benign prompts flagged, at most "
                                         "(any output)."),
        seed: int = typer.Option(0, help="Seed of the wrappers and the held-out split."),
        combine: str = typer.Option("replace", help="replace: the read-out alone judges "
                                    "prompt ends (format 4); either: it is added to the "
                                    "head's own prompt verdict, a prompt is flagged when either "
                                    "flags it, and --target-fpr counts the two together; when "
                                    "the head alone is over it, the read-out adds no held-out "
                                    "false alarm (format 5)."),
        questions: bool = typer.Option(False, help="Also train on the project-labelled "
                                       "conversational questions (HH first turns; `train "
                                       "build-question-data`), harmful and harmless."),
        layer: int = typer.Option(None, min=1, help="The read-out reads the residual stream "
                                  "after this many decoder layers instead of the final state "
                                  "(format 6; the server has the model hand it over). Default: "
                                  "the final state."),
        heldout_questions: bool = typer.Option(False, "--heldout-questions", help="Also the "
                                               "questions `build-question-data` holds out (its "
                                               "held-out file, seed 0): how the bundled heads' "
                                               "read-outs were fitted up to v17; reproduces them."),
    ) -> None:
        """Fit a separate linear read-out for the prompt verdict on prompt ends alone
        (checkpoint format 4, 5 or, with --layer, 6); the response rule stays the head's."""
        from safeserve.models.model_store import resolve_head_dir
        from safeserve.models.prompt_head import train_prompt_head

        if combine not in ("replace", "either"):
            typer.echo(f"error: --combine must be replace or either, not {combine!r}", err=True)
            raise typer.Exit(2)
        try:
            train_prompt_head(resolve_head_dir(head), out, data_root, model,
                              target_fpr=target_fpr, seed=seed, either=combine == "either",
                              questions=questions, layer=layer,
                              heldout_questions=heldout_questions, log=typer.echo)
        except (FileNotFoundError, ValueError) as e:  # no such head, no data: one line
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    @app.command("prompt-veto")
    def prompt_veto_cmd(
        head: str = typer.Option(..., help=_READOUT_HEAD_HELP),
        out: Path = typer.Option(..., help="Output directory (safety_head/, adapter/)."),
        data_root: Path = typer.Option(..., help=_READOUT_DATA_HELP + " Also the "
                                       "calibration prompts: Alpaca's validation split."),
        model: Path = typer.Option(None, help=_READOUT_MODEL_HELP),
        quantile: float = typer.Option(0.95, min=0.0, max=1.0, help="Share of ordinary "
                                       "instructions (held-out Alpaca) the veto clears: its "
                                       "threshold is this quantile of their logits."),
        alpaca: int = typer.Option(6000, min=0, help="Ordinary instructions (Alpaca's "
                                   "training split) among the veto's benign rows."),
        calibration: int = typer.Option(1000, min=10, help="Calibration prompts (Alpaca's "
                                        "validation split)."),
        seed: int = typer.Option(0, help="Seed of the rows, the held-out split and the "
                                 "calibration sample."),
        questions: bool = typer.Option(True, help="Also the project-labelled conversational "
                                       "questions (HH first turns), harmful and harmless."),
        heldout_questions: bool = typer.Option(False, "--heldout-questions", help="Also the "
                                               "questions `build-question-data` holds out (its "
                                               "held-out file, seed 0): how the bundled heads' "
                                               "read-outs were fitted up to v17; reproduces them."),
    ) -> None:
        """Add a prompt veto (checkpoint format 11): a read-out a prompt must also pass to be
        flagged at the prompt, so that ordinary requests the verdict's tail flags are cleared;
        the response rule stays the head's (models/prompt_veto.py)."""
        from safeserve.models.model_store import resolve_head_dir
        from safeserve.models.prompt_veto import train_prompt_veto

        try:
            train_prompt_veto(resolve_head_dir(head), out, data_root, model, quantile=quantile,
                              n_alpaca=alpaca, n_calibration=calibration, seed=seed,
                              questions=questions, heldout_questions=heldout_questions,
                              log=typer.echo)
        except (FileNotFoundError, ValueError) as e:  # no such head, no data: one line
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    @app.command("attribution")
    def attribution_cmd(
        head: str = typer.Option(..., help=_READOUT_HEAD_HELP),
        out: Path = typer.Option(..., help="Output directory (safety_head/, adapter/)."),
        data_root: Path = typer.Option(..., help=_READOUT_DATA_HELP),
        model: Path = typer.Option(None, help=_READOUT_MODEL_HELP),
        seed: int = typer.Option(0, help="Seed of the wrappers and the held-out split."),
        heldout_questions: bool = typer.Option(False, "--heldout-questions", help="Also the "
                                               "questions `build-question-data` holds out (its "
                                               "held-out file, seed 0): how the bundled heads' "
                                               "read-outs were fitted up to v17; reproduces them."),
    ) -> None:
        """Fit the attribution read-out (checkpoint format 7): under an allow-list, the category
        the overall output acts for, named once per request at its prompt end. Every other
        decision of the head is unchanged."""
        from safeserve.models.attribution import train_attribution
        from safeserve.models.model_store import resolve_head_dir

        try:
            train_attribution(resolve_head_dir(head), out, data_root, model, seed=seed,
                              heldout_questions=heldout_questions, log=typer.echo)
        except (FileNotFoundError, ValueError) as e:  # no such head, no data: one line
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    @app.command("topic-gate")
    def topic_gate_cmd(
        head: str = typer.Option(..., help=_READOUT_HEAD_HELP + " It needs an attribution "
                                 "read-out (format 7)."),
        out: Path = typer.Option(..., help="Output directory (safety_head/, adapter/)."),
        data_root: Path = typer.Option(..., help=_READOUT_DATA_HELP),
        model: Path = typer.Option(None, help=_READOUT_MODEL_HELP),
        target_fpr: float = typer.Option(0.02, help="Per category: the share of held-out "
                                         "benign prompts over its threshold before --shift."),
        shift: float = typer.Option(1.5, help="Logits added to every threshold."),
        seed: int = typer.Option(0, help="Seed of the wrappers and the held-out split."),
        wildguard: bool = typer.Option(False, help="Also the project-labelled WildGuardMix "
                                       "prompts (models/labels/wildguardmix_prompts.tsv; "
                                       "measured, not adopted: docs/history/cosa.md, \"The topic gate\")."),
        heldout_questions: bool = typer.Option(False, "--heldout-questions", help="Also the "
                                               "questions `build-question-data` holds out (its "
                                               "held-out file, seed 0): how the bundled heads' "
                                               "read-outs were fitted up to v17; reproduces them."),
    ) -> None:
        """Fit the topic gate (checkpoint format 8): under a non-empty allow-list, a category
        the request does not allow that its prompt is about flags the prompt. Requests without
        an allow-list are unchanged."""
        from safeserve.models.model_store import resolve_head_dir
        from safeserve.models.topic_gate import train_topic_gate

        try:
            train_topic_gate(resolve_head_dir(head), out, data_root, model,
                             target_fpr=target_fpr, shift=shift, seed=seed,
                             wildguard=wildguard, heldout_questions=heldout_questions,
                             log=typer.echo)
        except (FileNotFoundError, ValueError) as e:  # no such head, no data: one line
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    @app.command("self-check")
    def self_check_cmd(
        head: str = typer.Option(..., help="A bundled head (default, guarded, strict) or a directory "
                                 "holding safety_head/ (and adapter/ for a LoRA head)."),
        model: Path = typer.Option(None, help="Base model the head reads (default: the one "
                                   "the head records, if present, else the embedded one)."),
        dtype: str = typer.Option("float32", help="Dtype of the reference forward."),
    ) -> None:
        """(Re)write a head's self-check record: its prompt verdicts on fixed conversations,
        computed by transformers on the model it is served with. The server reproduces them
        at startup and refuses to serve a head over another model (--head-check)."""
        from safeserve.models.head_check import record_self_check, served_model_for
        from safeserve.models.model_store import resolve_head_dir

        try:
            head_dir = resolve_head_dir(head)
            lm = served_model_for(head_dir, model)
        except FileNotFoundError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        record = record_self_check(head_dir, lm, log=typer.echo, dtype=dtype)
        if record is None:
            raise typer.Exit(1)
        for prompt, row in zip(record.prompts, record.logits):
            top = max(range(len(row)), key=row.__getitem__)
            typer.echo(f"  {prompt[:60]!r}: highest {record.output_names[top]} "
                       f"{row[top]:+.2f} logits (before the prompt offset)")

    @app.command("safety")  # (its numbers are checked by check_options, with its own messages)
    def safety_cmd(
        data: list[Path] = typer.Option(..., help="Training trajectories (.jsonl or .csv); "
                                        "repeat to add files (e.g. hard negatives)."),
        out: Path = typer.Option(..., help="Checkpoint directory to write."),
        eval_data: list[Path] = typer.Option(None, help="Held-out trajectories, repeatable; "
                                             "half of their prompt groups calibrate the "
                                             "thresholds (default: 20% of the prompt groups "
                                             "of --data)."),
        external_eval: Path = typer.Option(None, help="Prompt-only rows scored for the report "
                                           "only (never used for any choice)."),
        model: Path = typer.Option(None, help="Base model directory (default: the embedded "
                                   "SmolLM2-135M-Instruct)."),
        mode: str = typer.Option("head", help="head | lora | full."),
        lambda_cls: float = typer.Option(0.1, "--lambda", help="Weight of L_cls in "
                                         "L_lm + lambda * L_cls (lora/full)."),
        epochs: int = typer.Option(30, help="Epochs (head mode: over the cached positions)."),
        lr: float = typer.Option(None, help="Learning rate (head mode: the head's, default "
                                 "2e-3; lora/full: the LM's, default 2e-4)."),
        head_lr: float = typer.Option(1e-3, help="Head learning rate in lora/full mode."),
        batch_size: int = typer.Option(16, help="Conversations per forward batch."),
        head_batch_size: int = typer.Option(4096, help="Positions per step in head mode."),
        max_length: int = typer.Option(512, help="Tokens per conversation (longer responses "
                                       "are cut)."),
        layer: int = typer.Option(-1, help="Hidden state the head reads (-1 = final, "
                                  "the only one the server serves)."),
        probe_layers: str = typer.Option("", help="Head mode: also probe these layers, e.g. "
                                         "'10,15,20,25,30' (same forward pass)."),
        tau: int = typer.Option(3, help="Consecutive unsafe response positions that trigger "
                                "(the server's rule, for calibration and metrics)."),
        target_fpr: float = typer.Option(0.05, help="Benign conversations flagged, at most, "
                                         "when calibrating thresholds."),
        prompt_offset: bool = typer.Option(True, help="Fold separate prompt-verdict "
                                           "thresholds into the head along the prompt-end "
                                           "read-out (see the module docstring). Not "
                                           "the exact operating_point.prompt_logit_offset "
                                           "that `train operating-point` writes."),
        head_only: bool = typer.Option(False, help="Write only safety_head/ (no LM files)."),
        mlp_units: int = typer.Option(0, help="Head mode: hidden units of the residual MLP "
                                      "beside the linear head (0 = linear only)."),
        mlp_gate: bool = typer.Option(False, help="Gate the MLP off at prompt ends (by the "
                                      "prompt-end read-out): the prompt verdict stays linear."),
        init_head: Path = typer.Option(None, help="Keep this linear head's weights as the "
                                       "linear part (frozen); fit only the MLP."),
        keep_thresholds: bool = typer.Option(False, help="With --init-head: keep its "
                                             "thresholds and fold (no calibration)."),
        cache_dir: Path = typer.Option(None, help="Cache extracted features here."),
        lora_r: int = typer.Option(16, help="LoRA rank."),
        lora_alpha: int = typer.Option(32, help="LoRA alpha."),
        lora_dropout: float = typer.Option(0.05, help="LoRA dropout."),
        grad_accum: int = typer.Option(1, help="lora/full: micro-batches per optimizer "
                                       "step (per process; the step's batch is "
                                       "batch-size x grad-accum x processes)."),
        max_steps: int = typer.Option(0, help="Stop lora/full training after this many "
                                      "steps (0 = all epochs)."),
        lm_targets: str = typer.Option("safe", help="lora/full: tokens L_lm trains on. "
                                       "safe = benign answers and refusals; benign = only "
                                       "answers to benign prompts (self-distillation: the LM "
                                       "does not learn to refuse by itself)."),
        dtype: str = typer.Option("float32", help="LM weight dtype: float32 | bfloat16 "
                                  "(bfloat16 for 7-8B LoRA on GPUs)."),
        seed: int = typer.Option(0, help="Random seed."),
    ) -> None:
        """Train the explicit safety signal and write a safety checkpoint."""
        args = {k: v for k, v in locals().items() if k != "_model"}  # the CLI options
        from rich.console import Console

        con = Console()
        t0 = time.time()
        args["model"] = _model(model)
        try:
            metrics = train_safety(args, log=con.print)
        except TrainInputError as exc:
            from rich.markup import escape

            con.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None
        if metrics:
            from safeserve.models.taxonomy import Taxonomy as _T

            con.print(summary_table(metrics, list(_T.load().output_names)))
            con.print_json(data=_thresholded(metrics)["conversation_level"])
        con.print(f"wrote {out} in {time.time() - t0:.0f}s")

    @app.command("probe-layers")
    def probe_cmd(
        data: list[Path] = typer.Option(..., help="Training trajectories (repeatable)."),
        eval_data: list[Path] = typer.Option(None, help="Held-out trajectories (repeatable)."),
        external_eval: Path = typer.Option(None, help="Prompt-only rows (reported only)."),
        model: Path = typer.Option(None, help="Base model directory."),
        layers: str = typer.Option("10,15,20,25,30", help="Layers to probe (L = final)."),
        epochs: int = typer.Option(30, min=1, help="Head epochs per layer."),
        lr: float = typer.Option(2e-3, help="Head learning rate."),
        batch_size: int = typer.Option(16, help="Conversations per forward batch."),
        max_length: int = typer.Option(512, help="Tokens per conversation."),
        cache_dir: Path = typer.Option(None, help="Cache extracted features here."),
        out: Path = typer.Option(None, help="Write the table as JSON here."),
        seed: int = typer.Option(0, help="Random seed."),
    ) -> None:
        """Held-out AUROC of a head-only probe at several layers."""
        from rich.console import Console
        from rich.table import Table

        try:
            ls = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            ls = []
        if not ls:  # before the model loads (the table needs a row)
            raise typer.BadParameter(f"want comma-separated layer numbers, got {layers!r}",
                                     param_hint="--layers")
        con = Console()
        tax = Taxonomy.load()
        feats, _ = head_features(data, eval_data, external_eval, _model(model), tax, ls,
                                 max_length, batch_size, cache_dir, seed, con.print)
        rows = probe_layers(feats, ls, tax, epochs, lr, seed, con.print)
        t = Table(title="layer probe: held-out AUROC")
        for c in rows[0]:
            t.add_column(c)
        for r in rows:
            t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
        con.print(t)
        if out:
            Path(out).write_text(json.dumps(rows, indent=2))
