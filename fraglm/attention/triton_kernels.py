"""FragmentStream's Triton kernels: fused forward and backward, one program per tile row.

Notation for one (batch, head) and one query block ``i`` against key blocks ``j``:
``c = scale * log2(e)``, ``S_ij = c * Q_i K_j^T`` (base-2 scores), masked pairs ``-inf``.

Forward (one program per query block, online softmax in base 2)::

    m_new = max(m, rowmax(S_ij))          m_safe = 0 where m_new = -inf, else m_new
    P     = exp2(S_ij - m_safe)           alpha  = exp2(m - m_safe)
    l     = alpha * l + rowsum(P)         A      = alpha * A + P V_j      m = m_new
    O_i   = A / l (0 where l = 0)         LSE_i  = ln 2 * (m + log2 l)  (-inf where l = 0)

Backward, with ``LSE2 = log2(e) * LSE`` (``+inf`` for rows that see nothing, so their
``P`` is 0) and the pre-pass ``D_i = rowsum(dO_i * O_i)`` (minus ``dLSE_i`` when the
log-sum-exp itself has a gradient)::

    P_ij  = exp2(S_ij - LSE2_i)           dP_ij = dO_i V_j^T
    dS_ij = P_ij * (dP_ij - D_i)
    dV_j += P_ij^T dO_i                    dK_j += scale * dS_ij^T Q_i    (per key block)
    dQ_i += scale * dS_ij K_j                                            (per query block)

The key-block program loops over every query head of its key head's group, so
grouped-query attention sums ``dK``/``dV`` in registers: no K/V copies and no atomics.

The dK/dV program computes the transposed tile directly, ``S^T = c * K_j Q_i^T`` from a
transposed load of ``Q_i``, so ``P^T`` and ``dS^T`` enter their products without a
transpose through shared memory::

    P^T = exp2(S^T - LSE2^T)     dV_j += P^T dO_i     dP^T = V_j dO_i^T
    dS^T = P^T * (dP^T - D^T)    dK_j += scale * dS^T Q_i

Tiles: each program splits its range of blocks of the other side into masked / unmasked
/ masked parts and walks them in two loops (the unmasked part, then both masked parts),
each a straight-line body whose loads are pipelined. A causal tile wholly in the future
is never visited; only tiles that cross the diagonal or the sequence end need the causal
and bounds mask. With document ids, :func:`~fraglm.attention.documents.meeting_ranges`
(computed on the device, no host sync) gives each block the first and last block of the
other side it can meet, and the run of blocks that, like it, hold one same document and
no padding: the loops cover only the meeting range and leave the id mask out only in that
run. Tile sizes, warps and stages come from :func:`tile_config`, per kernel, capability
and head dim; results do not depend on them. All statistics and accumulators are
fp32; ``tl.dot`` takes fp16/bf16 operands (tensor cores) and fp32 operands at full
precision (``ieee``, not tf32).

Causal masking and fp32 outputs (the block routines') are runtime arguments, documents
and tiles compile-time ones: each kernel compiles once per dtype, head block and
documents-or-not.

Offsets: batch and head bases and each tile's first row are 64-bit, so tensors of more
than 2**31 elements address correctly; offsets inside a tile stay 32-bit. The grid is
one axis of ``blocks x batch x heads`` programs (up to 2**31 - 1).

Queries are the positions ``q_start ...`` and keys ``k_start ...``: a key is visible iff
its position is <= the query's (when causal) and both carry the same non-negative
document id (when ids are given). Rows with nothing visible give 0 and LSE ``-inf``.

Loaded by :mod:`fraglm.attention.triton_op` on first use. With ``TRITON_INTERPRET=1``
set when this module is first imported, the kernels run in Triton's interpreter on CPU
tensors (:data:`INTERPRETED`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from fraglm.attention.documents import meeting_ranges


def _interpreted() -> bool:
    """Whether triton runs its interpreter (``triton.knobs`` where it exists, 3.4+)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRETED = _interpreted()
LOG2E = math.log2(math.e)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(math.log(2.0))

KERNELS = ("fwd", "delta", "dkdv", "dq")


