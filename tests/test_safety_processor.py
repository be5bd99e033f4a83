"""The logits processor's token forcing, both forms: the host-synced one (CPU: touches only
forced rows) and the sync-free one (CUDA: a masked pass plus a scatter) must agree."""

from __future__ import annotations

import pytest
import torch

from safeserve.server.safety_processor import SafetyLogitsProcessor


@pytest.mark.parametrize("sync_free", [False, True])
def test_forced_rows_keep_only_their_token_and_others_are_untouched(sync_free):
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    forced = torch.tensor([-1, 3, -1, 0, 49, -1])
    out = SafetyLogitsProcessor._force(logits.clone(), forced, sync_free=sync_free)
    for i, tok in enumerate(forced.tolist()):
        if tok < 0:
            assert torch.equal(out[i], logits[i])
        else:
            assert out[i, tok] == 0.0 and torch.isfinite(out[i]).sum() == 1
            assert int(out[i].argmax()) == tok


def test_no_forced_row_leaves_the_logits_as_they_were():
    logits = torch.randn(4, 32)
    for sync_free in (False, True):
        out = SafetyLogitsProcessor._force(logits.clone(), torch.full((4,), -1), sync_free=sync_free)
        assert torch.equal(out, logits)
