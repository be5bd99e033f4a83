"""Risk categories present in a response, read by a SafeServe safety head.

The LM of the head's checkpoint reads the conversation (user prompt, then the response);
the head scores every response position (the final post-norm hidden state, as the server
does) and a category is present when its maximum over the response reaches the head's
threshold for it, or, when only the overall output fired, it is the top-scoring one."""

from __future__ import annotations

from pathlib import Path

import torch

from safeserve.kernels.safety_head import safety_scores_reference
from safeserve.models.checkpoint import load_safety_head


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class HeadLabeller:
    """Loads on the CPU (so it can be checked before a GPU job such as vLLM generation takes
    the accelerator) and moves to ``device`` (default: the GPU when there is one) on first use."""

    def __init__(self, checkpoint: str | Path, batch_size: int = 8, max_length: int = 1024,
                 device: str | torch.device | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.head = load_safety_head(checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        self.model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
        self.model.eval()
        self.head.validate(self.model.config.hidden_size)
        self.names = self.head.taxonomy.ids
        self.thresholds = torch.tensor([c.threshold for c in self.head.taxonomy.categories])
        self.batch_size, self.max_length = batch_size, max_length
        self.device = torch.device(device) if device is not None else default_device()
        self._head_tensors = None  # (weight, bias, mlp) on self.device, set by _place

    def _place(self) -> tuple:
        if self._head_tensors is None:
            self.model.to(self.device)
            mlp = tuple(t.to(self.device) for t in self.head.mlp) if self.head.mlp else None
            self._head_tensors = (self.head.weight.to(self.device),
                                  self.head.bias.to(self.device), mlp)
        return self._head_tensors

    def _encode(self, prompt: str, response: str) -> tuple[list[int], int]:
        """Token ids of prompt + response within ``max_length``, and where the response starts.

        The response is what gets scored, so a long conversation loses the prompt's beginning
        (cut from the left: the request's last words and the assistant header stay next to the
        response), not the response. The prompt keeps at least a quarter of the window so a
        long response is still read in context; the response's tail goes only when it alone
        does not fit in the rest."""
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
        resp = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        resp = resp[: self.max_length - min(len(ids), self.max_length // 4)]
        ids = ids[max(0, len(ids) + len(resp) - self.max_length):]
        return ids + resp, len(ids)

    @torch.no_grad()
    def max_scores(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        """[len(pairs), outputs] maximum score of each output (the categories, then the
        overall one) over response positions (zeros for an empty response)."""
        weight, bias, mlp = self._place()
        out = torch.zeros(len(pairs), len(self.names) + 1)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(pairs), self.batch_size):
            enc = [self._encode(p, r) for p, r in pairs[start:start + self.batch_size]]
            width = max(len(ids) for ids, _ in enc)
            input_ids = torch.full((len(enc), width), pad, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for i, (ids, _) in enumerate(enc):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                mask[i, : len(ids)] = 1
            hidden = self.model.model(input_ids=input_ids.to(self.device),
                                      attention_mask=mask.to(self.device)).last_hidden_state
            scores = safety_scores_reference(hidden.reshape(-1, hidden.shape[-1]), weight, bias, mlp)
            scores = scores.reshape(len(enc), width, -1)[..., : len(self.names) + 1].float().cpu()
            for i, (ids, start_resp) in enumerate(enc):
                if len(ids) > start_resp:
                    out[start + i] = scores[i, start_resp:len(ids)].max(0).values
        return out

    def categories(self, pairs: list[tuple[str, str]]) -> list[list[str]]:
        """Categories whose score reached their threshold somewhere in the response. When
        only the overall output fired (at 0.5, its served threshold), its harm is put on the
        category the head scored highest, as the server attributes it: a response the server
        would stop is never labelled harmless."""
        scores = self.max_scores(pairs)
        cats, overall = scores[:, :-1], scores[:, -1]
        hits = cats >= self.thresholds
        out = []
        for row, fired, top in zip(hits.tolist(), (overall >= 0.5).tolist(),
                                   cats.argmax(1).tolist()):
            names = [n for n, h in zip(self.names, row) if h]
            out.append(names or ([self.names[top]] if fired else []))
        return out
