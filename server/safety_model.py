"""Worker side, part 1: the model class that computes the safety signal.

vLLM hands ``compute_logits`` the final hidden states of exactly the rows it samples this
step (one per running request: the last prompt position at prefill, the newest token while
decoding). The mixin runs the fused head kernel on them and leaves the scores in
``STEP_SIGNAL`` for the logits processor, which runs right after in the same process with
the same row order.

A head whose prompt read-out reads a middle layer (checkpoint format 6) needs that layer's
state at the same rows. vLLM's models can hand over the residual stream after chosen layers
(the "auxiliary hidden states" EAGLE-3 drafting reads); the mixin asks for the one layer and
returns it beside the final state, [T, 2H], from ``forward``. The engine indexes the sampled
rows of that as of any hidden state, so ``compute_logits`` gets both halves, runs the head's
one launch over them and hands the LM head the first half."""

from __future__ import annotations

import logging
import time

import torch
from safeserve.kernels.safety_head import safety_scores
from safeserve.models.checkpoint import CheckpointError, load_safety_head

log = logging.getLogger(__name__)


class StepSignal:
    """The scores of the current engine step, [N, K] float32 on the model's device ([N, 2K]
    for a head with a separate prompt read-out; the processor selects per row)."""

    def __init__(self):
        self.scores: torch.Tensor | None = None
        self.head_seconds = 0.0  # host time of the step's head (safety_scores), for the metric
        self.num_outputs: int | None = None
        self.output_names: tuple[str, ...] = ()

    def take(self, num_rows: int) -> torch.Tensor:
        """[N, K], or [N, 2K] for a head with a prompt read-out (select_prompt_rows)."""
        scores, self.scores = self.scores, None
        if scores is None or scores.shape[0] != num_rows:
            got = None if scores is None else tuple(scores.shape)
            raise RuntimeError(f"safety signal has shape {got} for a batch of {num_rows} rows")
        return scores


STEP_SIGNAL = StepSignal()


class SafetyHeadMixin:
    """Adds the safety head to a vLLM causal-LM class (``compute_logits`` hook)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        head = load_safety_head(vllm_config.model_config.model)
        head.validate(vllm_config.model_config.get_hidden_size())
        device = next(self.parameters()).device
        # A head with a separate prompt read-out runs both in the one launch: [N, 2K] scores,
        # the worker keeps the read-out's at prompt rows (kernels/safety_head.select_prompt_rows).
        weight, bias, mlp = head.served_tensors()
        # Buffers, not parameters: vLLM's weight loader only walks parameters.
        self.register_buffer("_safety_weight", weight.to(device), persistent=False)
        self.register_buffer("_safety_bias", bias.to(device), persistent=False)
        self._safety_mlp = None
        if mlp is not None:
            names = ("_safety_mlp_up", "_safety_mlp_up_bias", "_safety_mlp_down", "_safety_mlp_gate")
            for name, t in zip(names, mlp):
                self.register_buffer(name, t.to(device), persistent=False)
            self._safety_mlp = tuple(getattr(self, n) for n in names[:len(mlp)])
        self._safety_hidden = head.hidden_size
        self._safety_layer = head.prompt_layer
        if head.prompt_layer is not None:
            _ask_for_layer(self, head.prompt_layer, vllm_config)
        STEP_SIGNAL.num_outputs = head.weight.shape[0]  # K: the decision's width
        STEP_SIGNAL.output_names = head.taxonomy.output_names
        log.info("safety head: %d outputs over hidden size %d, residual MLP of %d units%s",
                 *head.weight.shape, head.mlp_units,
                 "" if head.prompt is None else ", separate prompt read-out" + (
                     f" at layer {head.prompt_layer}" if head.prompt_layer is not None else ""))

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self._safety_layer is None:
            return out
        # Exactly (final, [the one layer asked for]); anything else would have the head read
        # the wrong rows or fail later as a shape mismatch that names nothing.
        if not (isinstance(out, tuple) and len(out) == 2 and len(out[1]) == 1
                and tuple(self.model.aux_hidden_state_layers) == (self._safety_layer,)):
            raise RuntimeError(
                f"the model did not return layer {self._safety_layer}'s hidden state beside its "
                f"output (auxiliary layers {getattr(self.model, 'aux_hidden_state_layers', None)}"
                "): speculative decoding that reads auxiliary states is not supported with a "
                "middle-layer prompt read-out")
        return torch.cat([out[0], out[1][0]], -1)

    def compute_logits(self, hidden_states: torch.Tensor, *args, **kwargs):
        t0 = time.perf_counter()
        STEP_SIGNAL.scores = safety_scores(hidden_states, self._safety_weight, self._safety_bias,
                                           mlp=self._safety_mlp)
        STEP_SIGNAL.head_seconds = time.perf_counter() - t0
        if self._safety_layer is not None:
            hidden_states = hidden_states[:, :self._safety_hidden]
        return super().compute_logits(hidden_states, *args, **kwargs)


def _ask_for_layer(causal_lm, layer: int, vllm_config) -> None:
    """Have the decoder stack return the residual stream after ``layer`` decoder layers
    beside its output (vLLM's auxiliary hidden states; index = layers run, as transformers'
    ``hidden_states``)."""
    stack = getattr(causal_lm, "model", None)
    num_layers = vllm_config.model_config.hf_config.num_hidden_layers
    if not 1 <= layer < num_layers:
        raise CheckpointError(f"safety head's prompt read-out reads layer {layer}; this model "
                              f"has {num_layers} decoder layers (want 1..{num_layers - 1})")
    if not hasattr(stack, "_set_aux_hidden_state_layers"):
        raise CheckpointError(f"{type(causal_lm).__name__} cannot hand over a middle layer's "
                              "hidden state: serve a head whose prompt read-out reads the final one")
    stack._set_aux_hidden_state_layers((layer,))


# Architectures we wrap: registered as "SafeServe<Arch>" by the vLLM plugin.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "vllm.model_executor.models.llama",
    "MistralForCausalLM": "vllm.model_executor.models.mistral",
    "Qwen2ForCausalLM": "vllm.model_executor.models.qwen2",
    "Qwen3ForCausalLM": "vllm.model_executor.models.qwen3",
}


def __getattr__(name: str):
    """Build ``SafeServe<Arch>`` classes on first use (vLLM resolves them by name)."""
    if name.startswith("SafeServe") and name[9:] in SUPPORTED_ARCHITECTURES:
        import importlib

        base_name = name[9:]
        base = getattr(importlib.import_module(SUPPORTED_ARCHITECTURES[base_name]), base_name)
        cls = type(name, (SafetyHeadMixin, base), {"__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(name)
