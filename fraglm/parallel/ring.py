"""Ring attention: one sequence spread over the ranks of a process group.

Each of the N ranks holds 2 of the sequence's 2N equal chunks in *zigzag* order
(:mod:`fraglm.parallel.zigzag`): rank r holds chunks r and 2N-1-r, so under a causal mask
every rank has the same amount of work.
Keys and values travel around the ring (rank r sends to r+1) with
``torch.distributed.batch_isend_irecv``; the transfer of the next block is started
before the current block is computed, so communication overlaps computation. Partial
results over different key blocks are combined exactly with
:func:`fraglm.attention.fragment.merge`; all the arithmetic is FragmentStream's own block
routines, :func:`fragment_forward` and :func:`fragment_backward`.

The backward pass sends the blocks around again, together with their dK/dV accumulators:
each rank adds its contribution to the block it holds and passes it on, and after a full
turn every accumulator is back with the rank that owns those keys. Only the local q, k, v,
output and log-sum-exp are saved for backward: memory per rank is O(T / N).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fraglm.attention.fragment import fragment_backward, fragment_forward, merge, softmax_delta
from fraglm.parallel.zigzag import zigzag_chunks


class _Ring:
    """Send to the next rank and receive from the previous one, asynchronously."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group or dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.world)

    def start(self, tensors: list[Tensor]) -> tuple[list[Tensor], _Transfer]:
        """Send ``tensors`` on and receive the previous rank's; returns the receive buffers
        (valid once the transfer is waited for) and the transfer."""
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in received]
        return received, _Transfer(dist.batch_isend_irecv(ops), tensors)


class _Transfer:
    """Pending sends and receives. ``wait`` drops every reference to the buffers, so that
    each step's blocks are freed as soon as the next ones arrive."""

    def __init__(self, works: list[dist.Work], sent: list[Tensor]) -> None:
        self.works, self.sent = works, sent

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works, self.sent = [], []


def _pairs(rank: int, owner: int, world: int, causal: bool) -> list[tuple[int, int, int, int]]:
    """(local q half, block k half, q chunk, k chunk) for every pair with visible keys."""
    q_chunks, k_chunks = zigzag_chunks(rank, world), zigzag_chunks(owner, world)
    return [
        (qi, ki, qc, kc)
        for qi, qc in enumerate(q_chunks)
        for ki, kc in enumerate(k_chunks)
        if not causal or kc <= qc
    ]


def _halves(x: Tensor | None, dim: int) -> tuple[Tensor | None, Tensor | None]:
    if x is None:
        return None, None
    first, second = x.chunk(2, dim=dim)
    return first, second


@dataclass(frozen=True)
class _Options:
    causal: bool
    fragment_size: int
    scale: float
    impl: str


