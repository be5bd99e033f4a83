"""Explicit safety-signal training job (after Li & Kim, ICML 2025): L = L_lm + lambda * L_cls.

The classification signal is a linear head on a hidden state of the LM: K = categories + 1
sigmoid outputs (per category, then the overall ``unsafe``), applied at every position through
``safeserve.kernels.safety_head.head_logits`` (the same math the server runs). Per-token targets
come from ``safety_data.encode_trajectory``. L_cls is BCE-with-logits over labelled positions
with class-balanced positive weights, averaged separately over prompt-end positions and over
response positions and summed, so the few prompt verdicts are not drowned by the many response
tokens.

Modes (``safeserve train safety --mode ...``):

* ``head``: the LM stays frozen. The model runs once over all trajectories (no grad, batched by
  length), the hidden states at labelled positions are cached, and the head is fitted on the
  cache (features standardised for conditioning; the scaling is folded back into weight and
  bias, so the saved head reads the raw hidden state). Seconds per fit on CPU.
* ``lora``: PEFT LoRA on the attention projections q/k/v/o and the MLP gate/up/down (r=16,
  alpha=32, dropout 0.05; all linear layers, since the head reads the residual stream they all
  write) trained jointly with the head.
* ``full``: every LM weight plus the head.

For ``lora`` and ``full``, L_lm is next-token cross-entropy on *safe* answers only (benign
answers and refusals; an answer that turns harmful is no LM target at all, its harmless-looking
lead-in included); unsafe response tokens are classification targets but never LM
targets, so the model is never taught to produce the harmful text it learns to flag. With
``--lm-targets benign`` L_lm covers only the answers to benign prompts (the base model's own
answers, so L_lm is self-distillation): the written refusals then train the head but not the
LM, which keeps answering as the base model did and leaves refusing to the strategy. The loop
runs under ``accelerate.Accelerator``, so the same code trains 7-8B models on several GPUs:

    accelerate launch --num_processes 8 --mixed_precision bf16 \\
        -m safeserve.models.safety_train safety --data train.jsonl --eval-data heldout.jsonl \\
        --model /models/llama-3-8b-instruct --out ckpt --mode lora --lambda 0.1 \\
        --batch-size 4 --max-length 1024

Multi-GPU runs are data parallel (DDP; ``--grad-accum`` micro-batches per step, unless
ACCELERATE_GRADIENT_ACCUMULATION_STEPS is exported; N ranks train what one process
accumulating N micro-batches trains): LoRA fits a 7-8B model on each 80 GB GPU. FSDP and DeepSpeed (sharded weights, which
``full`` mode on 7-8B would need) are refused at start: the head sits beside the LM as a second
module and the end-of-run save and calibration run on one process, neither of which sharding
supports here.

LoRA mode writes the adapter to ``<out>/adapter/`` and the merged model to ``<out>`` (what the
server loads). All modes write ``<out>/safety_head/`` (see models/checkpoint.py) with
``metrics.json``; ``head`` mode copies the base model's files into ``<out>`` unless
``--head-only`` (then ``<out>`` holds just ``safety_head/``, to be composed with the base model).

Thresholds are calibrated on half of the held-out prompt groups so that at most
``--target-fpr`` of benign held-out conversations get flagged under the server's rule (prompt
verdict, or ``--tau`` consecutive unsafe response positions); thresholded metrics are reported
on the other half. The prompt verdict and the response rule need different operating points
(a benign 80-token answer offers ~80 chances for a run of tau, a prompt one), but the server
has one threshold per output, so the prompt thresholds are folded into the head along a linear
prompt-end read-out (``finish_head``). Category thresholds go into the saved taxonomy.yaml. The
overall ``unsafe`` output has no taxonomy entry, so its threshold is folded into its bias
instead: it fires at score >= 0.5.

The parts live in their own modules: ``safety_features`` (hidden states at labelled positions,
cached per file), ``safety_head_fit`` (loss and head-only fit), ``safety_calibration``
(metrics, thresholds, the prompt-verdict fold), ``head_writer`` (the checkpoint);
this module runs the modes, ``safety_train_cli`` holds the commands.

``safeserve train probe-layers`` fits a head-only probe on several layers (1..L; L or -1 = the
final post-norm state the server reads) and reports held-out AUROC, to choose the layer by
measurement.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from safeserve.kernels.safety_head import head_logits
from safeserve.models.decision_defaults import OPERATING_POINT
from safeserve.models.head_writer import (carry_lm, check_lm_carried, copy_model_files,
                                          write_checkpoint)
from safeserve.models.safety_calibration import (auroc, finish_head, head_external_metrics,
                                                 keep_init_operating_point)
from safeserve.models.safety_data import MASK_PROMPT, MASK_RESPONSE, Encoded, load_trajectories
from safeserve.models.safety_features import (_DTYPES, encode_all, extract_features,
                                              head_features, load_lm, paths_of, resolve_layer,
                                              split_data)
from safeserve.models.safety_head_fit import (classification_loss, fit_head, frozen_linear,
                                              positive_weights, prompt_end_gate, scores_of)
from safeserve.models.taxonomy import Taxonomy


def _recipe(args: dict) -> dict:
    """The options that reproduce a run, JSON-safe (paths as text)."""
    def safe(v):
        if isinstance(v, (list, tuple)):
            return [safe(x) for x in v]
        return str(v) if isinstance(v, Path) else v

    return {k: safe(v) for k, v in args.items()
            if isinstance(v, (str, int, float, bool, Path, type(None), list, tuple))}


def probe_layers(feats: dict, layers: list[int], taxonomy: Taxonomy, epochs: int, lr: float,
                 seed: int, log=print) -> list[dict]:
    """Held-out AUROC of a head fitted on each layer (overall output and category mean)."""
    rows = []
    tr, ev = feats["train"], feats["heldout"]
    for layer in layers:
        fit = fit_head(tr.hidden[layer], tr.labels, tr.kind, epochs=epochs, lr=lr, seed=seed,
                       progress=False)
        s = scores_of(ev.hidden[layer], fit.weight, fit.bias)
        row = {"layer": layer}
        for lvl, k in (("prompt", MASK_PROMPT), ("token", MASK_RESPONSE)):
            sel = ev.kind == k
            row[f"{lvl}_auroc_unsafe"] = auroc(s[sel, -1], ev.labels[sel, -1])
            cats = [auroc(s[sel, j], ev.labels[sel, j]) for j in range(len(taxonomy.ids))]
            cats = [c for c in cats if c is not None]
            row[f"{lvl}_auroc_category_mean"] = sum(cats) / len(cats) if cats else None
        if "external" in feats:
            ex = feats["external"]
            se = scores_of(ex.hidden[layer], fit.weight, fit.bias)
            row["external_prompt_auroc_unsafe"] = auroc(se[:, -1], ex.labels[:, -1])
        log(json.dumps(row))
        rows.append(row)
    return rows


def run_head_mode(args: dict, taxonomy: Taxonomy, log=print) -> dict:
    layer = args["layer"]
    probe = [int(x) for x in str(args.get("probe_layers") or "").split(",") if x.strip()]
    layers = sorted(set([layer] + probe))
    cache_dir = Path(args["cache_dir"]) if args.get("cache_dir") else None
    feats, _ = head_features(args["data"], args.get("eval_data"), args.get("external_eval"),
                             args["model"], taxonomy, layers, args["max_length"],
                             args["batch_size"], cache_dir, args["seed"], log,
                             args["dtype"])
    tr = feats["train"]
    t0 = time.time()
    fit = fit_head(tr.hidden[layer], tr.labels, tr.kind, epochs=args["epochs"], lr=args["lr"],
                   batch_size=args["head_batch_size"], weight_decay=args["weight_decay"],
                   seed=args["seed"], mlp_units=args["mlp_units"],
                   mlp_gate=prompt_end_gate(tr) if args["mlp_gate"] else None,
                   frozen_linear=frozen_linear(args.get("init_head")))
    log(f"head fitted in {time.time() - t0:.1f}s; loss {fit.losses[0]:.4f} -> "
        f"{fit.losses[-1]:.4f}")
    if args["keep_thresholds"]:
        head, metrics = keep_init_operating_point(args["init_head"], fit, feats["heldout"], args)
    else:
        head, metrics = finish_head(fit.weight, fit.bias, feats["heldout"], taxonomy, args,
                                    layer, log, mlp=fit.mlp)
    metrics["train_loss"] = {"first_epoch": fit.losses[0], "last_epoch": fit.losses[-1]}
    if "external" in feats:
        metrics["external_prompt_only"] = head_external_metrics(head, feats["external"])
    if probe:
        metrics["layer_probe"] = probe_layers(feats, layers, taxonomy, args["epochs"],
                                              args["lr"], args["seed"], log)
    metrics["data"] = {"train_conversations": len(tr.meta), "train_positions": tr.labels.shape[0],
                       "heldout_conversations": len(feats["heldout"].meta)}
    out = Path(args["out"])
    if not args.get("head_only"):
        copy_model_files(args["model"], out)
    extra = {"recipe": _recipe(args),
             "base_model": str(args["model"]), "mode": "head",
             "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_checkpoint(head, metrics, out, {**head.extra, **extra},
                     self_check_model=Path(args["model"]), log=log, dtype=args["dtype"])
    return metrics


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class HeadParams(torch.nn.Module):
    """The safety head as trainable parameters (weight [K,H], bias [K])."""

    def __init__(self, k: int, h: int, prior: torch.Tensor | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(k, h))
        init = torch.zeros(k) if prior is None else torch.log(prior / (1 - prior))
        self.bias = torch.nn.Parameter(init.clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(hidden, self.weight, self.bias)


LM_TARGETS = ("safe", "benign")


def _collate(encs: list[Encoded], pad: int, lm_targets: str = "safe"):
    """Batch tensors. LM targets: ``safe`` = every safe response token (benign answers and
    refusals to harmful prompts); ``benign`` = only the answers of fully benign conversations,
    which are the base model's own: L_lm is then self-distillation that keeps the LM's behaviour,
    and the LM never learns to refuse by itself (the head and the decoding strategy decide)."""
    width = max(len(e.input_ids) for e in encs)
    k = encs[0].labels.shape[1]
    x = torch.full((len(encs), width), pad, dtype=torch.long)
    att = torch.zeros((len(encs), width), dtype=torch.long)
    lab = torch.zeros((len(encs), width, k))
    kind = torch.zeros((len(encs), width), dtype=torch.int8)
    lm = torch.full((len(encs), width), -100, dtype=torch.long)
    for r, e in enumerate(encs):
        n = len(e.input_ids)
        ids = torch.tensor(e.input_ids)
        x[r, :n], att[r, :n], lab[r, :n], kind[r, :n] = ids, 1, e.labels, e.mask
        # LM targets: safe answers only. An answer that turns harmful is no target at all,
        # its harmless-looking lead-in ("Sure, here is a guide.") included: the model must not
        # learn to open a compliant answer to a harmful request.
        response = e.mask == MASK_RESPONSE
        turns_unsafe = bool((e.labels[response][:, -1] > 0.5).any())
        safe_resp = response & (e.labels[:, -1] < 0.5) & (not turns_unsafe)
        if lm_targets == "benign" and bool((e.labels[e.mask > 0] > 0.5).any()):
            safe_resp = torch.zeros_like(safe_resp)
        lm[r, :n] = torch.where(safe_resp, ids, torch.full_like(ids, -100))
        if e.end_of_turn is not None and bool(safe_resp.any()):
            # where a response that is a target ends: the turn's end is one too
            lm[r, e.end_of_turn] = ids[e.end_of_turn]
    return {"input_ids": x, "attention_mask": att, "labels": lab, "kind": kind, "lm": lm}


def lm_loss(logits: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Next-token CE: logits at p predict token p+1; mean over target tokens (0 if none)."""
    tgt = lm[:, 1:]
    lg = logits[:, :-1]
    n = (tgt != -100).sum()
    if n == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), tgt.reshape(-1),
                           ignore_index=-100, reduction="sum") / n


