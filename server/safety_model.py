"""Worker side, part 1: the model class that computes the safety signal.

vLLM hands ``compute_logits`` the final hidden states of exactly the rows it samples this
step (one per running request: the last prompt position at prefill, the newest token while
decoding). The mixin runs the fused head kernel on them and leaves the scores in
``STEP_SIGNAL`` for the logits processor, which runs right after in the same process with
the same row order."""

from __future__ import annotations

import logging

import torch
from safeserve.kernels.safety_head import safety_scores
from safeserve.models.checkpoint import load_safety_head

log = logging.getLogger(__name__)


class StepSignal:
    """The scores of the current engine step, [N, K] float32 on the model's device ([N, 2K]
    for a head with a separate prompt read-out; the processor selects per row)."""

    def __init__(self):
        self.scores: torch.Tensor | None = None
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
        STEP_SIGNAL.num_outputs = head.weight.shape[0]  # K: the decision's width
        STEP_SIGNAL.output_names = head.taxonomy.output_names
        log.info("safety head: %d outputs over hidden size %d, residual MLP of %d units%s",
                 *head.weight.shape, head.mlp_units,
                 ", separate prompt read-out" if head.prompt is not None else "")

    def compute_logits(self, hidden_states: torch.Tensor, *args, **kwargs):
        STEP_SIGNAL.scores = safety_scores(hidden_states, self._safety_weight, self._safety_bias,
                                           mlp=self._safety_mlp)
        return super().compute_logits(hidden_states, *args, **kwargs)


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
