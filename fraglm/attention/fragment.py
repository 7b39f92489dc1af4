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
  *run* of up to ``_RUN_ELEMENTS`` scores (:func:`_runs`), each tile of it masked
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
* Tiles are planned before any arithmetic, once per shape: causal tiles wholly in
  the future are never computed and only tiles crossing the diagonal are masked.
  With document ids in host memory (CPU) a tile is skipped when the id ranges of
  its query and key fragments do not overlap and left unmasked when both hold one
  and the same document; on an accelerator reading the ids would make the host
  wait in every layer, so there every causal tile is masked on the device.
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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fraglm.attention.dense import sdpa_attention
from fraglm.attention.documents import fragment_doc_ranges
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


@dataclass(frozen=True)
class _Tile:
    """One query fragment x key fragment pair that has at least one visible pair."""

    qf: int  # query fragment index
    kf: int  # key fragment index
    causal_mask: bool  # tile crosses the causal diagonal
    doc_mask: bool  # tile needs the document mask


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


def _reads_on_host(device: torch.device) -> bool:
    """Whether document ids on ``device`` can steer the tile plan: in host memory reading
    them costs nothing; on an accelerator it would make the host wait for the device in
    every layer, so there the plan keeps every causal tile and masks documents on the
    device."""
    return device.type == "cpu"


# scores in one product at most (B * Hkv x rows x cols): 8 MiB in fp32
_RUN_ELEMENTS = 1 << 21

_PLANS: dict[tuple[int, int, int, bool, int, int, bool], tuple[_Tile, ...]] = {}


def _shape_plan(
    n_q: int, n_k: int, size: int, causal: bool, q_start: int, k_start: int, docs: bool
) -> tuple[_Tile, ...]:
    """The tiles a shape needs, built once per shape (a plain dict, which torch.compile
    traces without a warning): causal tiles wholly in the future are left out; with
    ``docs`` every tile carries the document mask."""
    key = (n_q, n_k, size, causal, q_start, k_start, docs)
    if key not in _PLANS:
        if len(_PLANS) >= 1024:  # decoding with a cache meets a new key length each step
            _PLANS.clear()
        _PLANS[key] = _build_plan(*key)
    return _PLANS[key]