def _block_calls(
    ring: _Ring, owner: int, q: Tensor, block: list[Tensor], opts: _Options
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """For each visible (query half, key half) pair: indices and the key-side arguments
    of the fragment block routines. Views of ``block`` live only as long as the caller's
    loop, so a step's block is freed as soon as the next one has arrived."""
    chunk = q.shape[2] // 2
    k_halves, v_halves = _halves(block[0], 2), _halves(block[1], 2)
    k_docs = _halves(block[2] if len(block) > 2 else None, 1)
    for qi, ki, qc, kc in _pairs(ring.rank, owner, ring.world, opts.causal):
        yield qi, ki, {
            "k": k_halves[ki], "v": v_halves[ki], "k_doc": k_docs[ki],
            "q_start": qc * chunk, "k_start": kc * chunk, "scale": opts.scale,
            "causal": opts.causal, "fragment_size": opts.fragment_size, "impl": opts.impl,
        }  # fmt: skip


def _forward_step(
    ring: _Ring, owner: int, q: Tensor, q_docs: tuple, block: list[Tensor], opts: _Options,
    outs: list[Tensor | None], lses: list[Tensor | None],
) -> None:  # fmt: skip
    q_halves = _halves(q, 2)
    for qi, _, kwargs in _block_calls(ring, owner, q, block, opts):
        out, lse = fragment_forward(q_halves[qi], q_doc=q_docs[qi], **kwargs)
        if outs[qi] is None:
            outs[qi], lses[qi] = out, lse
        else:
            outs[qi], lses[qi] = merge(outs[qi], lses[qi], out, lse)


def _backward_step(
    ring: _Ring, owner: int, q: Tensor, q_docs: tuple, block: list[Tensor], opts: _Options,
    dout: Tensor, lse: Tensor, delta: Tensor, dq: Tensor, grads: list[Tensor],
) -> None:  # fmt: skip
    """Add this block's contributions to ``dq`` and to the block's ``grads`` (dK, dV)."""
    q_h, do_h, lse_h, delta_h, dq_h = (_halves(t, 2) for t in (q, dout, lse, delta, dq))
    dk_h, dv_h = _halves(grads[0], 2), _halves(grads[1], 2)
    for qi, ki, kwargs in _block_calls(ring, owner, q, block, opts):
        dq_part, dk_part, dv_part = fragment_backward(
            q_h[qi], dout=do_h[qi], lse=lse_h[qi], delta=delta_h[qi], q_doc=q_docs[qi], **kwargs
        )
        dq_h[qi].add_(dq_part)
        dk_h[ki].add_(dk_part)
        dv_h[ki].add_(dv_part)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        doc_ids: Tensor | None,
        group: dist.ProcessGroup | None,
        causal: bool,
        fragment_size: int,
        scale: float,
        impl: str,
    ) -> Tensor:
        ring, opts = _Ring(group), _Options(causal, fragment_size, scale, impl)
        q_docs = _halves(doc_ids, 1)
        outs: list[Tensor | None] = [None, None]
        lses: list[Tensor | None] = [None, None]
        block = [k, v] if doc_ids is None else [k, v, doc_ids]
        for step in range(ring.world):
            owner = (ring.rank - step) % ring.world
            incoming = ring.start(block) if step < ring.world - 1 else None
            _forward_step(ring, owner, q, q_docs, block, opts, outs, lses)
            if incoming is not None:
                block, transfer = incoming
                transfer.wait()
        out = torch.cat(outs, dim=2)
        lse = torch.cat(lses, dim=2)
        ctx.save_for_backward(q, k, v, out, lse, *([] if doc_ids is None else [doc_ids]))
        ctx.group, ctx.opts = group, opts
        return out.to(q.dtype)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dout: Tensor
    ) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, *docs = ctx.saved_tensors
        doc_ids = docs[0] if docs else None
        ring, opts = _Ring(ctx.group), ctx.opts
        delta = softmax_delta(dout, out, lse.dtype)
        q_docs = _halves(doc_ids, 1)
        dq = torch.zeros_like(out)
        block = [k, v] if doc_ids is None else [k, v, doc_ids]
        grads = [torch.zeros_like(k, dtype=lse.dtype), torch.zeros_like(v, dtype=lse.dtype)]
        for step in range(ring.world):
            owner = (ring.rank - step) % ring.world
            incoming = ring.start(block) if step < ring.world - 1 else None
            _backward_step(ring, owner, q, q_docs, block, opts, dout, lse, delta, dq, grads)
            # pass this block's gradient accumulators on with the block; after the last
            # step the hand-over returns each accumulator to the rank that owns the keys
            transfers = []
            if ring.world > 1:
                grads, grads_transfer = ring.start(grads)
                transfers.append(grads_transfer)
            if incoming is not None:
                block, kv_transfer = incoming
                transfers.append(kv_transfer)
            for transfer in transfers:
                transfer.wait()
        dk, dv = grads
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *[None] * 6


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    fragment_size: int = 128,
    doc_ids: Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> Tensor:
    """Exact attention over a sequence whose zigzag shares are spread over ``group``.

    q (B, H, 2C, D) and k, v (B, Hkv, 2C, D) are this rank's share (see
    :func:`fraglm.parallel.zigzag.zigzag_split`); ``doc_ids`` (B, 2C) likewise. Returns
    this rank's share of the output, equal to slicing the output of single-process
    :func:`~fraglm.attention.fragment.fragment_attention` on the whole sequence.
    ``impl`` chooses the block routines' kernels (``auto`` | ``triton`` | ``torch``).
    """
    if q.shape[2] != k.shape[2] or q.shape[2] % 2:
        raise ValueError("ring attention needs equal, even-length local q and k/v shares")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return RingAttention.apply(q, k, v, doc_ids, group, causal, fragment_size, scale, impl)
