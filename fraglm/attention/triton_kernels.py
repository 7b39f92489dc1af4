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

Tiles: a causal tile wholly in the future is never visited (the loops stop at the
diagonal) and only tiles that cross the diagonal or the sequence end are masked. With
document ids, each block's min and max non-padding id (:func:`block_doc_ranges`, computed
on the device, no host sync) decide: a tile whose ranges cannot meet is skipped, the
others are masked by id (a load of one id per key and a compare, next to the tile's two
matrix products). All statistics and accumulators are fp32; ``tl.dot`` takes fp16/bf16
operands (tensor cores) and fp32 operands at full precision (``ieee``, not tf32).

Queries are the positions ``q_start ...`` and keys ``k_start ...``: a key is visible iff
its position is <= the query's (when causal) and both carry the same non-negative
document id (when ids are given). Rows with nothing visible give 0 and LSE ``-inf``.

Loaded by :mod:`fraglm.attention.triton_op` on first use. With ``TRITON_INTERPRET=1``
set when this module is first imported, the kernels run in Triton's interpreter on CPU
tensors (:data:`INTERPRETED`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fraglm.attention.documents import fragment_doc_ranges

INTERPRETED = bool(triton.knobs.runtime.interpret)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@triton.jit
def _visible(
    offs_m, offs_n, start_n, n_q, n_k, q_start, k_start, qd, KDOC, k_doc_stride,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    """(BM, BN) visibility of a tile: in bounds, causal, same document."""
    cols = start_n + offs_n
    vis = (offs_m[:, None] < n_q) & (cols[None, :] < n_k)
    if CAUSAL:
        vis &= (k_start + cols)[None, :] <= (q_start + offs_m)[:, None]
    if HAS_DOCS:
        kd = tl.load(KDOC + cols * k_doc_stride, mask=cols < n_k, other=-1)
        vis &= (qd[:, None] == kd[None, :]) & (qd[:, None] >= 0)
    return vis


@triton.jit
def _tiles_meet(QLO, QHI, KLO, KHI, qb, kb):
    """Whether the document id ranges of query block ``qb`` and key block ``kb`` meet."""
    return (tl.load(QLO + qb) <= tl.load(KHI + kb)) & (tl.load(KLO + kb) <= tl.load(QHI + qb))


@triton.jit
def _key_loop_bounds(first_q, last_q, n_k, k_start, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key range ``[0, hi)`` of a query block and the end of its unmasked full blocks."""
    if CAUSAL:
        hi = tl.minimum(n_k, tl.maximum(last_q - k_start + 1, 0))
        full = tl.maximum(first_q - k_start + 1, 0) // BLOCK_N * BLOCK_N
    else:
        hi = n_k
        full = n_k // BLOCK_N * BLOCK_N
    return hi, tl.minimum(full, n_k // BLOCK_N * BLOCK_N)


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, K, V, start_n, offs_n, offs_d, k_t_stride, v_t_stride,
    offs_m, n_q, n_k, q_start, k_start, qd, KDOC, k_doc_stride, head_dim, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    cols = start_n + offs_n
    kv_mask = (cols[:, None] < n_k) & (offs_d[None, :] < head_dim)
    k = tl.load(K + cols[:, None] * k_t_stride + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + cols[:, None] * v_t_stride + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        vis = _visible(
            offs_m, offs_n, start_n, n_q, n_k, q_start, k_start, qd, KDOC, k_doc_stride,
            CAUSAL, HAS_DOCS,
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
    Q, K, V, OUT, LSE, QDOC, KDOC, QLO, QHI, KLO, KHI,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
    sqd_b, sqd_t, skd_b, skd_t,
    n_heads, group, n_q, n_k, q_start, k_start, n_qb, n_kb, qk_scale, head_dim,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < head_dim)
    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    K += b * sk_b + hk * sk_h
    V += b * sv_b + hk * sv_h
    qd = offs_m
    if HAS_DOCS:
        qd = tl.load(QDOC + b * sqd_b + offs_m * sqd_t, mask=offs_m < n_q, other=-1)
        KDOC += b * skd_b
        QLO += b * n_qb
        QHI += b * n_qb
        KLO += b * n_kb
        KHI += b * n_kb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first_q = q_start + pid_m * BLOCK_M
    last_q = q_start + tl.minimum((pid_m + 1) * BLOCK_M, n_q) - 1
    hi, full = _key_loop_bounds(first_q, last_q, n_k, k_start, BLOCK_N, CAUSAL)
    # Full tiles need no causal or bounds mask; with documents, tiles whose id ranges
    # cannot meet are skipped and the others masked. Without documents the loop body is
    # straight-line code, so that its loads can be pipelined.
    for start_n in range(0, full, BLOCK_N):
        meet = True
        if HAS_DOCS:
            meet = _tiles_meet(QLO, QHI, KLO, KHI, pid_m, start_n // BLOCK_N)
        if meet:
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, K, V, start_n, offs_n, offs_d, sk_t, sv_t, offs_m,
                n_q, n_k, q_start, k_start, qd, KDOC, skd_t, head_dim, qk_scale,
                HAS_DOCS, False, HAS_DOCS, PRECISION,
            )  # fmt: skip
    for start_n in range(full, hi, BLOCK_N):
        meet = True
        if HAS_DOCS:
            meet = _tiles_meet(QLO, QHI, KLO, KHI, pid_m, start_n // BLOCK_N)
        if meet:
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, K, V, start_n, offs_n, offs_d, sk_t, sv_t, offs_m,
                n_q, n_k, q_start, k_start, qd, KDOC, skd_t, head_dim, qk_scale,
                True, CAUSAL, HAS_DOCS, PRECISION,
            )  # fmt: skip
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_ptrs = OUT + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh * n_q + offs_m, lse, mask=offs_m < n_q)


@triton.jit
def _delta_kernel(
    OUT, DOUT, DELTA, so_b, so_h, so_t, sd_b, sd_h, sd_t, n_heads, n_q, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``D = rowsum(dO * O)`` in fp32, the backward pass's pre-pass."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < head_dim)
    o = tl.load(OUT + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :],
                mask=mask, other=0.0)  # fmt: skip
    do = tl.load(DOUT + b * sd_b + h * sd_h + offs_m[:, None] * sd_t + offs_d[None, :],
                 mask=mask, other=0.0)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * n_q + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _probabilities(
    q, k, lse2, offs_m, offs_n, start_n, n_q, n_k, q_start, k_start, qd, KDOC, k_doc_stride,
    qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """P = exp2(S - LSE2) of a tile; 0 where hidden."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        vis = _visible(
            offs_m, offs_n, start_n, n_q, n_k, q_start, k_start, qd, KDOC, k_doc_stride,
            CAUSAL, HAS_DOCS,
        )  # fmt: skip
        p = tl.where(vis, p, 0.0)
    return p


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, Q, DO, LSE, DELTA, start_m, sq_t, sdo_t, offs_n, offs_d, start_n,
    n_q, n_k, q_start, k_start, QDOC, sqd_t, KDOC, skd_t, qk_scale, head_dim,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_q
    q_mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    q = tl.load(Q + offs_m[:, None] * sq_t + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * sdo_t + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    qd = offs_m
    if HAS_DOCS:
        qd = tl.load(QDOC + offs_m * sqd_t, mask=row_ok, other=-1)
    p = _probabilities(
        q, k, lse2, offs_m, offs_n, start_n, n_q, n_k, q_start, k_start,
        qd, KDOC, skd_t, qk_scale, MASKED, CAUSAL, HAS_DOCS, PRECISION,
    )  # fmt: skip
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_step(
    dk, dv, k, v, Q, DO, LSE, DELTA, start_m, sq_t, sdo_t, offs_n, offs_d, start_n,
    n_q, n_k, q_start, k_start, QDOC, sqd_t, KDOC, skd_t, qk_scale, head_dim,
    QLO, QHI, KLO, KHI, kb,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One query block of a key block's loop; skipped when the documents cannot meet."""
    meet = True
    if HAS_DOCS:
        meet = _tiles_meet(QLO, QHI, KLO, KHI, start_m // BLOCK_M, kb)
    if meet:
        dk, dv = _dkdv_tile(
            dk, dv, k, v, Q, DO, LSE, DELTA, start_m, sq_t, sdo_t, offs_n, offs_d, start_n,
            n_q, n_k, q_start, k_start, QDOC, sqd_t, KDOC, skd_t, qk_scale, head_dim,
            MASKED, CAUSAL, HAS_DOCS, BLOCK_M, PRECISION,
        )  # fmt: skip
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, QDOC, KDOC, QLO, QHI, KLO, KHI,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
    sdk_b, sdk_h, sdk_t, sdv_b, sdv_h, sdv_t, sqd_b, sqd_t, skd_b, skd_t,
    n_heads, group, n_q, n_k, q_start, k_start, n_qb, n_kb, qk_scale, scale, head_dim,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n, bhk = tl.program_id(0), tl.program_id(1)
    kv_heads = n_heads // group
    b, hk = bhk // kv_heads, bhk % kv_heads
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < n_k) & (offs_d[None, :] < head_dim)
    k = tl.load(K + b * sk_b + hk * sk_h + offs_n[:, None] * sk_t + offs_d[None, :],
                mask=kv_mask, other=0.0)  # fmt: skip
    v = tl.load(V + b * sv_b + hk * sv_h + offs_n[:, None] * sv_t + offs_d[None, :],
                mask=kv_mask, other=0.0)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if HAS_DOCS:
        QDOC += b * sqd_b
        KDOC += b * skd_b
        QLO += b * n_qb
        QHI += b * n_qb
        KLO += b * n_kb
        KHI += b * n_kb
    # Query blocks that see this key block: from the first one holding a query at or
    # after its first key (when causal); unmasked once every query is past its last key.
    if CAUSAL:
        lo = tl.maximum(k_start + start_n - q_start, 0) // BLOCK_M * BLOCK_M
        lo = tl.minimum(lo, n_q)
        last_k = k_start + start_n + BLOCK_N - 1
        full = tl.maximum(last_k - q_start + BLOCK_M - 1, 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.maximum(full, lo), n_q)
    else:
        lo = 0
        full = 0
    # unmasked tiles need whole blocks of keys and of queries
    full_end = tl.where(start_n + BLOCK_N <= n_k, n_q // BLOCK_M * BLOCK_M, full)
    full_end = tl.maximum(full_end, full)
    for g in range(0, group):
        h = hk * group + g
        bh = b * n_heads + h
        q_ptr = Q + b * sq_b + h * sq_h
        do_ptr = DO + b * sdo_b + h * sdo_h
        lse_ptr = LSE + bh * n_q
        delta_ptr = DELTA + bh * n_q
        # masked tiles at the diagonal, full tiles, then the last (partial) query block
        for start_m in range(lo, full, BLOCK_M):
            dk, dv = _dkdv_step(
                dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, start_m, sq_t, sdo_t,
                tl.arange(0, BLOCK_N), offs_d, start_n, n_q, n_k, q_start, k_start,
                QDOC, sqd_t, KDOC, skd_t, qk_scale, head_dim, QLO, QHI, KLO, KHI, pid_n,
                True, CAUSAL, HAS_DOCS, BLOCK_M, PRECISION,
            )  # fmt: skip
        for start_m in range(full, full_end, BLOCK_M):
            dk, dv = _dkdv_step(
                dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, start_m, sq_t, sdo_t,
                tl.arange(0, BLOCK_N), offs_d, start_n, n_q, n_k, q_start, k_start,
                QDOC, sqd_t, KDOC, skd_t, qk_scale, head_dim, QLO, QHI, KLO, KHI, pid_n,
                HAS_DOCS, False, HAS_DOCS, BLOCK_M, PRECISION,
            )  # fmt: skip
        for start_m in range(full_end, n_q, BLOCK_M):
            dk, dv = _dkdv_step(
                dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, start_m, sq_t, sdo_t,
                tl.arange(0, BLOCK_N), offs_d, start_n, n_q, n_k, q_start, k_start,
                QDOC, sqd_t, KDOC, skd_t, qk_scale, head_dim, QLO, QHI, KLO, KHI, pid_n,
                True, CAUSAL, HAS_DOCS, BLOCK_M, PRECISION,
            )  # fmt: skip
    dk = dk * scale
    tl.store(DK + b * sdk_b + hk * sdk_h + offs_n[:, None] * sdk_t + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)  # fmt: skip
    tl.store(DV + b * sdv_b + hk * sdv_h + offs_n[:, None] * sdv_t + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)  # fmt: skip


@triton.jit
def _dq_tile(
    dq, q, do, lse2, delta, K, V, start_n, offs_n, offs_d, sk_t, sv_t, offs_m,
    n_q, n_k, q_start, k_start, qd, KDOC, skd_t, head_dim, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    cols = start_n + offs_n
    kv_mask = (cols[:, None] < n_k) & (offs_d[None, :] < head_dim)
    k = tl.load(K + cols[:, None] * sk_t + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + cols[:, None] * sv_t + offs_d[None, :], mask=kv_mask, other=0.0)
    p = _probabilities(
        q, k, lse2, offs_m, offs_n, start_n, n_q, n_k, q_start, k_start, qd, KDOC, skd_t,
        qk_scale, MASKED, CAUSAL, HAS_DOCS, PRECISION,
    )  # fmt: skip
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, QDOC, KDOC, QLO, QHI, KLO, KHI,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
    sdq_b, sdq_h, sdq_t, sqd_b, sqd_t, skd_b, skd_t,
    n_heads, group, n_q, n_k, q_start, k_start, n_qb, n_kb, qk_scale, scale, head_dim,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_q
    q_mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                mask=q_mask, other=0.0)  # fmt: skip
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :],
                 mask=q_mask, other=0.0)  # fmt: skip
    lse = tl.load(LSE + bh * n_q + offs_m, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + bh * n_q + offs_m, mask=row_ok, other=0.0)
    K += b * sk_b + hk * sk_h
    V += b * sv_b + hk * sv_h
    qd = offs_m
    if HAS_DOCS:
        qd = tl.load(QDOC + b * sqd_b + offs_m * sqd_t, mask=row_ok, other=-1)
        KDOC += b * skd_b
        QLO += b * n_qb
        QHI += b * n_qb
        KLO += b * n_kb
        KHI += b * n_kb
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first_q = q_start + pid_m * BLOCK_M
    last_q = q_start + tl.minimum((pid_m + 1) * BLOCK_M, n_q) - 1
    hi, full = _key_loop_bounds(first_q, last_q, n_k, k_start, BLOCK_N, CAUSAL)
    for start_n in range(0, full, BLOCK_N):
        meet = True
        if HAS_DOCS:
            meet = _tiles_meet(QLO, QHI, KLO, KHI, pid_m, start_n // BLOCK_N)
        if meet:
            dq = _dq_tile(
                dq, q, do, lse2, delta, K, V, start_n, offs_n, offs_d, sk_t, sv_t, offs_m,
                n_q, n_k, q_start, k_start, qd, KDOC, skd_t, head_dim, qk_scale,
                HAS_DOCS, False, HAS_DOCS, PRECISION,
            )  # fmt: skip
    for start_n in range(full, hi, BLOCK_N):
        meet = True
        if HAS_DOCS:
            meet = _tiles_meet(QLO, QHI, KLO, KHI, pid_m, start_n // BLOCK_N)
        if meet:
            dq = _dq_tile(
                dq, q, do, lse2, delta, K, V, start_n, offs_n, offs_d, sk_t, sv_t, offs_m,
                n_q, n_k, q_start, k_start, qd, KDOC, skd_t, head_dim, qk_scale,
                True, CAUSAL, HAS_DOCS, PRECISION,
            )  # fmt: skip
    dq = dq * scale
    tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_t + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)  # fmt: skip


def block_doc_ranges(doc: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Min and max document id of each kernel block (:func:`fragment_doc_ranges`), int32."""
    lo, hi, _ = fragment_doc_ranges(doc, block)
    return lo.clamp(max=torch.iinfo(torch.int32).max).to(torch.int32), hi.to(torch.int32)


def _head_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str | None:
    """fp32 operands at full precision (not tf32); fp16/bf16 take the default."""
    return "ieee" if dtype == torch.float32 else None


def _launch_options(block: int, head_dim: int) -> dict[str, int]:
    """Warps and pipeline stages: untuned defaults (see docs/benchmarks.md, GPU figures)."""
    return {"num_warps": 4 if block * max(head_dim, 64) <= 64 * 64 else 8, "num_stages": 2}


class _Docs:
    """Document ids and their block ranges as kernel arguments (dummies without ids)."""

    def __init__(
        self, q_doc: Tensor | None, k_doc: Tensor | None, block: int, like: Tensor
    ) -> None:
        self.present = q_doc is not None
        if q_doc is None or k_doc is None:
            dummy = torch.zeros(1, dtype=torch.int32, device=like.device)
            self.q, self.k = dummy, dummy
            self.q_ranges = self.k_ranges = (dummy, dummy)
            self.strides = (0, 0, 0, 0)
            return
        self.q, self.k = q_doc, k_doc
        self.q_ranges = block_doc_ranges(q_doc, block)
        self.k_ranges = block_doc_ranges(k_doc, block)
        self.strides = (*q_doc.stride(), *k_doc.stride())

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.q, self.k, *self.q_ranges, *self.k_ranges)


def _last_dim_contiguous(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def forward(
    q: Tensor, k: Tensor, v: Tensor, q_doc: Tensor | None, k_doc: Tensor | None, *,
    causal: bool, block: int, scale: float, q_start: int, k_start: int,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Launch the forward kernel: ``out`` (B, H, Tq, D) in ``out_dtype``, ``lse`` fp32."""
    q, k, v = _last_dim_contiguous(q, k, v)
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    docs = _Docs(q_doc, k_doc, block, q)
    grid = (triton.cdiv(n_q, block), batch * heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, *docs.tensors(),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *docs.strides,
        heads, heads // kv_heads, n_q, n_k, q_start, k_start,
        triton.cdiv(n_q, block), triton.cdiv(n_k, block), scale * LOG2E, dim,
        CAUSAL=causal, HAS_DOCS=docs.present, BLOCK_M=block, BLOCK_N=block,
        BLOCK_D=_head_block(dim), PRECISION=_precision(q.dtype), **_launch_options(block, dim),
    )  # fmt: skip
    return out, lse


def softmax_delta(out: Tensor, dout: Tensor) -> Tensor:
    """``rowsum(dout * out)`` (B, H, T) in fp32, one fused pass."""
    out, dout = _last_dim_contiguous(out, dout)
    batch, heads, n_q, dim = out.shape
    delta = torch.empty((batch, heads, n_q), dtype=torch.float32, device=out.device)
    if delta.numel() == 0:
        return delta
    block = 64
    _delta_kernel[(triton.cdiv(n_q, block), batch * heads)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], heads, n_q, dim,
        BLOCK_M=block, BLOCK_D=_head_block(dim),
    )  # fmt: skip
    return delta


def backward(
    q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor,
    q_doc: Tensor | None, k_doc: Tensor | None, *, causal: bool, block: int, scale: float,
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
    docs = _Docs(q_doc, k_doc, block, q)
    common = {
        "CAUSAL": causal, "HAS_DOCS": docs.present, "BLOCK_M": block, "BLOCK_N": block,
        "BLOCK_D": _head_block(dim), "PRECISION": _precision(q.dtype),
        **_launch_options(block, dim),
    }  # fmt: skip
    n_blocks = (triton.cdiv(n_q, block), triton.cdiv(n_k, block))
    sizes = (heads, heads // kv_heads, n_q, n_k, q_start, k_start, *n_blocks, scale * LOG2E,
             scale, dim)  # fmt: skip
    inputs = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    _dkdv_kernel[(triton.cdiv(n_k, block), batch * kv_heads)](
        q, k, v, dout, lse, delta, dk, dv, *docs.tensors(),
        *inputs, *dk.stride()[:3], *dv.stride()[:3], *docs.strides, *sizes, **common,
    )  # fmt: skip
    _dq_kernel[(triton.cdiv(n_q, block), batch * heads)](
        q, k, v, dout, lse, delta, dq, *docs.tensors(),
        *inputs, *dq.stride()[:3], *docs.strides, *sizes, **common,
    )  # fmt: skip
    return dq, dk, dv
