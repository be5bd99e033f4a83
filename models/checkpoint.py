"""Safety checkpoint format.

A safety checkpoint is a Hugging Face model directory (plain transformers still loads the LM)
with a ``safety_head/`` folder beside the weights:

    <checkpoint>/
      config.json, model.safetensors, tokenizer files ...   the language model
      safety_head/
        head.safetensors     weight [K, H] float32, bias [K] float32; K = categories + 1;
                             optional residual MLP: mlp_up [M, H], mlp_up_bias [M],
                             mlp_down [K, M] and, for a gated one, mlp_gate [H + 1]
                             (format 2; see kernels/safety_head.py)
        head_config.json     {"format_version", "hidden_size", "layer", "taxonomy_sha", ...,
                             "operating_point": {"tau", "prompt_logit_offset", ...}}
                             (format 3: a nonzero prompt offset, with or without the MLP)
                             optional prompt read-out: prompt_weight [K, H], prompt_bias [K]
                             (format 4: it judges prompt ends; format 5: a prompt end is
                             flagged when it or the head's own verdict flags it; format 6:
                             the read-out reads a middle layer, "prompt_layer", and
                             "prompt_either" says which of the two rules it follows)
                             optional attribution read-out: attribution_weight [C, H],
                             attribution_bias [C], C = categories (format 7, beside any of
                             the above; "has_prompt_readout" says whether a prompt read-out
                             is there): under an allow-list, the category the overall output
                             acts for, named once per request at its prompt end
                             optional topic gate: topic_weight [C, H], topic_bias [C]
                             (format 8, beside the attribution read-out): under an allow-list,
                             a category the request does not allow whose topic logit is >= 0
                             (its threshold folded into the bias) flags the prompt
                             (format 10: any of the above, its layout in its config as
                             format 7 writes it, and an operating point naming how the prompt
                             of a request without an allow-list is judged: the own overall
                             output and a shifted read-out, models/decision_defaults.py)
        taxonomy.yaml        category ids, definitions, default thresholds (head row order)
        metrics.json         held-out metrics written by the training job (optional)
      adapter/               optional PEFT LoRA adapter the LM was trained with

``layer`` is the hidden state the head reads: -1 is the final (post-norm) hidden state, the
input of the LM head, which is what vLLM hands to ``compute_logits`` for the sampled rows.
``prompt_layer`` (format 6) is the residual stream after that many decoder layers, transformers'
``hidden_states[prompt_layer]``: the server has the model hand it over beside the final state
(vLLM's auxiliary hidden states, server/safety_model.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from safeserve.models.taxonomy import Taxonomy

HEAD_DIR = "safety_head"
FORMAT_VERSION = 1  # linear heads
FORMAT_VERSION_MLP = 2  # heads with the residual MLP: older readers must refuse them
# Heads with an exact prompt offset (operating_point.prompt_logit_offset, linear or MLP): a
# reader that ignored it would serve the prompt verdict at the wrong operating point.
FORMAT_VERSION_OFFSET = 3
# Heads with a separate prompt read-out (prompt_weight [K, H], prompt_bias [K]; models/
# prompt_head.py): a reader that ignored it would judge prompts with the response head.
FORMAT_VERSION_PROMPT = 4
# The read-out added to the head's own prompt verdict (flag when either does): a format-4
# reader would drop the head's verdict and pass prompts only the head flags.
FORMAT_VERSION_PROMPT_EITHER = 5
# The read-out reads a middle layer's hidden state: a format-5 reader would feed it the final one.
FORMAT_VERSION_PROMPT_LAYER = 6
# A category read-out that names, per request, the category the overall output acts for under
# an allow-list: a format-6 reader would leave the overall output attributed token by token.
FORMAT_VERSION_ATTRIBUTION = 7
# A per-category topic gate beside the attribution read-out: a format-7 reader would answer
# allow-listed requests whose topic the request does not allow.
FORMAT_VERSION_TOPIC = 8
# The gate's operating point (``operating_point.topic_gate_shift``, and
# ``gate_replaces_prompt_categories``, models/decision_defaults.py): a format-8 reader would
# serve the gate at its trained thresholds and keep the per-category outputs at gated prompts.
FORMAT_VERSION_TOPIC_POINT = 9
# The prompt rule of requests without an allow-list (``operating_point.no_allowlist_prompt_own``
# and ``no_allowlist_readout_shift``): a format-9 reader would judge their prompts by every own
# output and the read-out unshifted. Any layout; its config says which (as format 7's does).
FORMAT_VERSION_NO_ALLOWLIST_POINT = 10
# A prompt veto (models/prompt_veto.py): a one-output read-out that a prompt must also pass to
# be flagged. A format-10 reader would flag the ordinary prompts the veto clears. Any layout
# beside it; its tensors and config say which (as format 10's).
FORMAT_VERSION_PROMPT_VETO = 11
FORMAT_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_MLP, FORMAT_VERSION_OFFSET,
                   FORMAT_VERSION_PROMPT, FORMAT_VERSION_PROMPT_EITHER, FORMAT_VERSION_PROMPT_LAYER,
                   FORMAT_VERSION_ATTRIBUTION, FORMAT_VERSION_TOPIC, FORMAT_VERSION_TOPIC_POINT,
                   FORMAT_VERSION_NO_ALLOWLIST_POINT, FORMAT_VERSION_PROMPT_VETO)
PROMPT_FORMATS = (FORMAT_VERSION_PROMPT, FORMAT_VERSION_PROMPT_EITHER, FORMAT_VERSION_PROMPT_LAYER)
PROMPT_TENSORS = ("prompt_weight", "prompt_bias")
ATTRIBUTION_TENSORS = ("attribution_weight", "attribution_bias")
TOPIC_TENSORS = ("topic_weight", "topic_bias")
VETO_TENSORS = ("veto_weight", "veto_bias")
# A veto logit that no threshold's logit reaches: a threshold of 1.0 (nothing flags) keeps
# its output's cap out of reach.
_MAX_THRESHOLD_LOGIT = 30.0
# The serving kernel writes sigmoid scores; the read-out's logits are served divided by this, so
# that large logits stay apart in float32 (sigmoid(17) already rounds to 1.0) and the argmax the
# worker takes over the scores is the argmax of the logits.
ATTRIBUTION_SERVED_SCALE = 8.0
MLP_TENSORS = ("mlp_up", "mlp_up_bias", "mlp_down")
MLP_GATE = "mlp_gate"  # optional fourth tensor: the MLP is scaled by clamp(1 - (v.h + c), 0, 1)


class CheckpointError(ValueError):
    """A safety checkpoint that is missing, malformed or does not fit the model."""


@dataclass
class SafetyHead:
    weight: torch.Tensor  # [K, H] float32
    bias: torch.Tensor  # [K] float32
    taxonomy: Taxonomy
    layer: int = -1
    extra: dict = field(default_factory=dict)  # recipe, base model, metrics summary
    mlp: tuple[torch.Tensor, ...] | None = None  # (up, up_bias, down[, gate])
    prompt: tuple[torch.Tensor, torch.Tensor] | None = None  # the prompt rows' (weight, bias)
    # With a read-out: False, it alone judges prompt ends; True, it is added to the head's own
    # prompt verdict (per output, the larger logit; both folded against the same thresholds).
    prompt_either: bool = False
    # The read-out's input: None, the final hidden state (as the head's); L, the residual
    # stream after L decoder layers (transformers' hidden_states[L]).
    prompt_layer: int | None = None
    # Format 7: (weight [C, H], bias [C]) over the final state at the prompt end, one row per
    # category (no overall row). Under an allow-list the overall output acts for the category
    # it scores highest, for the whole request (server/safety_processor.attribute_overall).
    attribution: tuple[torch.Tensor, torch.Tensor] | None = None
    # Format 8: (weight [C, H], bias [C]) over the same final state, thresholds folded into the
    # bias (a category's gate is open at logit >= 0). Under a non-empty allow-list a category
    # the request does not allow whose logit is >= 0 flags the prompt (models/topic_gate.py).
    topic: tuple[torch.Tensor, torch.Tensor] | None = None
    # Format 11: (weight [1, W], bias [1]) over the rows the serving kernel reads at a prompt
    # end (``served_hidden``: W = H, or 2H with a ``prompt_layer``), its threshold folded into
    # the bias. A prompt whose veto logit is below 0 is not flagged by the harm outputs: each
    # output's prompt logit is capped at the veto logit plus that output's threshold logit
    # (``veto_logits``), an AND of the two verdicts at the head's own thresholds.
    veto: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def mlp_units(self) -> int:
        return 0 if self.mlp is None else int(self.mlp[0].shape[0])

    @property
    def format_version(self) -> int:
        from safeserve.models.decision_defaults import OPERATING_POINT, PROMPT_LOGIT_OFFSET

        if self.veto is not None:
            return FORMAT_VERSION_PROMPT_VETO
        if self.no_allowlist_rule != ("all", 0.0):
            return FORMAT_VERSION_NO_ALLOWLIST_POINT
        if self.topic is not None:
            return FORMAT_VERSION_TOPIC_POINT if self.has_gate_point else FORMAT_VERSION_TOPIC
        if self.attribution is not None:
            return FORMAT_VERSION_ATTRIBUTION
        if self.prompt is not None and self.prompt_layer is not None:
            return FORMAT_VERSION_PROMPT_LAYER
        if self.prompt is not None:
            return FORMAT_VERSION_PROMPT_EITHER if self.prompt_either else FORMAT_VERSION_PROMPT
        # Any value but 0 needs a reader that knows the offset (which also validates it).
        if (self.extra.get(OPERATING_POINT) or {}).get(PROMPT_LOGIT_OFFSET, 0) != 0:
            return FORMAT_VERSION_OFFSET
        return FORMAT_VERSION if self.mlp is None else FORMAT_VERSION_MLP

    @property
    def has_gate_point(self) -> bool:
        """Whether the operating point moves the topic gate or what it replaces (format 9)."""
        from safeserve.models.decision_defaults import (gate_replaces_prompt_categories,
                                                        topic_gate_shift)

        return topic_gate_shift(self.extra) != 0 or gate_replaces_prompt_categories(self.extra)

    @property
    def no_allowlist_rule(self) -> tuple[str, float]:
        """How the prompt of a request without an allow-list is judged: ("all", 0.0), as every
        other request's, or ("overall", shift): the own overall output beside the read-out
        moved by ``shift`` logits (models/decision_defaults.no_allowlist_prompt_rule)."""
        from safeserve.models.decision_defaults import no_allowlist_prompt_rule

        return no_allowlist_prompt_rule(self.extra)

    @property
    def gate_replaces_prompt_categories(self) -> bool:
        from safeserve.models.decision_defaults import gate_replaces_prompt_categories

        return gate_replaces_prompt_categories(self.extra)

    def _topic_bias(self) -> torch.Tensor:
        """The gate's bias at its operating point: a shift of d logits closes it d further."""
        from safeserve.models.decision_defaults import topic_gate_shift

        return self.topic[1].float() - topic_gate_shift(self.extra)

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def validate(self, hidden_size: int | None = None, num_layers: int | None = None) -> None:
        """``num_layers``: the model's decoder layers, when known (a ``prompt_layer`` must be
        below it: the last index of transformers' ``hidden_states`` is the normed final state,
        which vLLM's auxiliary states never are)."""
        from safeserve.kernels.safety_decision import MAX_DECISION_CATEGORIES

        k = self.taxonomy.num_outputs
        if k > MAX_DECISION_CATEGORIES:  # the decision keeps one bit per output in an int32
            raise CheckpointError(f"safety head has {k} outputs; the decision takes at most "
                                  f"{MAX_DECISION_CATEGORIES}")
        if self.weight.ndim != 2 or self.weight.shape[0] != k:
            raise CheckpointError(
                f"safety head has {tuple(self.weight.shape)} weights but the taxonomy needs "
                f"{k} rows ({len(self.taxonomy.categories)} categories + overall)"
            )
        if self.bias.shape != (k,):
            raise CheckpointError(f"safety head bias has shape {tuple(self.bias.shape)}, want ({k},)")
        if self.mlp is not None:
            up, up_bias, down = self.mlp[:3]
            m = up.shape[0]
            if len(self.mlp) == 4 and self.mlp[3].shape != (self.hidden_size + 1,):
                raise CheckpointError(f"safety head MLP gate has shape {tuple(self.mlp[3].shape)}, "
                                      f"want ({self.hidden_size + 1},)")
            if up.shape != (m, self.hidden_size) or up_bias.shape != (m,) or down.shape != (k, m):
                raise CheckpointError(
                    f"safety head MLP has up {tuple(up.shape)}, up_bias {tuple(up_bias.shape)}, "
                    f"down {tuple(down.shape)}; want ({m}, {self.hidden_size}), ({m},), ({k}, {m})"
                )
        if self.prompt is not None and (self.prompt[0].shape != self.weight.shape
                                        or self.prompt[1].shape != (k,)):
            raise CheckpointError(
                f"safety head prompt read-out has {tuple(self.prompt[0].shape)} weights and "
                f"{tuple(self.prompt[1].shape)} biases; want {tuple(self.weight.shape)}, ({k},)")
        c = len(self.taxonomy.categories)
        if self.attribution is not None and (self.attribution[0].shape != (c, self.hidden_size)
                                             or self.attribution[1].shape != (c,)):
            raise CheckpointError(
                f"safety head attribution read-out has {tuple(self.attribution[0].shape)} weights "
                f"and {tuple(self.attribution[1].shape)} biases; want ({c}, {self.hidden_size}), "
                f"({c},)")
        if self.topic is not None and (self.attribution is None
                                       or self.topic[0].shape != (c, self.hidden_size)
                                       or self.topic[1].shape != (c,)):
            raise CheckpointError(
                f"safety head topic gate has {tuple(self.topic[0].shape)} weights and "
                f"{tuple(self.topic[1].shape)} biases; want ({c}, {self.hidden_size}), ({c},), "
                "beside an attribution read-out")
        try:
            gate_point = self.has_gate_point
        except ValueError as e:
            raise CheckpointError(f"safety head: {e}") from None
        try:
            no_allowlist_rule = self.no_allowlist_rule
        except ValueError as e:
            raise CheckpointError(f"safety head: {e}") from None
        if no_allowlist_rule != ("all", 0.0) and (self.prompt is None
                                                       or not self.prompt_either):
            raise CheckpointError("safety head's operating point sets the prompt rule of "
                                  "requests without an allow-list (no_allowlist_prompt_own, "
                                  "no_allowlist_readout_shift), which needs a prompt read-out "
                                  "beside the head's own verdict (prompt_either)")
        width = self.hidden_size * (1 if self.prompt_layer is None else 2)
        if self.veto is not None and (self.veto[0].shape != (1, width)
                                      or self.veto[1].shape != (1,)):
            raise CheckpointError(
                f"safety head prompt veto has {tuple(self.veto[0].shape)} weights and "
                f"{tuple(self.veto[1].shape)} biases; want (1, {width}), (1,)")
        if gate_point and self.topic is None:
            raise CheckpointError("safety head's operating point moves a topic gate it does not "
                                  "have (topic_gate_shift, gate_replaces_prompt_categories)")
        if self.prompt_layer is not None and (
                self.prompt is None or isinstance(self.prompt_layer, bool)
                or not isinstance(self.prompt_layer, int) or self.prompt_layer < 1):
            raise CheckpointError(f"safety head prompt_layer {self.prompt_layer!r}: want a "
                                  "decoder layer count >= 1, with a prompt read-out")
        if (self.prompt_layer is not None and isinstance(num_layers, int)
                and self.prompt_layer >= num_layers):
            raise CheckpointError(f"safety head's prompt read-out reads layer "
                                  f"{self.prompt_layer}; this model has {num_layers} decoder "
                                  f"layers (want 1..{num_layers - 1})")
        if hidden_size is not None and self.hidden_size != hidden_size:
            raise CheckpointError(
                f"safety head reads hidden size {self.hidden_size} but the model's is {hidden_size}"
            )
        if self.layer != -1:
            raise CheckpointError(
                f"safety head reads layer {self.layer}; the server serves heads on layer -1 only"
            )

    def served_tensors(self) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """(weight, bias, mlp) as the serving kernel runs them: with a prompt read-out, its
        K rows follow the head's K (the MLP adds nothing to them), and the worker judges
        prompt rows by the second half, or by the larger of the two halves
        (``prompt_either``; kernels/safety_head.select_prompt_rows). With a ``prompt_layer``
        the kernel reads ``served_hidden``'s [N, 2H] rows (final state, then the middle
        layer's), so every tensor is zero-padded to that width: the head's rows read only the
        first half, the read-out's only the second, still one launch."""
        weight, bias, mlp = self._served_prompt_tensors()
        if self.attribution is not None:
            weight, bias, mlp = self._with_attribution(weight, bias, mlp)
        if self.veto is None:
            return weight, bias, mlp
        k = self.taxonomy.num_outputs
        veto_w = self.veto[0].float().expand(k, -1)
        veto_b = self.veto[1].float() + self.veto_offsets()
        if mlp is not None:  # the MLP adds nothing to the veto's columns
            mlp = (mlp[0], mlp[1], torch.cat([mlp[2], torch.zeros(k, mlp[2].shape[1])]),
                   *mlp[3:])
        return torch.cat([weight, veto_w]), torch.cat([bias, veto_b]), mlp

    def veto_offsets(self) -> torch.Tensor:
        """[K]: per output, its served threshold's logit less the prompt offset: a veto
        column's logit, offset at the prompt row as every prompt score is, then reaches the
        output's threshold exactly when the veto logit reaches 0."""
        from safeserve.models.decision_defaults import prompt_logit_offset

        served = torch.tensor([c.threshold for c in self.taxonomy.categories]
                              + [float(self.extra.get("overall_threshold", 0.5))],
                              dtype=torch.float64)
        logit = (torch.log(served) - torch.log1p(-served)).clamp(max=_MAX_THRESHOLD_LOGIT)
        return (logit - prompt_logit_offset(self.extra)).float()

    def veto_logits(self, served_rows: torch.Tensor) -> torch.Tensor:
        """[N, W] rows as the kernel reads them (``served_hidden``) -> [N, K]: the cap each
        output's prompt logit (before the prompt offset) meets under the veto."""
        if self.veto is None:
            raise ValueError("this safety head has no prompt veto")
        v = served_rows.float() @ self.veto[0].T + self.veto[1]
        return v + self.veto_offsets()

    def _with_attribution(self, weight: torch.Tensor, bias: torch.Tensor,
                          mlp: tuple | None) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        attr_w = self.attribution[0] / ATTRIBUTION_SERVED_SCALE
        attr_b = self.attribution[1] / ATTRIBUTION_SERVED_SCALE
        if self.topic is not None:  # [C attribution | C topic], both over the final state
            attr_w = torch.cat([attr_w, self.topic[0] / ATTRIBUTION_SERVED_SCALE])
            attr_b = torch.cat([attr_b, self._topic_bias() / ATTRIBUTION_SERVED_SCALE])
        if self.prompt_layer is not None:  # it reads the final state: the first half
            attr_w = torch.cat([attr_w, torch.zeros_like(attr_w)], 1)
        if mlp is not None:
            mlp = (mlp[0], mlp[1], torch.cat([mlp[2], torch.zeros(attr_w.shape[0], mlp[2].shape[1])]),
                   *mlp[3:])
        return torch.cat([weight, attr_w]), torch.cat([bias, attr_b]), mlp

    def _served_prompt_tensors(self) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        if self.prompt is None:
            return self.weight, self.bias, self.mlp
        head_w, readout_w, mlp = self.weight, self.prompt[0], self.mlp
        if self.prompt_layer is not None:
            head_w = torch.cat([head_w, torch.zeros_like(head_w)], 1)
            readout_w = torch.cat([torch.zeros_like(readout_w), readout_w], 1)
            if mlp is not None:
                up = torch.cat([mlp[0], torch.zeros_like(mlp[0])], 1)
                gate = ()
                if len(mlp) == 4:  # (v, c): v over the final state, zeros over the middle
                    v, c = mlp[3][:-1], mlp[3][-1:]
                    gate = (torch.cat([v, torch.zeros_like(v), c]),)
                mlp = (up, mlp[1], mlp[2], *gate)
        weight = torch.cat([head_w, readout_w])
        bias = torch.cat([self.bias, self.prompt[1]])
        if mlp is not None:
            down = torch.cat([mlp[2], torch.zeros_like(mlp[2])])
            mlp = (mlp[0], mlp[1], down, *mlp[3:])
        return weight, bias, mlp

    @property
    def served_outputs(self) -> tuple[int, int, int, int, int]:
        """Columns of the serving kernel's scores: (head K, prompt read-out K or 0,
        attribution C or 0, topic gate C or 0, prompt veto K or 0), in that order."""
        k, c = self.taxonomy.num_outputs, len(self.taxonomy.categories)
        return (k, k if self.prompt is not None else 0,
                0 if self.attribution is None else c, 0 if self.topic is None else c,
                0 if self.veto is None else k)

    def attribution_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] final states at prompt ends -> [N, C] category logits (format 7)."""
        if self.attribution is None:
            raise ValueError("this safety head has no attribution read-out")
        return hidden.float() @ self.attribution[0].T + self.attribution[1]

    def topic_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] final states at prompt ends -> [N, C] topic-gate logits, open at >= 0
        (format 8)."""
        if self.topic is None:
            raise ValueError("this safety head has no topic gate")
        return hidden.float() @ self.topic[0].T + self._topic_bias()

    def served_hidden(self, hidden: torch.Tensor, middle: torch.Tensor | None) -> torch.Tensor:
        """The rows the serving kernel reads: the final state, or with a ``prompt_layer`` the
        final state and that layer's side by side ([N, 2H])."""
        if self.prompt_layer is None:
            return hidden
        if middle is None:
            raise ValueError(f"this safety head's prompt read-out reads layer {self.prompt_layer}")
        return torch.cat([hidden, middle], -1)

    def prompt_logits(self, hidden: torch.Tensor, middle: torch.Tensor | None = None,
                      allowlisted: bool = False) -> torch.Tensor:
        """[N, H] -> [N, K]: the logits the prompt verdict reads (before the prompt offset).
        ``middle``: the [N, H] hidden state at ``prompt_layer``, for a head that has one.
        ``allowlisted``: the request has an allow-list (format 10 judges the others' prompts
        by its ``no_allowlist_rule``)."""
        from safeserve.kernels.safety_head import head_logits

        if self.veto is not None:
            verdict = dataclasses.replace(self, veto=None).prompt_logits(hidden, middle,
                                                                         allowlisted)
            return torch.minimum(verdict, self.veto_logits(self.served_hidden(hidden, middle)))
        own = None if self.prompt is not None and not self.prompt_either else head_logits(
            hidden, self.weight, self.bias, self.mlp)
        if self.prompt is None:
            return own
        if self.prompt_layer is not None:
            if middle is None:
                raise ValueError(
                    f"this safety head's prompt read-out reads layer {self.prompt_layer}")
            hidden = middle
        readout = head_logits(hidden, self.prompt[0], self.prompt[1])
        if own is not None and not allowlisted:
            which, shift = self.no_allowlist_rule
            readout = readout - shift
            if which == "overall":
                own = torch.cat([torch.full_like(own[:, :-1], -torch.inf), own[:, -1:]], 1)
        return readout if own is None else torch.maximum(readout, own)

    def save(self, model_dir: str | Path) -> Path:
        out = Path(model_dir) / HEAD_DIR
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight, "bias": self.bias}
        if self.mlp is not None:
            tensors.update(zip(MLP_TENSORS + (MLP_GATE,), self.mlp))
        if self.prompt is not None:
            tensors.update(zip(PROMPT_TENSORS, self.prompt))
        if self.attribution is not None:
            tensors.update(zip(ATTRIBUTION_TENSORS, self.attribution))
        if self.topic is not None:
            tensors.update(zip(TOPIC_TENSORS, self.topic))
        if self.veto is not None:
            tensors.update(zip(VETO_TENSORS, self.veto))
        save_file({name: t.detach().float().contiguous().cpu() for name, t in tensors.items()},
                  str(out / "head.safetensors"))
        self.taxonomy.save(out / "taxonomy.yaml")
        cfg = {
            "format_version": self.format_version,
            "hidden_size": self.hidden_size,
            "mlp_units": self.mlp_units,
            "num_outputs": int(self.weight.shape[0]),
            "layer": self.layer,
            "output_names": list(self.taxonomy.output_names),
            "taxonomy_sha256": taxonomy_digest(self.taxonomy),
            **({"prompt_layer": self.prompt_layer, "prompt_either": self.prompt_either}
               if self.prompt_layer is not None else {}),
            **({"has_prompt_readout": self.prompt is not None, "prompt_either": self.prompt_either}
               if self.attribution is not None or self.format_version
               in (FORMAT_VERSION_NO_ALLOWLIST_POINT, FORMAT_VERSION_PROMPT_VETO) else {}),
            **self.extra,
        }
        (out / "head_config.json").write_text(json.dumps(cfg, indent=2))
        return out


