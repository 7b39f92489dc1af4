"""Attention weights recomputed from FragmentStream's log-sum-exp equal a dense softmax."""

import pytest
import torch

from fraglm.attention.dense import visibility_mask
from fraglm.attention.maps import attention_weights


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("n_q", "fragment"), [(37, 8), (5, 16), (37, 1)])
def test_weights_match_dense_softmax(causal, n_q, fragment):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, n_q, 8, dtype=torch.float64, generator=gen)
    k = torch.randn(2, 2, 37, 8, dtype=torch.float64, generator=gen)
    docs = torch.tensor([[0] * 20 + [1] * 17, [0] * 37])
    weights = attention_weights(q, k, causal=causal, fragment_size=fragment, doc_ids=docs)
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 8**-0.5
    visible = visibility_mask(n_q, 37, causal=causal, doc_ids=docs, device=q.device)
    expected = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    torch.testing.assert_close(weights, expected.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, n_q))


def test_rows_that_see_nothing_are_zero():
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    docs = torch.tensor([[0, -1, 0, 0]])  # position 1 is padding
    weights = attention_weights(q, k, doc_ids=docs)
    assert weights[0, 0, 1].abs().sum() == 0
    assert weights[0, 0, :, 1].abs().sum() == 0
