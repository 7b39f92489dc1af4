"""Attention backends behind one switch: ``fragment`` (default) | ``sdpa`` | ``naive``.

``fragment`` is the project's FragmentStream attention (exact, O(T) memory, see
:mod:`fraglm.attention.fragment`); ``sdpa`` is
``torch.nn.functional.scaled_dot_product_attention``; ``naive`` materialises the
scores and is the reference the others are tested against.
"""

from __future__ import annotations

from torch import Tensor

from fraglm.attention.dense import naive_attention, sdpa_attention, visibility_mask
from fraglm.attention.fragment import (
    FragmentAttention,
    fragment_attention,
    fragment_backward,
    fragment_forward,
    merge,
)

__all__ = [
    "BACKENDS",
    "FragmentAttention",
    "attention",
    "fragment_attention",
    "fragment_backward",
    "fragment_forward",
    "merge",
    "naive_attention",
    "sdpa_attention",
    "visibility_mask",
]

BACKENDS = ("fragment", "sdpa", "naive")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    backend: str = "fragment",
    causal: bool = True,
    fragment_size: int = 128,
    doc_ids: Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> Tensor:
    """Attention of q (B, H, Tq, D) over k, v (B, Hkv, Tk, D) with the chosen backend.

    All backends share one meaning: ``Hkv`` divides ``H``, queries are the last
    ``Tq <= Tk`` positions, ``doc_ids`` (B, Tk) keeps attention inside each
    document (negative ids are padding that sees and is seen by nothing), rows
    with no visible key return 0. ``fragment_size`` and ``impl`` (``auto`` | ``triton`` |
    ``torch``, see :func:`fragment_attention`) only affect ``fragment``.
    """
    if backend == "fragment":
        return fragment_attention(
            q, k, v, causal=causal, fragment_size=fragment_size, doc_ids=doc_ids, scale=scale,
            impl=impl,
        )  # fmt: skip
    if backend == "sdpa":
        return sdpa_attention(q, k, v, causal=causal, doc_ids=doc_ids, scale=scale)
    if backend == "naive":
        return naive_attention(q, k, v, causal=causal, doc_ids=doc_ids, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
