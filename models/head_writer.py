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
