"""Context parallelism applied to a model from outside: each block's attention kernel
becomes ring attention over a process group, as torchtitan's ``parallelize`` does.

The model itself never sees the group: :func:`apply_context_parallel` swaps the
``attn.kernel`` modules, and the caller feeds each rank its zigzag share of every
sequence (:func:`fraglm.parallel.zigzag.zigzag_share`) with that share's positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from fraglm.nn.model import Transformer
from fraglm.parallel.ring import ring_attention


class RingAttentionKernel(nn.Module):
    """Causal ring attention over ``group`` on FragmentStream's block routines; the
    model's ``attention`` backend does not apply (the ring is FragmentStream's own).
    ``local`` is the kernel it replaced, for :func:`local_attention`."""

    def __init__(
        self, group: dist.ProcessGroup, fragment_size: int, impl: str, local: nn.Module
    ) -> None:
        super().__init__()
        self.group, self.fragment_size, self.impl = group, fragment_size, impl
        self.local = local

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None
    ) -> torch.Tensor:
        return ring_attention(
            q, k, v, group=self.group, fragment_size=self.fragment_size, doc_ids=doc_ids,
            impl=self.impl,
        )  # fmt: skip


def apply_context_parallel(model: Transformer, group: dist.ProcessGroup) -> Transformer:
    """Run every block's attention as ring attention over ``group``; returns ``model``."""
    for block in model.blocks:
        block.attn.kernel = RingAttentionKernel(
            group, model.cfg.fragment_size, model.cfg.fragment_impl, block.attn.kernel
        )
    return model


@contextlib.contextmanager
def local_attention(model: Transformer) -> Iterator[None]:
    """Within the block, ``model`` attends over whole sequences on this rank alone (its
    kernels from before :func:`apply_context_parallel`): for evaluation on one rank."""
    rings = [(block.attn, block.attn.kernel) for block in model.blocks]
    rings = [(attn, ring) for attn, ring in rings if isinstance(ring, RingAttentionKernel)]
    for attn, ring in rings:
        attn.kernel = ring.local
    try:
        yield
    finally:
        for attn, ring in rings:
            attn.kernel = ring