def taxonomy_digest(taxonomy: Taxonomy) -> str:
    return hashlib.sha256("\n".join(taxonomy.ids).encode()).hexdigest()[:16]


def _prompt_layout(cfg: dict) -> int:
    """The earlier format whose prompt layout a format-7-or-later config describes (format 7
    carries any of them beside it; which one is in its config)."""
    if not cfg["has_prompt_readout"]:
        return FORMAT_VERSION_OFFSET
    if cfg.get("prompt_layer") is not None:
        return FORMAT_VERSION_PROMPT_LAYER
    return FORMAT_VERSION_PROMPT_EITHER if cfg.get("prompt_either") else FORMAT_VERSION_PROMPT


def has_safety_head(model_dir: str | Path) -> bool:
    return (Path(model_dir) / HEAD_DIR / "head.safetensors").is_file()


def load_safety_head(model_dir: str | Path, expect_taxonomy: Taxonomy | None = None) -> SafetyHead:
    """Load and validate a head; ``expect_taxonomy`` (the server's) must list the same ids."""
    d = Path(model_dir) / HEAD_DIR
    missing = [n for n in ("head.safetensors", "head_config.json", "taxonomy.yaml")
               if not (d / n).is_file()]
    if missing:
        raise CheckpointError(f"incomplete safety head in {d}: {', '.join(missing)} missing")
    try:
        tensors = load_file(str(d / "head.safetensors"))
        cfg = json.loads((d / "head_config.json").read_text())
        taxonomy = Taxonomy.load(d / "taxonomy.yaml")
    except Exception as e:  # a truncated or LFS-pointer file, bad JSON or YAML: one line
        raise CheckpointError(f"unreadable safety head in {d}: {type(e).__name__}: "
                              + " ".join(str(e).split())) from None
    if "weight" not in tensors or "bias" not in tensors:
        raise CheckpointError(f"safety head in {d} lacks its weight or bias tensor")
    # A NaN weight fails closed at serving (NaN scores flag everything), but silently so:
    # refuse it here.
    if bad := sorted(n for n, t in tensors.items()
                     if t.is_floating_point() and not bool(torch.isfinite(t).all())):
        raise CheckpointError(f"safety head in {d} has non-finite values in {bad}")
    if cfg.get("format_version") not in FORMAT_VERSIONS:
        raise CheckpointError(f"safety head format {cfg.get('format_version')} is not one of "
                              f"{', '.join(map(str, FORMAT_VERSIONS))}")
    mlp = None
    # Every format after the MLP's carries one when its config counts units (format 9 was
    # once left out of a list here, and its heads loaded without their MLP).
    has_mlp = cfg["format_version"] == FORMAT_VERSION_MLP or (
        cfg["format_version"] != FORMAT_VERSION and int(cfg.get("mlp_units") or 0) > 0)
    prompt = attribution = topic = veto = None
    version = cfg["format_version"]
    if version == FORMAT_VERSION_PROMPT_VETO:
        missing = [n for n in VETO_TENSORS if n not in tensors]
        if missing:
            raise CheckpointError(f"safety head format {version} in {d} lacks {missing}")
        veto = tuple(tensors[n].float() for n in VETO_TENSORS)
        version = FORMAT_VERSION_NO_ALLOWLIST_POINT  # the layout beside it: as format 10's
    if version == FORMAT_VERSION_NO_ALLOWLIST_POINT:  # any layout: its tensors say which
        version = (FORMAT_VERSION_TOPIC if all(n in tensors for n in TOPIC_TENSORS)
                   else FORMAT_VERSION_ATTRIBUTION)  # whose branch reads the prompt layout
        if version == FORMAT_VERSION_ATTRIBUTION and not all(n in tensors
                                                             for n in ATTRIBUTION_TENSORS):
            if not isinstance(cfg.get("has_prompt_readout"), bool):
                raise CheckpointError(f"safety head format {cfg['format_version']} in {d} "
                                      "lacks a boolean has_prompt_readout")
            version = _prompt_layout(cfg)
    if version in (FORMAT_VERSION_TOPIC, FORMAT_VERSION_TOPIC_POINT):
        missing = [n for n in TOPIC_TENSORS if n not in tensors]
        if missing:
            raise CheckpointError(f"safety head format {version} in {d} lacks {missing}")
        topic = tuple(tensors[n].float() for n in TOPIC_TENSORS)
        version = FORMAT_VERSION_ATTRIBUTION  # and everything format 7 carries
    if version == FORMAT_VERSION_ATTRIBUTION:
        missing = [n for n in ATTRIBUTION_TENSORS if n not in tensors]
        if missing or not isinstance(cfg.get("has_prompt_readout"), bool):
            raise CheckpointError(f"safety head format {cfg['format_version']} in {d} lacks "
                                  f"{missing or 'a boolean has_prompt_readout'}")
        attribution = tuple(tensors[n].float() for n in ATTRIBUTION_TENSORS)
        version = _prompt_layout(cfg)
    if version in PROMPT_FORMATS:
        missing = [n for n in PROMPT_TENSORS if n not in tensors]
        if missing:
            raise CheckpointError(f"safety head format {cfg['format_version']} in {d} lacks {missing}")
        prompt = tuple(tensors[n].float() for n in PROMPT_TENSORS)
    if has_mlp:
        missing = [n for n in MLP_TENSORS if n not in tensors]
        if missing:
            raise CheckpointError(f"safety head format {cfg['format_version']} in {d} lacks {missing}")
        mlp = tuple(tensors[n].float() for n in MLP_TENSORS)
        if MLP_GATE in tensors:
            mlp += (tensors[MLP_GATE].float(),)
    # The weight rows follow the category order the head was trained with: a taxonomy file
    # edited afterwards (reordered, renamed) would attach them to the wrong categories.
    names = cfg.get("output_names")
    if names is not None and list(names) != list(taxonomy.output_names):
        raise CheckpointError(
            f"safety head in {d} was trained for outputs {list(names)}, but its taxonomy.yaml "
            f"lists {list(taxonomy.output_names)}")
    digest = cfg.get("taxonomy_sha256")
    if digest is not None and digest != taxonomy_digest(taxonomy):
        raise CheckpointError(f"safety head in {d}: taxonomy.yaml's categories do not match "
                              f"the head's ({digest})")
    if expect_taxonomy is not None and expect_taxonomy.ids != taxonomy.ids:
        raise CheckpointError(
            f"safety head taxonomy {list(taxonomy.ids)} does not match the server's "
            f"{list(expect_taxonomy.ids)}"
        )
    # Every tensor must be one the declared format reads: a head whose MLP (or read-out) the
    # config does not declare would otherwise be served without it.
    used = {"weight", "bias"}
    for part, names in ((veto, VETO_TENSORS), (topic, TOPIC_TENSORS),
                        (attribution, ATTRIBUTION_TENSORS), (prompt, PROMPT_TENSORS),
                        (mlp, MLP_TENSORS + ((MLP_GATE,) if MLP_GATE in tensors else ()))):
        if part is not None:
            used.update(names)
    if unused := sorted(set(tensors) - used):
        raise CheckpointError(f"safety head format {cfg['format_version']} in {d} does not "
                              f"read its tensors {unused} (a format_version or mlp_units "
                              "that does not match the weights?)")
    from safeserve.models.decision_defaults import HEAD_DEFAULT_TAU, head_tau, overall_threshold

    try:  # what the decision reads from the config: checked here, once, for every user
        overall_threshold(cfg)
        head_tau(cfg, HEAD_DEFAULT_TAU)
    except ValueError as e:
        raise CheckpointError(f"safety head in {d}: {e}") from None
    extra = {k: v for k, v in cfg.items()
             if k not in {"format_version", "hidden_size", "num_outputs", "layer",
                          "output_names", "taxonomy_sha256", "mlp_units", "prompt_layer",
                          "prompt_either", "has_prompt_readout"}}
    layered = version == FORMAT_VERSION_PROMPT_LAYER
    if layered and (not isinstance(cfg.get("prompt_layer"), int)
                    or not isinstance(cfg.get("prompt_either"), bool)):
        raise CheckpointError(f"safety head format 6 in {d} needs an integer prompt_layer and "
                              "a boolean prompt_either")
    either = (cfg["prompt_either"] if layered
              else version == FORMAT_VERSION_PROMPT_EITHER)
    head = SafetyHead(tensors["weight"].float(), tensors["bias"].float(), taxonomy,
                      int(cfg.get("layer", -1)), extra, mlp, prompt, either,
                      cfg["prompt_layer"] if layered else None, attribution, topic, veto)
    head.validate(cfg.get("hidden_size"))
    if head.mlp_units != int(cfg.get("mlp_units") or head.mlp_units):
        raise CheckpointError(f"safety head in {d} declares {cfg.get('mlp_units')} MLP units "
                              f"but loaded {head.mlp_units}")
    return head
