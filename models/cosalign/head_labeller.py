"""Risk categories present in a response, read by a SafeServe safety head.

The LM of the head's checkpoint reads the conversation (user prompt, then the response);
the head scores every response position (the final post-norm hidden state, as the server
does) and a category is present when its maximum over the response reaches the head's
threshold for it."""

from __future__ import annotations

from pathlib import Path

import torch

from safeserve.kernels.safety_head import safety_scores_reference
from safeserve.models.checkpoint import load_safety_head


class HeadLabeller:
    def __init__(self, checkpoint: str | Path, batch_size: int = 8, max_length: int = 1024):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.head = load_safety_head(checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        self.model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
        self.model.eval()
        self.head.validate(self.model.config.hidden_size)
        self.names = self.head.taxonomy.ids
        self.thresholds = torch.tensor([c.threshold for c in self.head.taxonomy.categories])
        self.batch_size, self.max_length = batch_size, max_length

    def _encode(self, prompt: str, response: str) -> tuple[list[int], int]:
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        resp = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        full = (list(ids) + resp)[: self.max_length]
        return full, min(len(ids), len(full))

    @torch.no_grad()
    def max_scores(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        """[len(pairs), categories] maximum per-category score over response positions
        (zeros for an empty response)."""
        out = torch.zeros(len(pairs), len(self.names))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(pairs), self.batch_size):
            enc = [self._encode(p, r) for p, r in pairs[start:start + self.batch_size]]
            width = max(len(ids) for ids, _ in enc)
            input_ids = torch.full((len(enc), width), pad, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for i, (ids, _) in enumerate(enc):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                mask[i, : len(ids)] = 1
            hidden = self.model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            scores = safety_scores_reference(hidden.reshape(-1, hidden.shape[-1]),
                                             self.head.weight, self.head.bias, self.head.mlp)
            scores = scores.reshape(len(enc), width, -1)[..., : len(self.names)]
            for i, (ids, start_resp) in enumerate(enc):
                if len(ids) > start_resp:
                    out[start + i] = scores[i, start_resp:len(ids)].max(0).values
        return out

    def categories(self, pairs: list[tuple[str, str]]) -> list[list[str]]:
        hits = self.max_scores(pairs) >= self.thresholds
        return [[n for n, h in zip(self.names, row) if h] for row in hits.tolist()]