def _build_plan(
    n_q: int, n_k: int, size: int, causal: bool, q_start: int, k_start: int, docs: bool
) -> tuple[_Tile, ...]:
    n_qf, n_kf = -(-n_q // size), -(-n_k // size)
    tiles = []
    for i in range(n_qf):
        first_q = q_start + i * size
        last_q = q_start + min((i + 1) * size, n_q) - 1
        # Key fragments starting after the last query of this fragment are all in the future.
        stop = min(n_kf, max(0, -(-(last_q - k_start + 1) // size))) if causal else n_kf
        for j in range(stop):
            last_k = k_start + min((j + 1) * size, n_k) - 1
            tiles.append(_Tile(i, j, causal and last_k > first_q, docs))
    return tuple(tiles)


def _plan(
    n_q: int,
    n_k: int,
    size: int,
    *,
    causal: bool,
    q_start: int,
    k_start: int,
    q_doc: Tensor | None,
    k_doc: Tensor | None,
) -> tuple[_Tile, ...]:
    """The tiles with at least one possibly visible pair, in query-major order.

    With document ids in host memory, a tile is skipped when the id ranges of its query
    and key fragments do not overlap and left unmasked when both hold one and the same
    document; on other devices the ids are not read (see :func:`_reads_on_host`).
    """
    docs = q_doc is not None and k_doc is not None
    tiles = _shape_plan(n_q, n_k, size, causal, q_start, k_start, docs)
    if not docs or not _reads_on_host(q_doc.device):
        return tiles
    q_lo, q_hi, q_pure = fragment_doc_ranges(q_doc, size)
    k_lo, k_hi, k_pure = fragment_doc_ranges(k_doc, size)
    overlap = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
    one_doc = q_pure[:, :, None] & k_pure[:, None, :] & (q_lo[:, :, None] == k_lo[:, None, :])
    meet, same = overlap.any(0).tolist(), one_doc.all(0).tolist()
    return tuple(
        _Tile(t.qf, t.kf, t.causal_mask, not same[t.qf][t.kf]) for t in tiles if meet[t.qf][t.kf]
    )


def _runs(tiles: list[_Tile], tile_elements: int) -> list[list[_Tile]]:
    """The tiles of one query fragment in runs of neighbours (key fragment index rising
    by one) of at most ``_RUN_ELEMENTS`` scores, ``tile_elements`` being one tile's."""
    limit = max(1, _RUN_ELEMENTS // tile_elements)
    runs: list[list[_Tile]] = []
    for tile in tiles:
        last = runs[-1][-1] if runs else None
        if last is not None and tile.kf == last.kf + 1 and len(runs[-1]) < limit:
            runs[-1].append(tile)
        else:
            runs.append([tile])
    return runs


class _Biases:
    """Additive tile masks (0 visible, -inf hidden) in folded-row layout, causal ones cached.

    An in-place add of a float bias is several times faster than ``masked_fill_``
    with a broadcast boolean mask on CPU.
    """

    def __init__(
        self,
        *,
        size: int,
        group: int,
        q_start: int,
        k_start: int,
        n_q: int,
        n_k: int,
        q_doc: Tensor | None,
        k_doc: Tensor | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.size, self.group, self.n_q, self.n_k = size, group, n_q, n_k
        self.q_start, self.k_start, self.dtype, self.device = q_start, k_start, dtype, device
        self.q_doc = None
        if q_doc is not None:  # one row per query head of a group, as in the folded layout
            self.q_doc = q_doc[:, :, None].expand(-1, -1, group).reshape(q_doc.shape[0], -1)
        self.k_doc = k_doc
        self._causal: dict[tuple[int, int, int], Tensor] = {}

    def _geometry(self, tile: _Tile) -> tuple[int, int, int]:
        """(query position - key position at the tile's corner, rows, cols) of a tile."""
        rows = min(self.size, self.n_q - tile.qf * self.size)
        cols = min(self.size, self.n_k - tile.kf * self.size)
        offset = (self.q_start + tile.qf * self.size) - (self.k_start + tile.kf * self.size)
        return offset, rows, cols

    def _causal_hidden(self, tile: _Tile) -> Tensor:
        """Causally hidden pairs of a tile, (rows * group, cols) bool."""
        offset, rows, cols = self._geometry(tile)
        q_pos = torch.arange(offset, offset + rows, device=self.device)
        q_pos = q_pos[:, None].expand(rows, self.group).reshape(-1)
        return torch.arange(cols, device=self.device) > q_pos[:, None]

    def _bias(self, hidden: Tensor) -> Tensor:
        bias = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device)
        return bias.masked_fill_(hidden, -math.inf)

    def __call__(self, tile: _Tile) -> Tensor:
        """Bias of shape (rows, cols) or, with documents, (B, 1, rows, cols)."""
        if not tile.doc_mask:
            key = self._geometry(tile)
            if key not in self._causal:
                self._causal[key] = self._bias(self._causal_hidden(tile))
            return self._causal[key]
        assert self.q_doc is not None and self.k_doc is not None
        rows = slice(tile.qf * self.size * self.group, (tile.qf + 1) * self.size * self.group)
        qd = self.q_doc[:, rows, None]
        kd = self.k_doc[:, None, tile.kf * self.size : (tile.kf + 1) * self.size]
        hidden = (qd != kd) | (qd < 0)
        if tile.causal_mask:
            hidden |= self._causal_hidden(tile)
        return self._bias(hidden[:, None])


def _add_bias(scores: Tensor, bias: Tensor, batch: int) -> None:
    """Add a tile bias in place; scores are (B * Hkv, rows, cols)."""
    if bias.dim() == 2:
        scores.add_(bias)
    else:
        scores.view(batch, -1, *scores.shape[1:]).add_(bias)


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
    tiles = _plan(
        n_q, n_k, size, causal=causal, q_start=q_start, k_start=k_start, q_doc=q_doc, k_doc=k_doc
    )
    biases = _Biases(
        size=size, group=group, q_start=q_start, k_start=k_start, n_q=n_q, n_k=n_k,
        q_doc=q_doc, k_doc=k_doc, dtype=acc_dtype, device=q.device,
    )  # fmt: skip
    rows_of = size * group
    by_query: dict[int, list[_Tile]] = {}
    for tile in tiles:
        by_query.setdefault(tile.qf, []).append(tile)
    tile_elements = batch * kv_heads * rows_of * size
    for qf, row_tiles in by_query.items():
        rows = slice(qf * rows_of, (qf + 1) * rows_of)
        q_frag = q3[:, rows] * (scale * LOG2E)
        runs = _runs(row_tiles, tile_elements)
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
    runs: list[list[_Tile]],
    biases: Callable[[_Tile], Tensor],
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
                _add_bias(s[:, :, j * size : (j + 1) * size], biases(tile), batch)
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
    tiles = _plan(
        n_q, n_k, size, causal=causal, q_start=q_start, k_start=k_start, q_doc=q_doc, k_doc=k_doc
    )
    biases = _Biases(
        size=size, group=group, q_start=q_start, k_start=k_start, n_q=n_q, n_k=n_k,
        q_doc=q_doc, k_doc=k_doc, dtype=acc_dtype, device=q.device,
    )  # fmt: skip
    by_key: dict[int, list[_Tile]] = {}
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
                _add_bias(p, biases(tile), batch)
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
