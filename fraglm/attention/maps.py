"""Attention weights for inspection, computed with FragmentStream's own statistics.

The forward pass never stores probabilities; to look at them, :func:`attention_weights`
takes the per-row log-sum-exp from :func:`fragment_forward` and recomputes each query
fragment's probabilities ``P = exp(S - LSE)`` block by block, exactly as the backward pass
does. The result is dense (B, H, Tq, Tk): meant for prompts, not for training lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fraglm.attention.dense import expand_kv_heads, visibility_mask
from fraglm.attention.fragment import fragment_forward


def attention_weights(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool = True,
    fragment_size: int = 128,
    doc_ids: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Probabilities (B, H, Tq, Tk) of q (B, H, Tq, D) over k (B, Hkv, Tk, D); rows that
    see no key are 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n_q, n_k = q.shape[2], k.shape[2]
    q_doc = None if doc_ids is None else doc_ids[:, n_k - n_q :]
    _, lse = fragment_forward(
        q, k, k, scale=scale, causal=causal, fragment_size=fragment_size,
        q_start=n_k - n_q, q_doc=q_doc, k_doc=doc_ids,
    )  # fmt: skip
    keys, _ = expand_kv_heads(q, k.float(), k)
    visible = visibility_mask(n_q, n_k, causal=causal, doc_ids=doc_ids, device=q.device)
    weights = torch.zeros(q.shape[0], q.shape[1], n_q, n_k, device=q.device)
    for start in range(0, n_q, fragment_size):
        rows = slice(start, min(start + fragment_size, n_q))
        scores = scale * q[:, :, rows].float() @ keys.transpose(-1, -2)
        block = torch.exp(scores - lse[:, :, rows, None].float())
        if visible is not None:
            block = block.masked_fill(~visible[..., rows, :], 0.0)
        weights[:, :, rows] = block.nan_to_num(0.0)
    return weights
