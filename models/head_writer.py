"""Writing a safety-head checkpoint: ``<out>/safety_head/`` with its metrics and, when the
model it reads is given, its self-check record; and the LM's files copied beside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safeserve.models.checkpoint import SafetyHead


def copy_model_files(src: Path, dst: Path) -> None:
    """Copy the LM's files (no symlinks) so the checkpoint is self-contained."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name, follow_symlinks=True)


def check_lm_carried(head: SafetyHead, head_dir: Path, out: Path) -> bool:
    """Whether a head derived from the one in ``head_dir`` and written to ``out`` must carry
    its LM along (``carry_lm``): a full-mode head reads its own fine-tuned LM, which only its
    checkpoint holds (there is no adapter), so a copy elsewhere would be served with the
    recorded base model. Raises, before anything is written, when that LM is not there."""
    if head.extra.get("mode") != "full" or Path(out).resolve() == Path(head_dir).resolve():
        return False
    if not (Path(head_dir) / "config.json").is_file():
        raise ValueError(f"the head in {head_dir} was trained in full mode, but {head_dir} "
                         "holds no model (its fine-tuned LM): use the checkpoint the "
                         "full-mode run wrote")
    return True


def carry_lm(head_dir: Path, out: Path, full_model: bool) -> None:
    """Copy what the served LM needs from ``head_dir`` to ``out``: its LoRA adapter (the
    server merges it into the base), or with ``full_model`` (``check_lm_carried``) the
    fine-tuned model's files."""
    if Path(out).resolve() == Path(head_dir).resolve():
        return
    adapter = Path(head_dir) / "adapter"
    if adapter.is_dir():
        shutil.copytree(adapter, Path(out) / "adapter", dirs_exist_ok=True)
    if full_model:
        copy_model_files(Path(head_dir), Path(out))


def write_checkpoint(head: SafetyHead, metrics: dict, out: Path, extra: dict,
                     self_check_model: Path | None = None, log=print, dtype: str = "float32",
                     model=None, tok=None) -> Path:
    """Write ``out/safety_head/``; with ``self_check_model`` (the LM the head reads, exactly
    as it will be served; ``model`` / ``tok`` when it is already loaded) also the head's
    self-check record (models/head_check.py). A record copied in ``extra`` from an earlier
    head is dropped: its logits are the old head's."""
    from safeserve.models.head_check import SELF_CHECK, record_self_check

    head.extra = {k: v for k, v in extra.items() if k != SELF_CHECK}
    head.validate()  # a head the loader would refuse is an error here, before it is written
    d = head.save(out)
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if self_check_model is not None:
        record_self_check(out, self_check_model, log, dtype=dtype, model=model, tok=tok)
    return d