@dataclass(frozen=True)
class Tiles:
    """A kernel's launch shape: query rows and keys per tile, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Triton's interpreter (CPU tensors) runs each program in numpy: small, non-square tiles
_INTERPRETER_TILES = {
    "fwd": Tiles(32, 16, 1, 1),
    "delta": Tiles(32, 0, 1, 1),
    "dkdv": Tiles(16, 32, 1, 1),
    "dq": Tiles(32, 16, 1, 1),
}
# (kernel, BLOCK_D) -> tiles on capability 8.0+; see docs/benchmarks.md (compile check)
_GPU_TILES = {
    ("fwd", 16): Tiles(128, 64, 4, 3),
    ("fwd", 32): Tiles(128, 64, 4, 3),
    ("fwd", 64): Tiles(128, 64, 8, 3),
    ("fwd", 128): Tiles(128, 32, 8, 3),
    ("dkdv", 16): Tiles(32, 128, 4, 3),
    ("dkdv", 32): Tiles(32, 128, 8, 2),
    ("dkdv", 64): Tiles(16, 128, 8, 3),
    ("dkdv", 128): Tiles(16, 128, 8, 2),
    ("dq", 16): Tiles(128, 32, 4, 3),
    ("dq", 32): Tiles(128, 32, 4, 3),
    ("dq", 64): Tiles(128, 32, 8, 3),
    ("dq", 128): Tiles(64, 32, 4, 3),
}
# 8.6 and 8.9: ptxas spills dK/dV with 8.0's tiles there (compile check), these do not
_SM86_TILES = {("dkdv", 64): Tiles(16, 128, 8, 2), ("dkdv", 128): Tiles(16, 64, 8, 3)}


def head_block(head_dim: int) -> int:
    """The kernels' BLOCK_D: the head dim rounded up to a power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


def tile_config(kernel: str, capability: tuple[int, int] | None, head_dim: int) -> Tiles:
    """The tiles, warps and stages ``kernel`` (one of :data:`KERNELS`) launches with on a
    GPU of ``capability`` (None: the interpreter) at ``head_dim``. What the compile check
    (:mod:`fraglm.attention.compile_check`) checks is what runs: both call this. Results
    never depend on it. fp16 and bf16 compile alike, so the operands' dtype does not choose
    (fp32, not proven, takes the same tiles)."""
    if capability is None:
        return _INTERPRETER_TILES[kernel]
    if kernel == "delta":
        return Tiles(64, 0, 4, 1)
    key = (kernel, head_block(head_dim))
    if tuple(capability) in ((8, 6), (8, 9)) and key in _SM86_TILES:
        return _SM86_TILES[key]
    return _GPU_TILES[key]


@triton.jit
def _ids(DOC, idx, n):
    """Document ids at ``idx`` (any shape), -1 (padding) past ``n``."""
    return tl.load(DOC + idx, mask=idx < n, other=-1)


