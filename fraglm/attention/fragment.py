"""FragmentStream attention: exact blockwise attention in O(T) memory.

Queries and keys are cut into fragments of ``fragment_size`` tokens. A tile is
one query fragment against one key fragment; score matrices of a tile, or of a
few neighbouring tiles (a run, below), are the only quadratic-looking objects
ever built, so the largest temporaries hold ``max(B * H * F * F, 2**21)``
elements and no ``T x T`` matrix exists, in the forward or in the backward pass.

How it runs (and why):

* Forward, per query fragment: online softmax over its visible key fragments
  (running max ``m``, sum ``l`` and accumulator ``A``), ``O = A / l`` and
  ``LSE = m + log l``.
* Backward, per key fragment: recompute ``P = exp(S - LSE)`` for each visible
  query fragment and accumulate ``dV^T``/``dK^T`` of that key fragment in small
  contiguous fp32 buffers (``dO^T P`` and ``Q^T dS`` are cheaper matmuls than
  ``P^T dO`` and ``dS^T Q``) while ``dQ`` is accumulated in place. Only ``Q, K,
  V, O`` and the per-row LSE are saved by the forward.
* In the forward, neighbouring tiles of one query fragment run as one product, a
  *run* of up to ``RUN_ELEMENTS`` scores (:func:`runs_of`), each tile of it masked
  on its own slice: the row max, the exponentials and the row sums are then a few
  long-row calls per run instead of short-row calls per tile (on a 2-core CPU,
  T = 512 at F = 64, the forward ran about 1.15x faster). The budget bounds the
  temporaries independently of the sequence length, so memory stays linear in T.
  The backward keeps square tiles: taller products measured slower there, their
  elementwise passes falling out of the per-core cache.
* Scores are kept in base 2 (``scale * log2(e)`` folded into the query, then
  ``exp2``), because ``torch.exp2`` is several times faster than ``torch.exp``
  on CPU; LSEs are converted back to natural logs at the boundary.
  ``S - LSE`` and ``dP - D`` are fused into the matmuls through ``baddbmm``.
* Grouped-query attention costs no K/V copies: ``q`` is folded from
  ``(B, H, T, D)`` to ``(B * Hkv, T * group, D)`` (row ``t * group + g``), so a
  query fragment of all heads of a group is one contiguous matmul operand and
  ``dK``/``dV`` sums over the group fall out of the matmuls.
* Tiles are planned before any arithmetic, once per shape
  (:mod:`fraglm.attention.tiles`): causal tiles wholly in the future are never
  computed and only tiles crossing the diagonal are masked. With document ids in
  host memory (CPU) a tile is skipped when the id ranges of its query and key
  fragments do not overlap and left unmasked when both hold one and the same
  document; on an accelerator reading the ids would make the host wait in every
  layer, so there every causal tile is masked on the device.
* This module is the tile loop (``impl="torch"``), for every device. On CUDA GPUs
  that Triton supports, ``impl="auto"`` runs the same algorithm as fused kernels
  (:mod:`fraglm.attention.triton_kernels`) through the same block routines.
* Statistics and accumulators are fp32 for fp16/bf16 inputs (fp64 for fp64);
  the public function returns the input dtype. The block routines run with
  autocast off: under an fp16/bf16 autocast region (mixed-precision training)
  autocast would recast their matmuls and break the in-place accumulations.

Document ids: ``doc_ids`` (B, Tk) integers; a token attends only to tokens of its
own document (and causally, when causal). A negative id marks padding: such a
token attends to nothing and nothing attends to it. A row that sees no key gets
output 0, LSE ``-inf`` and zero gradients.

The block routines :func:`fragment_forward`, :func:`fragment_backward` and
:func:`merge` are public so that ring attention can combine partial results
over key blocks held by other ranks; :class:`FragmentAttention` is built on the
same routines.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fraglm.attention.dense import sdpa_attention
from fraglm.attention.tiles import Biases, Tile, add_bias, plan_tiles, runs_of
from fraglm.attention.triton_op import resolve_impl

__all__ = [
    "FragmentAttention",
    "fragment_attention",
    "fragment_backward",
    "fragment_forward",
    "merge",
    "softmax_delta",
]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _outside_autocast(routine: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``routine(q, ...)`` with autocast off on the device of ``q``."""

    @functools.wraps(routine)
    def run(q: Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(q.device.type, enabled=False):
            return routine(q, *args, **kwargs)

    return run


def softmax_delta(dout: Tensor, out: Tensor, dtype: torch.dtype) -> Tensor:
    """``rowsum(dout * out)`` (B, H, T) in ``dtype``: the ``D`` of the softmax backward.

    Elementwise and a sum, so autocast leaves it in ``dtype`` (an einsum would be recast).
    """
    return (dout.to(dtype) * out.to(dtype)).sum(-1)


def _fold(x: Tensor, kv_heads: int) -> Tensor:
    """(B, H, T, ...) -> (B * Hkv, T * group, ...), row t * group + g; a view if group == 1."""
    b, h, t = x.shape[:3]
    group = h // kv_heads
    x = x.reshape(b, kv_heads, group, t, *x.shape[3:]).transpose(2, 3)
    return x.reshape(b * kv_heads, t * group, *x.shape[4:])


def _unfold(x: Tensor, batch: int, heads: int) -> Tensor:
    """Inverse of :func:`_fold`."""
    bk, tg = x.shape[:2]
    kv_heads = bk // batch
    group = heads // kv_heads
    x = x.reshape(batch, kv_heads, tg // group, group, *x.shape[2:]).transpose(2, 3)
    return x.reshape(batch, heads, tg // group, *x.shape[4:])


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q (B,H,Tq,D), k = v (B,Hkv,Tk,D); got {q.shape}, {k.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k/v {tuple(k.shape)}")


@_outside_autocast
def fragment_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    causal: bool = True,
    fragment_size: int = 128,
    q_start: int = 0,
    k_start: int = 0,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Attention of a query block over one key block: ``(out, lse)``, both in fp32 (fp64).

    q (B, H, Tq, D); k, v (B, Hkv, Tk, D). ``q_start``/``k_start`` are the absolute
    positions of the first query and key (key visible iff its position is <= the
    query's, when causal). ``q_doc`` (B, Tq) and ``k_doc`` (B, Tk) are document
    ids (negative = padding), both or neither. ``lse`` (B, H, Tq) is the natural
    log-sum-exp of the scaled visible scores, ``-inf`` (with ``out`` 0) for rows
    that see nothing, so results over disjoint key blocks combine with
    :func:`merge`. ``impl`` chooses the kernels as in :func:`fragment_attention`; the
    tile loop's ``out`` is a (B, H, Tq, D) view of (B, Tq, H, D) storage.
    """
    _check(q, k, v)
    if resolve_impl(impl, q) == "triton":
        k, v = k.to(q.dtype), v.to(q.dtype)
        return torch.ops.fraglm.fragment_fwd(
            q, k, v, q_doc, k_doc, causal, scale, q_start, k_start, True
        )
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    group, size = heads // kv_heads, fragment_size
    acc_dtype = _accum_dtype(q.dtype)
    q3 = _fold(q.to(acc_dtype), kv_heads)
    k3 = k.to(acc_dtype).reshape(batch * kv_heads, n_k, dim)
    v3 = v.to(acc_dtype).reshape(batch * kv_heads, n_k, dim)
    k3t = k3.transpose(1, 2)
    # the output in (B, Tq, H, D) storage: returned as a (B, H, Tq, D) view, which the
    # model's merge of the heads, (B, Tq, H * D), then reads without a copy
    out = q.new_zeros(batch, n_q, heads, dim, dtype=acc_dtype)
    lse = torch.full(q3.shape[:2], -math.inf, dtype=acc_dtype, device=q.device)
    tiles = plan_tiles(
        n_q, n_k, size, causal=causal, q_start=q_start, k_start=k_start, q_doc=q_doc, k_doc=k_doc
    )
    biases = Biases(
        size=size, group=group, q_start=q_start, k_start=k_start, n_q=n_q, n_k=n_k,
        q_doc=q_doc, k_doc=k_doc, dtype=acc_dtype, device=q.device,
    )  # fmt: skip
    rows_of = size * group
    by_query: dict[int, list[Tile]] = {}
    for tile in tiles:
        by_query.setdefault(tile.qf, []).append(tile)
    tile_elements = batch * kv_heads * rows_of * size
    for qf, row_tiles in by_query.items():
        rows = slice(qf * rows_of, (qf + 1) * rows_of)
        q_frag = q3[:, rows] * (scale * LOG2E)
        runs = runs_of(row_tiles, tile_elements)
        o_frag, lse2 = _forward_fragment(q_frag, k3t, v3, runs, biases, batch, size)
        positions = out[:, qf * size : (qf + 1) * size]
        n = positions.shape[1]
        positions.view(batch, n, kv_heads, group, dim).transpose(1, 2).copy_(
            o_frag.view(batch, kv_heads, n, group, dim)
        )
        lse[:, rows] = lse2 * LN2
    return out.transpose(1, 2), _unfold(lse, batch, heads)


def _forward_fragment(
    q_frag: Tensor,
    k3t: Tensor,
    v3: Tensor,
    runs: list[list[Tile]],
    biases: Callable[[Tile], Tensor],
    batch: int,
    size: int,
) -> tuple[Tensor, Tensor]:
    """Online softmax of one (scaled, base-2) query fragment over its runs of tiles."""
    m = acc = l_sum = None
    for run in runs:
        cols = slice(run[0].kf * size, (run[-1].kf + 1) * size)
        s = torch.bmm(q_frag, k3t[:, :, cols])
        masked = False
        for j, tile in enumerate(run):
            if tile.causal_mask or tile.doc_mask:
                add_bias(s[:, :, j * size : (j + 1) * size], biases(tile), batch)
                masked = True
        m_new = s.amax(-1, keepdim=True)
        if m is not None:
            torch.maximum(m_new, m, out=m_new)
        # A row with no visible key so far has max -inf; shift it by 0 instead.
        shift = m_new.masked_fill(m_new == -math.inf, 0.0) if masked else m_new
        s.sub_(shift).exp2_()
        if m is None:
            acc = torch.bmm(s, v3[:, cols])
            l_sum = s.sum(-1, keepdim=True)
        else:
            alpha = (m - shift).exp2_()
            acc.mul_(alpha).baddbmm_(s, v3[:, cols])
            l_sum.mul_(alpha).add_(s.sum(-1, keepdim=True))
        m = m_new
    acc.div_(l_sum.masked_fill(l_sum == 0, 1.0))
    return acc, (m + l_sum.log2()).squeeze(-1)


@_outside_autocast
def fragment_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    lse: Tensor,
    delta: Tensor,
    *,
    scale: float,
    causal: bool = True,
    fragment_size: int = 128,
    q_start: int = 0,
    k_start: int = 0,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
    impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient contributions ``(dq, dk, dv)`` of one query block over one key block.

    ``lse`` (B, H, Tq) is the final log-sum-exp of each query row over *all* its
    keys and ``delta`` (B, H, Tq) is ``rowsum(dout * out)`` of the final output, so
    contributions of disjoint key blocks simply add up. Other arguments are as in
    :func:`fragment_forward`. Results are fp32 (fp64 for fp64 inputs); ``dk`` and
    ``dv`` are already summed over the query heads of each group.
    """
    _check(q, k, v)
    if resolve_impl(impl, q) == "triton":
        k, v, dout = k.to(q.dtype), v.to(q.dtype), dout.to(q.dtype)
        return torch.ops.fraglm.fragment_bwd(
            q, k, v, dout, lse, delta, q_doc, k_doc, causal, scale, q_start, k_start, True
        )
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    group, size = heads // kv_heads, fragment_size
    acc_dtype = _accum_dtype(q.dtype)
    q3 = _fold(q.to(acc_dtype), kv_heads)
    do3 = _fold(dout.to(acc_dtype), kv_heads)
    k3 = k.to(acc_dtype).reshape(batch * kv_heads, n_k, dim)
    v3 = v.to(acc_dtype).reshape(batch * kv_heads, n_k, dim)
    # Base-2 LSE, negated, so that baddbmm computes S - LSE; -inf for empty rows.
    lse3 = _fold(lse.to(acc_dtype), kv_heads).unsqueeze(-1)
    neg_lse2 = torch.where(lse3 == -math.inf, -math.inf, lse3 * -LOG2E)
    # out of place: the fold is a view of the caller's delta when group == 1, and ring
    # attention passes one delta to several calls
    neg_delta = _fold(delta.to(acc_dtype), kv_heads).unsqueeze(-1).neg()
    rows_of = size * group
    # each query fragment's dq in a contiguous block (n_qf, B * Hkv, rows, D), so that its
    # products accumulate in place in one batched call (baddbmm_ into rows of a (B * Hkv,
    # T, D) tensor would run one product per batch entry)
    n_qf = -(-n_q // size)
    dq_frags = q3.new_zeros(n_qf, batch * kv_heads, rows_of, dim)
    dk = torch.zeros_like(k3)
    dv = torch.zeros_like(v3)
    tiles = plan_tiles(
        n_q, n_k, size, causal=causal, q_start=q_start, k_start=k_start, q_doc=q_doc, k_doc=k_doc
    )
    biases = Biases(
        size=size, group=group, q_start=q_start, k_start=k_start, n_q=n_q, n_k=n_k,
        q_doc=q_doc, k_doc=k_doc, dtype=acc_dtype, device=q.device,
    )  # fmt: skip
    by_key: dict[int, list[Tile]] = {}
    for tile in tiles:
        by_key.setdefault(tile.kf, []).append(tile)
    frags = _QueryFragments(q3, do3, neg_lse2, neg_delta, rows_of=rows_of)
    alpha = scale * LOG2E
    for kf, col_tiles in by_key.items():
        cols = slice(kf * size, (kf + 1) * size)
        k_frag, v_frag = k3[:, cols], v3[:, cols]
        k_frag_t, v_frag_t = k_frag.transpose(1, 2), v_frag.transpose(1, 2)
        dk_t = dv_t = None
        for tile in col_tiles:
            q_frag, do_frag, lse_frag, nd_frag = frags[tile.qf]
            p = torch.baddbmm(lse_frag, q_frag, k_frag_t, alpha=alpha)
            if tile.causal_mask or tile.doc_mask:
                add_bias(p, biases(tile), batch)
            p.exp2_()
            ds = torch.baddbmm(nd_frag, do_frag, v_frag_t).mul_(p)
            dq_frags[tile.qf, :, : q_frag.shape[1]].baddbmm_(ds, k_frag, alpha=scale)
            if dk_t is None:
                dv_t = torch.bmm(do_frag.transpose(1, 2), p)
                dk_t = torch.bmm(q_frag.transpose(1, 2), ds)
            else:
                dv_t.baddbmm_(do_frag.transpose(1, 2), p)
                dk_t.baddbmm_(q_frag.transpose(1, 2), ds)
        dv[:, cols] = dv_t.transpose(1, 2)
        dk[:, cols] = dk_t.mul_(scale).transpose(1, 2)
    dq = dq_frags.transpose(0, 1).reshape(batch * kv_heads, n_qf * rows_of, dim)
    dq = dq[:, : n_q * group]
    shape = (batch, kv_heads, n_k, dim)
    return _unfold(dq, batch, heads), dk.view(shape), dv.view(shape)


class _QueryFragments:
    """Per query fragment views of the folded q, dout, -LSE and -delta (built lazily)."""

    def __init__(self, *tensors: Tensor, rows_of: int) -> None:
        self.tensors, self.rows_of = tensors, rows_of
        self._views: dict[int, tuple[Tensor, ...]] = {}

    def __getitem__(self, qf: int) -> tuple[Tensor, ...]:
        if qf not in self._views:
            rows = slice(qf * self.rows_of, (qf + 1) * self.rows_of)
            self._views[qf] = tuple(t[:, rows] for t in self.tensors)
        return self._views[qf]


def merge(out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention results over two disjoint key sets exactly.

    ``out*`` (..., T, D) and ``lse*`` (..., T) as returned by :func:`fragment_forward`.
    Rows that saw nothing in one part (lse ``-inf``) take the other part; rows that
    saw nothing at all stay 0 with lse ``-inf``.
    """
    lse = torch.logaddexp(lse1, lse2)
    finite = lse.isfinite()
    w1 = torch.where(finite, lse1 - lse, -math.inf).exp_().unsqueeze(-1)
    w2 = torch.where(finite, lse2 - lse, -math.inf).exp_().unsqueeze(-1)
    return out1 * w1 + out2 * w2, lse


class FragmentAttention(torch.autograd.Function):
    """Autograd wrapper: saves only q, k, v, out and lse (plus doc ids when given)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool,
        fragment_size: int,
        doc_ids: Tensor | None,
        scale: float,
    ) -> Tensor:
        q_doc, k_doc = _split_docs(doc_ids, q.shape[2])
        out, lse = fragment_forward(
            q, k, v, scale=scale, causal=causal, fragment_size=fragment_size,
            q_start=k.shape[2] - q.shape[2], q_doc=q_doc, k_doc=k_doc,
        )  # fmt: skip
        out = out.to(q.dtype)
        # a tensor of its own to save: the returned lse is a view of fragment_forward's
        # buffer, and torch.compile refuses to save such an alias when it traces the tile
        # plan being built (a run's first step)
        lse = lse.clone()
        ctx.save_for_backward(q, k, v, out, lse, *([] if doc_ids is None else [doc_ids]))
        ctx.options = (causal, fragment_size, scale)
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dout: Tensor
    ) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, *docs = ctx.saved_tensors
        causal, fragment_size, scale = ctx.options
        q_doc, k_doc = _split_docs(docs[0] if docs else None, q.shape[2])
        delta = softmax_delta(dout, out, lse.dtype)
        dq, dk, dv = fragment_backward(
            q, k, v, dout, lse, delta, scale=scale, causal=causal, fragment_size=fragment_size,
            q_start=k.shape[2] - q.shape[2], q_doc=q_doc, k_doc=k_doc,
        )  # fmt: skip
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _split_docs(doc_ids: Tensor | None, n_q: int) -> tuple[Tensor | None, Tensor | None]:
    """Document ids of the queries (the last ``n_q``) and of the keys (all)."""
    if doc_ids is None:
        return None, None
    return doc_ids[:, doc_ids.shape[1] - n_q :], doc_ids


def fragment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    fragment_size: int = 128,
    doc_ids: Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> Tensor:
    """Exact attention of q (B, H, Tq, D) over k, v (B, Hkv, Tk, D) in O(T) memory.

    ``Hkv`` must divide ``H`` (grouped-query attention) and ``Tq <= Tk``: queries are
    the last ``Tq`` positions (a KV-cached decode step). ``doc_ids`` (B, Tk) limits
    attention to each token's document; negative ids are padding. ``scale``
    defaults to ``1 / sqrt(D)``. Returns (B, H, Tq, D) in the dtype of ``q``.
    Without gradients, a problem no larger than one tile (a decode step) is handed
    to SDPA in one fused call.

    ``impl``: ``"triton"`` runs the fused Triton kernels
    (:mod:`fraglm.attention.triton_kernels`, a ``torch.library`` custom op that
    ``torch.compile`` captures; their tiles come from ``tile_config``, per GPU and
    head dim, not from ``fragment_size``), ``"torch"`` the tile loop of this module,
    ``"auto"`` Triton where the compile check proves it
    (:data:`fraglm.attention.triton_op.PROVEN`) and the tile loop elsewhere (P100, V100,
    T4, fp32, CPU, MPS). See
    :func:`fraglm.attention.triton_op.resolve_impl`.
    """
    _check(q, k, v)
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"Tq={q.shape[2]} must not exceed Tk={k.shape[2]}")
    if fragment_size < 1:
        raise ValueError(f"fragment_size must be >= 1, got {fragment_size}")
    if doc_ids is not None and tuple(doc_ids.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"doc_ids must be (B, Tk) = {(k.shape[0], k.shape[2])}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    use_triton = resolve_impl(impl, q) == "triton"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not needs_grad and q.shape[2] * k.shape[2] <= fragment_size * fragment_size:
        # The whole score matrix is no larger than one tile (a KV-cached decode step):
        # streaming would only add overhead, so compute it in one fused call.
        return sdpa_attention(q, k, v, causal=causal, doc_ids=doc_ids, scale=scale)
    if use_triton:
        q_doc, k_doc = _split_docs(doc_ids, q.shape[2])
        out, _ = torch.ops.fraglm.fragment_fwd(
            q, k.to(q.dtype), v.to(q.dtype), q_doc, k_doc, causal, scale,
            k.shape[2] - q.shape[2], 0, False,
        )  # fmt: skip
        return out
    return FragmentAttention.apply(q, k, v, causal, fragment_size, doc_ids, scale)