def run_adapter_mode(args: dict, taxonomy: Taxonomy, log=print) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # An exported ACCELERATE_GRADIENT_ACCUMULATION_STEPS wins over --grad-accum (accelerate's
    # rule); metrics.json records the value used.
    acc = Accelerator(gradient_accumulation_steps=args["grad_accum"])
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise TrainInputError(f"{acc.distributed_type.value} is not supported by train safety: "
                         "use data parallel (DDP) with --mode lora for 7-8B models")
    log = log if acc.is_main_process else (lambda *a, **k: None)
    torch.manual_seed(args["seed"])
    model, tok = load_lm(args["model"], args["dtype"])
    if args["mode"] == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args["lora_r"], lora_alpha=args["lora_alpha"],
                         lora_dropout=args["lora_dropout"],
                         target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    train, held = split_data(args["data"], args.get("eval_data"), taxonomy, args["seed"])
    # read now, not after the fit (check_data has validated it)
    ext = load_trajectories(args["external_eval"], taxonomy) if args.get("external_eval") else None
    encs, _ = encode_all(train, tok, taxonomy, args["max_length"], log)
    all_lab = torch.cat([e.labels[e.mask > 0] for e in encs])
    pw = positive_weights(all_lab)
    head = HeadParams(taxonomy.num_outputs, model.config.hidden_size,
                      all_lab.mean(0).clamp(1e-4, 1 - 1e-4))
    n_layers = model.config.num_hidden_layers
    li = resolve_layer(args["layer"], n_layers)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    # The order comes from its own seeded generator, not the global RNG (which model loading
    # and the process group use differently): N data-parallel ranks then take every Nth batch
    # of the order one process would see.
    loader = torch.utils.data.DataLoader(encs, batch_size=args["batch_size"], shuffle=True,
                                         generator=torch.Generator().manual_seed(args["seed"]),
                                         collate_fn=lambda b: _collate(b, pad,
                                                                       args["lm_targets"]))
    params = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": args["lr"]},
              {"params": list(head.parameters()), "lr": args["head_lr"]}]
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    model, head, opt, loader = acc.prepare(model, head, opt, loader)
    pw = pw.to(acc.device)
    step, hist = 0, []
    max_steps = args.get("max_steps") or 0
    model.train()
    for epoch in range(args["epochs"]):
        bar = tqdm(loader, desc=f"epoch {epoch + 1}", disable=not acc.is_main_process)
        window = torch.zeros(3, device=acc.device)  # loss, lm, cls summed over the window
        micro = 0
        for batch in bar:
            with acc.accumulate(model, head):
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=True)
                hid = out.hidden_states[li]
                sel = batch["kind"] > 0
                l_cls = classification_loss(head(hid[sel]), batch["labels"][sel],
                                            batch["kind"][sel], pw)
                l_lm = lm_loss(out.logits, batch["lm"])
                loss = l_lm + args["lambda_cls"] * l_cls
                acc.backward(loss)
                opt.step()  # accelerate's wrapper steps only at the accumulation boundary
                opt.zero_grad()
            window += torch.stack([loss, l_lm, l_cls]).detach().float()
            micro += 1
            if not acc.sync_gradients:
                continue
            step += 1
            # the step's losses: its micro-batches, averaged over the processes too
            parts = acc.reduce(window / micro, "mean")
            window.zero_()
            micro = 0
            hist.append({"step": step, "loss": float(parts[0]), "lm": float(parts[1]),
                         "cls": float(parts[2])})
            bar.set_postfix(lm=f"{hist[-1]['lm']:.3f}", cls=f"{hist[-1]['cls']:.3f}")
            if max_steps and step >= max_steps:
                break
        if max_steps and step >= max_steps:
            break
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return {}
    out_dir = Path(args["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    m = acc.unwrap_model(model)
    h = acc.unwrap_model(head)
    if args["mode"] == "lora":
        m.save_pretrained(out_dir / "adapter")
        m = m.merge_and_unload()
    m.eval()
    m.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    # Held-out metrics with the trained model's own hidden states.
    ev = extract_features(m, tok, held, taxonomy, [args["layer"]], args["max_length"],
                          args["batch_size"], log, "heldout")
    head_obj, metrics = finish_head(h.weight.detach().float().cpu(),
                                    h.bias.detach().float().cpu(), ev, taxonomy, args,
                                    args["layer"], log)
    metrics["train_history"] = hist[-50:]
    if ext is not None:
        ex = extract_features(m, tok, ext, taxonomy, [args["layer"]], args["max_length"],
                              args["batch_size"], log, "external")
        metrics["external_prompt_only"] = head_external_metrics(head_obj, ex)
    metrics["data"] = {"train_conversations": len(encs), "heldout_conversations": len(ev.meta),
                       "steps": step, "lm_targets": args["lm_targets"],
                       # the optimizer step's batch: batch_size x grad_accum x processes
                       "processes": acc.num_processes,
                       "grad_accum": acc.gradient_accumulation_steps}
    extra = {"recipe": _recipe(args),
             "base_model": str(args["model"]), "mode": args["mode"],
             "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_checkpoint(head_obj, metrics, out_dir, {**head_obj.extra, **extra},
                     self_check_model=out_dir, log=log, dtype=args["dtype"], model=m, tok=tok)
    return metrics


def recalibrate(model_dir: Path, head_dir: Path, eval_data, out: Path, *, target_fpr: float,
                tau: int = 3, max_length: int = 512, batch_size: int = 16, seed: int = 0,
                log=print) -> dict:
    """New thresholds for a trained head at another benign budget, without retraining.

    ``model_dir`` is the LM the head reads (the base model for a head-only checkpoint, the
    merged model for LoRA). Held-out features are extracted once, then ``finish_head`` runs as
    at the end of training: only the thresholds and the training fold of the prompt verdict
    move (a second fold is one more shift along the prompt-end read-out, re-estimated on these
    features), and the metrics are re-measured at the new operating point. The head's
    ``operating_point`` (an exact prompt offset, tau, alert band from ``train
    operating-point``) is dropped: it belonged to the old thresholds; the new one records the
    tau calibrated here. Writes ``<out>/safety_head/``; a
    LoRA ``adapter/`` beside ``head_dir``'s head is copied along.
    """
    from safeserve.models.checkpoint import load_safety_head

    head = load_safety_head(head_dir)
    if head.attribution is not None:
        raise ValueError(f"the head in {head_dir} has an attribution read-out: recalibrate the "
                         "head without it, then run `train attribution` again")
    if head.prompt is not None:
        raise ValueError(f"the head in {head_dir} has a separate prompt read-out, calibrated "
                         "against its thresholds: recalibrate the head it was fitted for, then "
                         "run `train prompt-head` again")
    taxonomy = head.taxonomy
    try:
        copy_lm = check_lm_carried(head, Path(head_dir), Path(out))
    except ValueError as exc:
        raise TrainInputError(str(exc)) from None
    # the held-out rows, and their two prompt groups, before the model loads
    held = check_heldout(eval_data, model_dir, taxonomy, max_length)
    model, tok = load_lm(Path(model_dir))
    model.eval()
    ev = extract_features(model, tok, held, taxonomy, [head.layer], max_length, batch_size, log,
                          "heldout")
    args = {"tau": tau, "target_fpr": target_fpr, "seed": seed, "prompt_offset": True}
    new_head, metrics = finish_head(head.weight.float(), head.bias.float(), ev, taxonomy, args,
                                    head.layer, log, mlp=head.mlp)
    metrics["recalibrated_from"] = {"head": str(head_dir), "target_fpr": target_fpr,
                                    "previous_served_thresholds": {
                                        c.id: c.threshold for c in taxonomy.categories}}
    # A fresh operating point: the old one's exact prompt offset (if any) would count twice
    # on top of the fold calibrated here from the raw logits, and its tau / band were chosen
    # for the old thresholds.
    extra = {k: v for k, v in head.extra.items() if k != OPERATING_POINT}
    if OPERATING_POINT in head.extra:
        metrics["recalibrated_from"]["dropped_operating_point"] = head.extra[OPERATING_POINT]
    write_checkpoint(new_head, metrics, Path(out), {**extra, **new_head.extra,
                                                     "recalibrated": args},
                     self_check_model=Path(model_dir), log=log)
    carry_lm(Path(head_dir), Path(out), copy_lm)
    return metrics


class TrainInputError(ValueError):
    """Bad options or data, found before the model loads: one line for the user."""


def check_options(args: dict) -> None:
    """Numbers and choices, before anything loads (a bad one would otherwise surface after the
    whole fit, or as a KeyError)."""
    if args["dtype"] not in _DTYPES:
        raise TrainInputError(f"--dtype must be one of {', '.join(_DTYPES)}, not {args['dtype']!r}")
    if args["mode"] not in ("head", "lora", "full"):
        raise TrainInputError(f"--mode must be head, lora or full, not {args['mode']!r}")
    if int(args["tau"]) < 1:
        raise TrainInputError("--tau must be at least 1")
    if not 0.0 < float(args["target_fpr"]) < 1.0:
        raise TrainInputError("--target-fpr must lie in (0, 1)")
    if not 0.0 <= float(args.get("lora_dropout", 0.05)) < 1.0:
        raise TrainInputError("--lora-dropout must lie in [0, 1)")
    for name in ("epochs", "batch_size", "head_batch_size", "max_length", "grad_accum"):
        if int(args.get(name, 1)) < 1:
            raise TrainInputError(f"--{name.replace('_', '-')} must be at least 1")
    probe = str(args.get("probe_layers") or "")
    if probe and not all(p.strip().lstrip("-").isdigit() for p in probe.split(",")):
        raise TrainInputError(f"--probe-layers takes comma-separated layer numbers, not {probe!r}")
    if args.get("out") and args.get("model") and (
            Path(args["out"]).resolve() == Path(args["model"]).resolve()):
        raise TrainInputError("--out is --model: write the checkpoint to another directory "
                              "(it would overwrite the model it reads)")
    external = args.get("external_eval")
    if external and not Path(external).is_file():
        raise TrainInputError(f"--external-eval {external}: no such file")
    if args.get("init_head"):
        from safeserve.models.safety_head_fit import frozen_linear

        try:
            frozen_linear(args["init_head"])  # exists, linear, no prompt read-out
        except (ValueError, OSError) as exc:
            raise TrainInputError(f"--init-head: {exc}") from None


def check_data(args: dict, taxonomy: Taxonomy, log=print) -> None:
    """Read the data once before the model loads: row errors, and a held-out set that cannot
    be split into a calibration half and a report half (it needs two prompt groups), fail
    now, not after the fit."""
    from transformers import AutoTokenizer

    try:
        train, held = split_data(args["data"], args.get("eval_data"), taxonomy, args["seed"])
        tok = AutoTokenizer.from_pretrained(str(args["model"]))
    except (ValueError, OSError) as exc:  # a bad row or file; no tokenizer at --model
        raise TrainInputError(str(exc)) from None
    # What survives encoding at --max-length is what trains and calibrates.
    quiet = lambda *a, **k: None  # noqa: E731 - the real run logs the skips
    _, train = encode_all(train, tok, taxonomy, args["max_length"], quiet)
    _, held = encode_all(held, tok, taxonomy, args["max_length"], quiet)
    if not train:
        raise TrainInputError(f"no training rows left at --max-length {args['max_length']}")
    external = args.get("external_eval")
    if external:
        # lora / full read it after the fit (and the model's save): a bad file fails now
        try:
            ext = load_trajectories(external, taxonomy)
        except (ValueError, OSError) as exc:  # a bad row (file:line), an empty file
            raise TrainInputError(f"--external-eval: {exc}") from None
        if not encode_all(ext, tok, taxonomy, args["max_length"], quiet)[1]:
            raise TrainInputError(f"--external-eval {external}: no rows left at --max-length "
                                  f"{args['max_length']} (every prompt is longer)")
    if paths_of(args.get("eval_data")):
        # The same prompt on both sides: held-out metrics and calibration partly measure
        # training conversations. (Group ids are per file, so it is the text that is compared.)
        shared = {t.user_text for t in held} & {t.user_text for t in train}
        if shared:
            log(f"warning: {len(shared)} prompt(s) of --eval-data are also in --data (e.g. "
                f"{sorted(shared)[0][:80]!r}): the held-out metrics include training prompts")
    where = ("--eval-data" if paths_of(args.get("eval_data"))
             else "the held-out 20% of --data's prompt groups")
    need_two_groups(held, where, "more data, or an --eval-data file")


def need_two_groups(held: list, where: str, hint: str) -> None:
    """Calibration and the report each take half of the held-out prompt groups
    (``safety_calibration.split_groups``): fewer than two leaves a half empty."""
    groups = {t.group or t.user_text for t in held}
    if len(groups) < 2:
        raise TrainInputError(f"{where} has {len(groups)} prompt group(s): calibration and the "
                              f"report need at least two ({hint})")


def check_heldout(eval_data, model_dir, taxonomy: Taxonomy, max_length: int) -> list:
    """``train calibrate``'s held-out rows, read and checked before the model loads: row
    errors, and fewer than two prompt groups left at ``max_length``."""
    from transformers import AutoTokenizer

    try:
        held = [t for p in paths_of(eval_data) for t in load_trajectories(p, taxonomy)]
    except (ValueError, OSError) as exc:  # a bad row (file:line), an empty or missing file
        raise TrainInputError(f"--eval-data: {exc}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (ValueError, OSError) as exc:
        raise TrainInputError(f"--model {model_dir}: {exc}") from None
    _, kept = encode_all(held, tok, taxonomy, max_length, lambda *a, **k: None)
    where = ("--eval-data" if len(kept) == len(held)
             else f"--eval-data at --max-length {max_length}")
    need_two_groups(kept, where, "more --eval-data rows")
    return held


def train_safety(args: dict, log=print) -> dict:
    """Entry point shared by the CLI and the tests (``args`` mirrors the CLI options)."""
    defaults = {"eval_data": None, "external_eval": None, "mode": "head", "lambda_cls": 0.1,
                "epochs": 30, "lr": None, "head_lr": 1e-3, "batch_size": 16,
                "head_batch_size": 4096, "max_length": 512, "layer": -1, "probe_layers": "",
                "tau": 3, "target_fpr": 0.05, "prompt_offset": True, "seed": 0, "weight_decay": 1e-3,
                "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "grad_accum": 1,
                "head_only": False, "cache_dir": None,
                "max_steps": 0, "taxonomy": None, "dtype": "float32", "lm_targets": "safe",
                "mlp_units": 0, "mlp_gate": False, "init_head": None,
                "keep_thresholds": False}
    args = {**defaults, **{k: v for k, v in args.items() if v is not None}}
    if args["lr"] is None:
        args["lr"] = 2e-3 if args["mode"] == "head" else 2e-4
    try:
        taxonomy = Taxonomy.load(args["taxonomy"]) if args["taxonomy"] else Taxonomy.load()
    except (ValueError, OSError) as exc:
        raise TrainInputError(f"--taxonomy: {exc}") from None
    if args["layer"] != -1:
        raise TrainInputError(f"--layer {args['layer']}: the server serves heads on the final "
                              "hidden state (-1) only; compare layers with --probe-layers or "
                              "`safeserve train probe-layers`")
    if args["lm_targets"] not in LM_TARGETS:
        raise TrainInputError(f"lm_targets must be one of {LM_TARGETS}, not {args['lm_targets']!r}")
    if (args["mlp_units"] or args["mlp_gate"] or args["init_head"]) and args["mode"] != "head":
        raise TrainInputError("--mlp-units, --mlp-gate and --init-head are for head mode; "
                              "lora/full train a linear head")
    if args["mlp_gate"] and not args["mlp_units"]:
        raise TrainInputError("--mlp-gate gates the MLP: give --mlp-units too")
    if args["init_head"] and not args["mlp_units"]:
        raise TrainInputError("--init-head keeps that head's linear part frozen and trains an "
                              "MLP beside it: give --mlp-units")
    if args["keep_thresholds"] and not args["init_head"]:
        raise TrainInputError("--keep-thresholds keeps --init-head's operating point: give it")
    check_options(args)
    check_data(args, taxonomy, log)
    if args["mode"] == "head":
        return run_head_mode(args, taxonomy, log)
    return run_adapter_mode(args, taxonomy, log)  # lora | full (check_options)


if __name__ == "__main__":  # for `accelerate launch -m safeserve.models.safety_train ...`
    import typer

    from safeserve.models.safety_train_cli import register

    _app = typer.Typer()
    register(_app)
    _app()
