"""Dense attention backends: the naive reference and PyTorch's SDPA.

Both build the full (Tq, Tk) visibility mask, so they take O(T^2) memory (SDPA's
fused kernels avoid the score matrix, but not the mask once doc_ids are given).
Semantics match :func:`fraglm.attention.fragment.fragment_attention`: queries
are the last Tq positions, ``doc_ids`` (B, Tk) restricts attention to a token's
document, negative ids are padding, and rows with no visible key return 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["naive_attention", "sdpa_attention", "visibility_mask"]


def visibility_mask(
    n_q: int, n_k: int, *, causal: bool, doc_ids: Tensor | None, device: torch.device
) -> Tensor | None:
    """Boolean mask, True where query i may see key j: (Tq, Tk), (B, 1, Tq, Tk) or None."""
    mask = None
    if causal:
        q_pos = torch.arange(n_k - n_q, n_k, device=device)
        mask = torch.arange(n_k, device=device)[None, :] <= q_pos[:, None]
    if doc_ids is not None:
        q_doc = doc_ids[:, n_k - n_q :, None]
        same = (q_doc == doc_ids[:, None, :]) & (q_doc >= 0)
        mask = same[:, None] if mask is None else same[:, None] & mask
    return mask


def expand_kv_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Grouped-query k, v repeated to one head per query head (as they are when H == Hkv)."""
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    doc_ids: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Materialise the scores, masked softmax (fully masked rows -> 0), then weight v."""
    k, v = expand_kv_heads(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = visibility_mask(q.shape[2], k.shape[2], causal=causal, doc_ids=doc_ids, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # Fully masked rows: max is -inf; shift by 0 so exp gives 0 instead of NaN.
    row_max = scores.amax(-1, keepdim=True).detach()
    weights = torch.exp(scores - row_max.masked_fill(row_max == float("-inf"), 0.0))
    total = weights.sum(-1, keepdim=True)
    probs = weights / total.masked_fill(total == 0, 1.0)
    return torch.matmul(probs, v)


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    doc_ids: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """torch's scaled_dot_product_attention with the same masking semantics.

    Grouped-query k, v go in as they are (``enable_gqa``): the flash kernel reads each
    key/value head once for its group; where no fused kernel takes GQA (a mask, fp32 on
    CUDA), torch repeats the heads in its math kernel. SDPA's ``is_causal`` is top-left
    aligned, so it is used only when Tq == Tk; a single query (a decoding step) is the
    last position and sees every key, so it needs no mask; otherwise an explicit
    bottom-right-aligned mask is passed. Rows with no visible key are given every key
    (whatever the kernel would do with an empty row) and their output is zeroed, which
    also zeroes their gradients.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if doc_ids is None and (not causal or n_q in (1, n_k)):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal and n_q > 1, scale=scale, enable_gqa=gqa
        )
    mask = visibility_mask(n_q, n_k, causal=causal, doc_ids=doc_ids, device=q.device)
    assert mask is not None
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    empty = ~mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask | empty, scale=scale, enable_gqa=gqa
    )
    return out.masked_fill(empty, 0.0)
