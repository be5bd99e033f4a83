"""Loading a safety head refuses what it would otherwise serve wrongly or silently weaker: a
tensor its declared format does not read, non-finite weights, and operating-point values the
decision would take at face value (an overall threshold outside (0, 1), a tau outside [1, 16])."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from safeserve.models.checkpoint import CheckpointError, SafetyHead, load_safety_head
from safeserve.models.taxonomy import Taxonomy

HIDDEN = 8


def _head(tmp_path, **extra):
    tax = Taxonomy.load()
    g = torch.Generator().manual_seed(0)
    SafetyHead(torch.randn(tax.num_outputs, HIDDEN, generator=g),
               torch.zeros(tax.num_outputs), tax, extra=extra).save(tmp_path)
    return tmp_path / "safety_head"


def _edit_config(d, **fields):
    path = d / "head_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


def test_a_plain_head_loads(tmp_path):
    _head(tmp_path, overall_threshold=0.5, operating_point={"tau": 4})
    assert load_safety_head(tmp_path).weight.shape[1] == HIDDEN


@pytest.mark.parametrize("value", [1.5, 0.0, float("nan"), "0.5", True])
def test_an_overall_threshold_outside_zero_one_is_refused(tmp_path, value):
    d = _head(tmp_path)
    _edit_config(d, overall_threshold=value)
    with pytest.raises(CheckpointError, match="overall_threshold"):
        load_safety_head(tmp_path)


@pytest.mark.parametrize("tau", [0, 17, 1000000, None, 2.5, "4"])
def test_a_tau_outside_one_to_sixteen_is_refused(tmp_path, tau):
    d = _head(tmp_path)
    _edit_config(d, operating_point={"tau": tau})
    with pytest.raises(CheckpointError, match="tau"):
        load_safety_head(tmp_path)


def test_non_finite_weights_are_refused(tmp_path):
    d = _head(tmp_path)
    tensors = load_file(str(d / "head.safetensors"))
    tensors["weight"][0, 0] = float("nan")
    save_file(tensors, str(d / "head.safetensors"))
    with pytest.raises(CheckpointError, match=r"non-finite values in \['weight'\]"):
        load_safety_head(tmp_path)


def test_a_tensor_the_format_does_not_read_is_refused(tmp_path):
    """An MLP saved without `mlp_units` in the config would be served without its MLP."""
    d = _head(tmp_path)
    tensors = load_file(str(d / "head.safetensors"))
    tensors["mlp_up"] = torch.zeros(4, HIDDEN)
    save_file(tensors, str(d / "head.safetensors"))
    with pytest.raises(CheckpointError, match=r"does not read its tensors \['mlp_up'\]"):
        load_safety_head(tmp_path)


def test_a_dangling_safety_head_link_is_not_served_as_no_head(tmp_path):
    """--allow-unsafe serves a model that has no head; a head folder that went missing (a
    dangling link) is an error, never a model served without it."""
    from safeserve.server.launch import StartupError, resolve_spec
    from safeserve.server.settings import Settings

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                   "hidden_size": HIDDEN}))
    (model / "safety_head").symlink_to(tmp_path / "gone")
    with pytest.raises(StartupError, match="safety head"):
        resolve_spec(Settings(model=model, allow_unsafe=True))