@triton.jit
def _store(OUT, OUT32, offsets, value, mask, fp32):
    """Store ``value`` at ``OUT + offsets`` in OUT's dtype, or at ``OUT32 + offsets`` in
    fp32 when ``fp32`` is nonzero (the block routines): one compiled kernel for both."""
    if fp32 != 0:
        tl.store(OUT32 + offsets, value, mask=mask)
    else:
        tl.store(OUT + offsets, value.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _visible(q_idx, k_idx, n_q, n_k, q_start, k_start, causal, qd, kd, HAS_DOCS: tl.constexpr):
    """Visibility of queries ``q_idx`` (ids ``qd``) to keys ``k_idx`` (ids ``kd``), one
    side a column and the other a row: in bounds, causal (when ``causal`` is nonzero),
    same non-negative document."""
    vis = (q_idx < n_q) & (k_idx < n_k)
    vis &= ((k_start + k_idx) <= (q_start + q_idx)) | (causal == 0)
    if HAS_DOCS:
        vis &= (qd == kd) & (qd >= 0)
    return vis


@triton.jit
def _rows_see(rows, cols, n_q, n_k, q_start, k_start, causal, qd, KDOC, HAS_DOCS: tl.constexpr):
    """(BM, BN) visibility of query ``rows`` (ids ``qd``) to the keys ``cols``, whose ids
    are loaded from ``KDOC``: a query block's tile."""
    kd = cols[None, :]
    if HAS_DOCS:
        kd = _ids(KDOC, cols[None, :], n_k)
    return _visible(
        rows[:, None], cols[None, :], n_q, n_k, q_start, k_start, causal, qd[:, None], kd,
        HAS_DOCS,
    )  # fmt: skip


@triton.jit
def _key_tile(K, V, start_n, offs_n, offs_d, sk_t, sv_t, n_k, head_dim):
    """The (BN, BD) key and value tiles from key ``start_n`` on (64-bit row offset), zeros
    past ``n_k`` and ``head_dim``."""
    mask = ((start_n + offs_n)[:, None] < n_k) & (offs_d[None, :] < head_dim)
    row0 = tl.cast(start_n, tl.int64)
    k = tl.load(K + row0 * sk_t + offs_n[:, None] * sk_t + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(V + row0 * sv_t + offs_n[:, None] * sv_t + offs_d[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit
def _tile_loops(lo, hi, u_lo, u_hi, RANGES, blk, BLOCK: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Split a block's range ``[lo, hi)`` of the other side (in ``BLOCK`` steps) into
    masked ``[lo, a)``, unmasked ``[a, b)`` and masked ``[b, hi)``, where ``[u_lo, u_hi)``
    needs no causal or bounds mask. With documents the range narrows to the block's
    meeting range and the unmasked part to its one-document run (``RANGES[blk]``).
    Returns ``lo, a, b`` and the tile counts of the two masked parts."""
    if HAS_DOCS:
        r = RANGES + blk * 4
        lo = tl.maximum(lo, tl.load(r) * BLOCK)
        hi = tl.minimum(hi, (tl.load(r + 1) + 1) * BLOCK)
        u_lo = tl.maximum(u_lo, tl.load(r + 2) * BLOCK)
        u_hi = tl.minimum(u_hi, (tl.load(r + 3) + 1) * BLOCK)
    a = tl.minimum(tl.maximum(u_lo, lo), hi)
    b = tl.maximum(tl.minimum(u_hi, hi), a)
    n_before = tl.cdiv(tl.maximum(a - lo, 0), BLOCK)
    return lo, a, b, n_before, tl.cdiv(tl.maximum(hi - b, 0), BLOCK)


@triton.jit
def _masked_start(i, lo, b, n_before, BLOCK: tl.constexpr):
    """Start of masked tile ``i``: the ``[lo, a)`` part first, then the ``[b, hi)`` part,
    one loop (one copy of the masked tile's code) for both."""
    return tl.where(i < n_before, lo + i * BLOCK, b + (i - n_before) * BLOCK)


@triton.jit
def _key_loop_bounds(first_q, last_q, n_k, k_start, causal, BLOCK_N: tl.constexpr):
    """Key range ``[0, hi)`` of a query block and the end of its causally unmasked blocks."""
    whole = n_k // BLOCK_N * BLOCK_N
    hi = tl.where(causal != 0, tl.minimum(n_k, tl.maximum(last_q - k_start + 1, 0)), n_k)
    full = tl.where(causal != 0, tl.maximum(first_q - k_start + 1, 0) // BLOCK_N * BLOCK_N, whole)
    return hi, tl.minimum(full, whole)


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, K, V, start_n, offs_n, offs_d, sk_t, sv_t,
    rows, n_q, n_k, q_start, k_start, causal, qd, KDOC, head_dim, qk_scale,
    MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    k, v = _key_tile(K, V, start_n, offs_n, offs_d, sk_t, sv_t, n_k, head_dim)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        vis = _rows_see(
            rows, start_n + offs_n, n_q, n_k, q_start, k_start, causal, qd, KDOC, HAS_DOCS
        )  # fmt: skip
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, OUT32, LSE, QDOC, KDOC, RANGES,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t, sqd_b, skd_b,
    n_bh, n_heads, group, n_q, n_k, q_start, k_start, causal, n_qb, qk_scale, head_dim,
    out_fp32,
    HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Forward of query block ``pid // n_bh`` of (batch, head) ``pid % n_bh``: the online
    softmax of the module docstring over its key range; writes ``O_i`` and ``LSE_i``."""
    pid = tl.program_id(0)
    bh, pid_m = pid % n_bh, pid // n_bh
    b, h = bh // n_heads, bh % n_heads
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), (h // group).to(tl.int64)
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (rows[:, None] < n_q) & (offs_d[None, :] < head_dim)
    q_base = b64 * sq_b + h64 * sq_h + start_m.to(tl.int64) * sq_t
    q = tl.load(Q + q_base + offs_m[:, None] * sq_t + offs_d[None, :], mask=q_mask, other=0.0)
    K += b64 * sk_b + hk64 * sk_h
    V += b64 * sv_b + hk64 * sv_h
    qd = rows
    if HAS_DOCS:
        qd = _ids(QDOC + b64 * sqd_b, rows, n_q)
        KDOC += b64 * skd_b
        RANGES += b64 * n_qb * 4
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first_q = q_start + start_m
    last_q = q_start + tl.minimum(start_m + BLOCK_M, n_q) - 1
    hi, full = _key_loop_bounds(first_q, last_q, n_k, k_start, causal, BLOCK_N)
    lo, a, b_, n_before, n_after = _tile_loops(0, hi, 0, full, RANGES, pid_m, BLOCK_N, HAS_DOCS)
    for start_n in range(a, b_, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, K, V, start_n, offs_n, offs_d, sk_t, sv_t, rows,
            n_q, n_k, q_start, k_start, causal, qd, KDOC, head_dim, qk_scale,
            False, HAS_DOCS, PRECISION,
        )  # fmt: skip
    for i in range(0, n_before + n_after):
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, K, V, _masked_start(i, lo, b_, n_before, BLOCK_N), offs_n,
            offs_d, sk_t, sv_t, rows, n_q, n_k, q_start, k_start, causal, qd, KDOC,
            head_dim, qk_scale, True, HAS_DOCS, PRECISION,
        )  # fmt: skip
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    o_base = b64 * so_b + h64 * so_h + start_m.to(tl.int64) * so_t
    _store(OUT, OUT32, o_base + offs_m[:, None] * so_t + offs_d[None, :], out, q_mask, out_fp32)
    tl.store(LSE + bh.to(tl.int64) * n_q + rows, lse, mask=rows < n_q)


@triton.jit
def _delta_kernel(
    OUT, DOUT, DELTA, so_b, so_h, so_t, sd_b, sd_h, sd_t, n_bh, n_heads, n_q, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``D = rowsum(dO * O)`` in fp32, the backward pass's pre-pass."""
    pid = tl.program_id(0)
    bh, pid_m = pid % n_bh, pid // n_bh
    b64, h64 = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_q) & (offs_d[None, :] < head_dim)
    o_base = b64 * so_b + h64 * so_h + start_m.to(tl.int64) * so_t
    d_base = b64 * sd_b + h64 * sd_h + start_m.to(tl.int64) * sd_t
    o = tl.load(OUT + o_base + offs_m[:, None] * so_t + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DOUT + d_base + offs_m[:, None] * sd_t + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * n_q + rows, delta, mask=rows < n_q)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, Q, DO, LSE, DELTA, start_m, sq_t, sdo_t, cols, offs_d,
    n_q, n_k, q_start, k_start, causal, QDOC, kd, qk_scale, head_dim,
    MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    offs_m = tl.arange(0, BLOCK_M)
    rows = start_m + offs_m
    row_ok = rows < n_q
    row0 = tl.cast(start_m, tl.int64)
    # Q_i^T (BLOCK_D, BLOCK_M) loaded transposed, dO_i (BLOCK_M, BLOCK_D)
    qt_mask = row_ok[None, :] & (offs_d[:, None] < head_dim)
    qt = tl.load(Q + row0 * sq_t + offs_m[None, :] * sq_t + offs_d[:, None], mask=qt_mask,
                 other=0.0)  # fmt: skip
    do_ptrs = DO + row0 * sdo_t + offs_m[:, None] * sdo_t + offs_d[None, :]
    do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    pt = tl.math.exp2(tl.dot(k, qt, input_precision=PRECISION) * qk_scale - lse2[None, :])
    if MASKED:
        qd = rows[None, :]
        if HAS_DOCS:
            qd = _ids(QDOC, rows[None, :], n_q)
        vis = _visible(
            rows[None, :], cols[:, None], n_q, n_k, q_start, k_start, causal, qd, kd, HAS_DOCS
        )
        pt = tl.where(vis, pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DK32, DV32, QDOC, KDOC, RANGES,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
    sdk_b, sdk_h, sdk_t, sdv_b, sdv_h, sdv_t, sqd_b, skd_b,
    n_bh, n_heads, group, n_q, n_k, q_start, k_start, causal, n_kb, qk_scale, scale,
    head_dim, out_fp32, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dK_j and dV_j of key block ``pid // n_bh`` of (batch, key head) ``pid % n_bh``,
    summed over the query heads of its group and its range of query blocks."""
    pid = tl.program_id(0)
    bhk, pid_n = pid % n_bh, pid // n_bh
    kv_heads = n_heads // group
    b, hk = bhk // kv_heads, bhk % kv_heads
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < n_k) & (offs_d[None, :] < head_dim)
    row0 = tl.cast(start_n, tl.int64)
    k_ptrs = K + b64 * sk_b + hk64 * sk_h + row0 * sk_t + offs_n[:, None] * sk_t + offs_d[None, :]
    v_ptrs = V + b64 * sv_b + hk64 * sv_h + row0 * sv_t + offs_n[:, None] * sv_t + offs_d[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    kd = cols[:, None]
    if HAS_DOCS:
        QDOC += b64 * sqd_b
        kd = _ids(KDOC + b64 * skd_b, cols[:, None], n_k)
        RANGES += b64 * n_kb * 4
    # Query blocks that see this key block: from the first one holding a query at or
    # after its first key (when causal); causally unmasked once every query is past its
    # last key, and only while the key block and the query block are whole.
    lo = tl.maximum(k_start + start_n - q_start, 0) // BLOCK_M * BLOCK_M
    lo = tl.where(causal != 0, tl.minimum(lo, n_q), 0)
    last_k = k_start + start_n + BLOCK_N - 1
    full = tl.maximum(last_k - q_start + BLOCK_M - 1, 0) // BLOCK_M * BLOCK_M
    full = tl.where(causal != 0, tl.minimum(tl.maximum(full, lo), n_q), 0)
    full_end = tl.where(start_n + BLOCK_N <= n_k, n_q // BLOCK_M * BLOCK_M, full)
    full_end = tl.maximum(full_end, full)
    lo, a, b_, n_before, n_after = _tile_loops(
        lo, n_q, full, full_end, RANGES, pid_n, BLOCK_M, HAS_DOCS
    )
    for g in range(0, group):
        h64 = hk64 * group + g
        bh64 = b64 * n_heads + h64
        q_ptr = Q + b64 * sq_b + h64 * sq_h
        do_ptr = DO + b64 * sdo_b + h64 * sdo_h
        lse_ptr = LSE + bh64 * n_q
        delta_ptr = DELTA + bh64 * n_q
        for start_m in range(a, b_, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, start_m, sq_t, sdo_t, cols,
                offs_d, n_q, n_k, q_start, k_start, causal, QDOC, kd, qk_scale, head_dim,
                False, HAS_DOCS, BLOCK_M, PRECISION,
            )  # fmt: skip
        for i in range(0, n_before + n_after):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr,
                _masked_start(i, lo, b_, n_before, BLOCK_M), sq_t, sdo_t, cols, offs_d,
                n_q, n_k, q_start, k_start, causal, QDOC, kd, qk_scale, head_dim,
                True, HAS_DOCS, BLOCK_M, PRECISION,
            )  # fmt: skip
    dk = dk * scale
    dk_base = b64 * sdk_b + hk64 * sdk_h + row0 * sdk_t
    dv_base = b64 * sdv_b + hk64 * sdv_h + row0 * sdv_t
    tile = offs_n[:, None] * sdk_t + offs_d[None, :]
    _store(DK, DK32, dk_base + tile, dk, kv_mask, out_fp32)
    _store(DV, DV32, dv_base + offs_n[:, None] * sdv_t + offs_d[None, :], dv, kv_mask, out_fp32)


@triton.jit
def _dq_tile(
    dq, q, do, lse2, delta, K, V, start_n, offs_n, offs_d, sk_t, sv_t, rows,
    n_q, n_k, q_start, k_start, causal, qd, KDOC, head_dim, qk_scale,
    MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    k, v = _key_tile(K, V, start_n, offs_n, offs_d, sk_t, sv_t, n_k, head_dim)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                     - lse2[:, None])  # fmt: skip
    if MASKED:
        vis = _rows_see(
            rows, start_n + offs_n, n_q, n_k, q_start, k_start, causal, qd, KDOC, HAS_DOCS
        )  # fmt: skip
        p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DQ32, QDOC, KDOC, RANGES,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
    sdq_b, sdq_h, sdq_t, sqd_b, skd_b,
    n_bh, n_heads, group, n_q, n_k, q_start, k_start, causal, n_qb, qk_scale, scale,
    head_dim, out_fp32, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dQ_i of query block ``pid // n_bh`` of (batch, head) ``pid % n_bh`` over its key range."""
    pid = tl.program_id(0)
    bh, pid_m = pid % n_bh, pid // n_bh
    b, h = bh // n_heads, bh % n_heads
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), (h // group).to(tl.int64)
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_q
    q_mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    row0 = tl.cast(start_m, tl.int64)
    q_ptrs = Q + b64 * sq_b + h64 * sq_h + row0 * sq_t + offs_m[:, None] * sq_t + offs_d[None, :]
    do_ptrs = (DO + b64 * sdo_b + h64 * sdo_h + row0 * sdo_t + offs_m[:, None] * sdo_t
               + offs_d[None, :])  # fmt: skip
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(do_ptrs, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * n_q + rows, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(DELTA + bh.to(tl.int64) * n_q + rows, mask=row_ok, other=0.0)
    K += b64 * sk_b + hk64 * sk_h
    V += b64 * sv_b + hk64 * sv_h
    qd = rows
    if HAS_DOCS:
        qd = _ids(QDOC + b64 * sqd_b, rows, n_q)
        KDOC += b64 * skd_b
        RANGES += b64 * n_qb * 4
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first_q = q_start + start_m
    last_q = q_start + tl.minimum(start_m + BLOCK_M, n_q) - 1
    hi, full = _key_loop_bounds(first_q, last_q, n_k, k_start, causal, BLOCK_N)
    lo, a, b_, n_before, n_after = _tile_loops(0, hi, 0, full, RANGES, pid_m, BLOCK_N, HAS_DOCS)
    for start_n in range(a, b_, BLOCK_N):
        dq = _dq_tile(
            dq, q, do, lse2, delta, K, V, start_n, offs_n, offs_d, sk_t, sv_t, rows,
            n_q, n_k, q_start, k_start, causal, qd, KDOC, head_dim, qk_scale,
            False, HAS_DOCS, PRECISION,
        )  # fmt: skip
    for i in range(0, n_before + n_after):
        dq = _dq_tile(
            dq, q, do, lse2, delta, K, V, _masked_start(i, lo, b_, n_before, BLOCK_N),
            offs_n, offs_d, sk_t, sv_t, rows, n_q, n_k, q_start, k_start, causal, qd, KDOC,
            head_dim, qk_scale, True, HAS_DOCS, PRECISION,
        )  # fmt: skip
    dq = dq * scale
    dq_offs = b64 * sdq_b + h64 * sdq_h + row0 * sdq_t + offs_m[:, None] * sdq_t + offs_d[None, :]
    _store(DQ, DQ32, dq_offs, dq, q_mask, out_fp32)


def _precision(dtype: torch.dtype) -> str | None:
    """fp32 operands at full precision (not tf32); fp16/bf16 take the default."""
    return "ieee" if dtype == torch.float32 else None


def _capability(t: Tensor) -> tuple[int, int] | None:
    """The tile table's key for ``t``'s device: None on the CPU (the interpreter)."""
    return None if t.device.type == "cpu" else torch.cuda.get_device_capability(t.device)


class _Docs:
    """Document ids and one kernel's meeting ranges as kernel arguments (dummies without
    ids): per query block of ``q_block`` over key blocks of ``k_block``, or per key block
    over query blocks when ``per_key_block``."""

    def __init__(
        self, q_doc: Tensor | None, k_doc: Tensor | None, tiles: Tiles, like: Tensor, *,
        per_key_block: bool,
    ) -> None:  # fmt: skip
        self.present = q_doc is not None and k_doc is not None
        if q_doc is None or k_doc is None:
            dummy = torch.zeros(1, dtype=torch.int64, device=like.device)
            self.tensors = (dummy, dummy, dummy.to(torch.int32))
            self.strides = (0, 0)
            return
        q_doc, k_doc = q_doc.contiguous(), k_doc.contiguous()
        if per_key_block:
            ranges = meeting_ranges(k_doc, tiles.block_n, q_doc, tiles.block_m)
        else:
            ranges = meeting_ranges(q_doc, tiles.block_m, k_doc, tiles.block_n)
        self.tensors = (q_doc, k_doc, ranges)
        self.strides = (q_doc.stride(0), k_doc.stride(0))


def _last_dim_contiguous(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _outputs(t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, int]:
    """``t`` as a kernel's output pair (operands' dtype, fp32) and its fp32 flag, with a
    one-element dummy in the unused place."""
    if t.dtype == like.dtype:
        return t, torch.empty(1, dtype=torch.float32, device=t.device), 0
    if t.dtype != torch.float32:
        raise ValueError(f"outputs are in the operands' dtype or fp32, not {t.dtype}")
    return torch.empty(1, dtype=like.dtype, device=t.device), t, 1


def _options(tiles: Tiles, dtype: torch.dtype, dim: int) -> dict:
    return {
        "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_D": head_block(dim),
        "PRECISION": _precision(dtype), "num_warps": tiles.num_warps,
        "num_stages": tiles.num_stages,
    }  # fmt: skip


def forward(
    q: Tensor, k: Tensor, v: Tensor, q_doc: Tensor | None, k_doc: Tensor | None, *,
    causal: bool, scale: float, q_start: int, k_start: int, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Launch the forward kernel: ``out`` (B, H, Tq, D) in ``out_dtype``, ``lse`` fp32."""
    q, k, v = _last_dim_contiguous(q, k, v)
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    tiles = tile_config("fwd", _capability(q), dim)
    docs = _Docs(q_doc, k_doc, tiles, q, per_key_block=False)
    n_qb = triton.cdiv(n_q, tiles.block_m)
    out16, out32, fp32 = _outputs(out, q)
    _fwd_kernel[(n_qb * batch * heads,)](
        q, k, v, out16, out32, lse, *docs.tensors,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *docs.strides,
        batch * heads, heads, heads // kv_heads, n_q, n_k, q_start, k_start,
        int(causal), n_qb, scale * LOG2E, dim, fp32, HAS_DOCS=docs.present,
        **_options(tiles, q.dtype, dim),
    )  # fmt: skip
    return out, lse


def softmax_delta(out: Tensor, dout: Tensor) -> Tensor:
    """``rowsum(dout * out)`` (B, H, T) in fp32, one fused pass."""
    out, dout = _last_dim_contiguous(out, dout)
    batch, heads, n_q, dim = out.shape
    delta = torch.empty((batch, heads, n_q), dtype=torch.float32, device=out.device)
    if delta.numel() == 0:
        return delta
    tiles = tile_config("delta", _capability(out), dim)
    _delta_kernel[(triton.cdiv(n_q, tiles.block_m) * batch * heads,)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], batch * heads, heads, n_q,
        dim, BLOCK_M=tiles.block_m, BLOCK_D=head_block(dim), num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )  # fmt: skip
    return delta


def backward(
    q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor,
    q_doc: Tensor | None, k_doc: Tensor | None, *, causal: bool, scale: float,
    q_start: int, k_start: int, grad_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Launch the dK/dV and dQ kernels; gradients in ``grad_dtype`` (None: the inputs')."""
    q, k, v, dout = _last_dim_contiguous(q, k, v, dout)
    lse, delta = lse.float().contiguous(), delta.float().contiguous()
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=grad_dtype or q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=grad_dtype or k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=grad_dtype or v.dtype, device=q.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    sizes = (n_q, n_k, q_start, k_start, int(causal))
    inputs = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    tiles = tile_config("dkdv", _capability(q), dim)
    docs = _Docs(q_doc, k_doc, tiles, q, per_key_block=True)
    n_kb = triton.cdiv(n_k, tiles.block_n)
    dk16, dk32, fp32 = _outputs(dk, q)
    dv16, dv32, _ = _outputs(dv, q)
    _dkdv_kernel[(n_kb * batch * kv_heads,)](
        q, k, v, dout, lse, delta, dk16, dv16, dk32, dv32, *docs.tensors,
        *inputs, *dk.stride()[:3], *dv.stride()[:3], *docs.strides,
        batch * kv_heads, heads, heads // kv_heads, *sizes, n_kb, scale * LOG2E, scale, dim,
        fp32,
        HAS_DOCS=docs.present, **_options(tiles, q.dtype, dim),
    )  # fmt: skip
    tiles = tile_config("dq", _capability(q), dim)
    docs = _Docs(q_doc, k_doc, tiles, q, per_key_block=False)
    n_qb = triton.cdiv(n_q, tiles.block_m)
    dq16, dq32, fp32 = _outputs(dq, q)
    _dq_kernel[(n_qb * batch * heads,)](
        q, k, v, dout, lse, delta, dq16, dq32, *docs.tensors,
        *inputs, *dq.stride()[:3], *docs.strides,
        batch * heads, heads, heads // kv_heads, *sizes, n_qb, scale * LOG2E, scale, dim, fp32,
        HAS_DOCS=docs.present, **_options(tiles, q.dtype, dim),
    )  # fmt: skip
    return dq, dk, dv
