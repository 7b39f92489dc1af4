"""FragmentStream attention: exactness against the naive reference, memory bounds, blocks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fraglm.attention import (
    BACKENDS,
    attention,
    fragment_attention,
    fragment_backward,
    fragment_forward,
    merge,
    naive_attention,
    sdpa_attention,
    tiles,
)
from fraglm.attention.documents import meeting_ranges
from fraglm.attention.tiles import plan_tiles
from fraglm.errors import FraglmError


@dataclass(frozen=True)
class Case:
    heads: int = 4
    kv_heads: int = 4
    n_q: int = 37
    n_k: int = 37
    fragment: int = 16
    causal: bool = True
    docs: bool = False
    batch: int = 2
    dim: int = 8


CASES = {
    "T not a multiple of F": Case(),
    "T smaller than F": Case(n_q=20, n_k=20, fragment=64),
    "fragment 1": Case(n_q=9, n_k=9, fragment=1),
    "not causal": Case(causal=False),
    "Tq < Tk": Case(n_q=11, n_k=37),
    "decode step": Case(n_q=1, n_k=37),
    "Tq < Tk not causal": Case(n_q=11, n_k=37, causal=False),
    "GQA": Case(heads=6, kv_heads=2),
    "MQA, Tq < Tk": Case(heads=4, kv_heads=1, n_q=13, n_k=37, fragment=8),
    "documents": Case(docs=True, fragment=8),
    "documents, GQA, Tq < Tk": Case(heads=6, kv_heads=3, n_q=21, n_k=40, fragment=8, docs=True),
    "documents not causal": Case(docs=True, causal=False, fragment=8),
}


def make_docs(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted random document ids with padding (-1): rows that see nothing at all."""
    docs = torch.randint(0, 4, (batch, length), generator=gen).sort(dim=1).values
    docs[0, -3:] = -1  # trailing padding
    if batch > 1:
        docs[1, 5:9] = -1  # padding in the middle of a row
    return docs


def make_inputs(
    case: Case, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(case.batch, case.heads, case.n_q, case.dim, generator=gen, dtype=dtype)
    k, v = (
        torch.randn(case.batch, case.kv_heads, case.n_k, case.dim, generator=gen, dtype=dtype)
        for _ in range(2)
    )
    dout = torch.randn(q.shape, generator=gen, dtype=dtype)
    docs = make_docs(case.batch, case.n_k, gen) if case.docs else None
    return q, k, v, dout, docs


def run(fn, q, k, v, dout, **kwargs) -> tuple[torch.Tensor, ...]:
    """Output and (dq, dk, dv) of fn for upstream gradient dout."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1)).item()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", CASES)
def test_fragment_matches_naive(name: str, dtype: torch.dtype, tol: float) -> None:
    case = CASES[name]
    q, k, v, dout, docs = make_inputs(case, dtype)
    kw = {"causal": case.causal, "doc_ids": docs}
    got = run(fragment_attention, q, k, v, dout, fragment_size=case.fragment, **kw)
    want = run(naive_attention, q, k, v, dout, **kw)
    for g, w, what in zip(got, want, ("out", "dq", "dk", "dv"), strict=True):
        assert g.dtype == dtype and g.shape == w.shape
        assert rel_err(g, w) < tol, what


@pytest.mark.parametrize("tiles_per_run", [1, 2])
@pytest.mark.parametrize("name", ["T not a multiple of F", "not causal", "GQA", "documents"])
def test_runs_of_tiles_match_naive(name: str, tiles_per_run: int, monkeypatch) -> None:
    """The forward's runs of neighbouring tiles, cut short by the element budget: single
    tiles, and runs of two that leave a shorter run at the end of a row."""
    case = CASES[name]
    group = case.heads // case.kv_heads
    tile = case.batch * case.kv_heads * case.fragment * group * case.fragment
    monkeypatch.setattr(tiles, "RUN_ELEMENTS", tiles_per_run * tile)
    row = [t for t in plan_tiles(37, 37, 16, causal=False, q_start=0, k_start=0, q_doc=None,
                            k_doc=None) if t.qf == 0]  # fmt: skip
    runs = [[t.kf for t in r] for r in tiles.runs_of(row, tile)]
    assert runs == ([[0], [1], [2]] if tiles_per_run == 1 else [[0, 1], [2]])
    q, k, v, dout, docs = make_inputs(case, torch.float64)
    kw = {"causal": case.causal, "doc_ids": docs}
    got = run(fragment_attention, q, k, v, dout, fragment_size=case.fragment, **kw)
    want = run(naive_attention, q, k, v, dout, **kw)
    for g, w, what in zip(got, want, ("out", "dq", "dk", "dv"), strict=True):
        assert rel_err(g, w) < 1e-10, what


@pytest.mark.parametrize(
    "name", ["Tq < Tk", "not causal", "MQA, Tq < Tk", "documents, GQA, Tq < Tk"]
)
def test_sdpa_matches_naive(name: str) -> None:
    case = CASES[name]
    q, k, v, dout, docs = make_inputs(case, torch.float32)
    kw = {"causal": case.causal, "doc_ids": docs}
    got = run(sdpa_attention, q, k, v, dout, **kw)
    want = run(naive_attention, q, k, v, dout, **kw)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("docs", [False, True])
def test_decode_step_without_gradients_matches_naive(docs: bool) -> None:
    case = Case(heads=4, kv_heads=2, n_q=1, n_k=37, fragment=16, docs=docs)
    q, k, v, _, doc_ids = make_inputs(case, torch.float32)
    with torch.no_grad():  # small enough to be one tile: the one-call path
        got = fragment_attention(q, k, v, fragment_size=case.fragment, doc_ids=doc_ids)
    assert rel_err(got, naive_attention(q, k, v, doc_ids=doc_ids)) < 1e-5


def test_padding_rows_give_zero_output_and_gradients() -> None:
    case = CASES["documents, GQA, Tq < Tk"]
    q, k, v, dout, docs = make_inputs(case, torch.float32)
    out, dq, dk, dv = run(fragment_attention, q, k, v, dout, doc_ids=docs, fragment_size=8)
    pad_q = docs[:, -case.n_q :] < 0
    pad_k = docs < 0
    assert pad_q.any() and pad_k.any()
    assert not any(t.isnan().any() for t in (out, dq, dk, dv))
    assert (out.transpose(1, 2)[pad_q] == 0).all()
    assert (dq.transpose(1, 2)[pad_q] == 0).all()
    assert (dk.transpose(1, 2)[pad_k] == 0).all() and (dv.transpose(1, 2)[pad_k] == 0).all()


def test_gradcheck() -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (
        torch.randn(2, 2, 7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
        for _ in range(2)
    )
    docs = torch.tensor([[0, 0, 1, 1, 1, 1, -1], [2, 2, 2, 2, 3, 3, 3]])
    for causal in (True, False):
        for doc_ids in (None, docs):

            def fn(q, k, v, causal=causal, doc_ids=doc_ids):
                return fragment_attention(q, k, v, causal=causal, fragment_size=2, doc_ids=doc_ids)

            assert torch.autograd.gradcheck(fn, (q, k, v))


def test_bf16_close_to_fp32() -> None:
    case = Case(heads=4, kv_heads=2, n_q=64, n_k=96, fragment=32, docs=True)
    q, k, v, dout, docs = make_inputs(case, torch.float32)
    q, k, v, dout = (t.bfloat16() for t in (q, k, v, dout))
    low = run(fragment_attention, q, k, v, dout, fragment_size=32, doc_ids=docs)
    high = run(naive_attention, q.float(), k.float(), v.float(), dout.float(), doc_ids=docs)
    for lo, hi in zip(low, high, strict=True):
        assert lo.dtype == torch.bfloat16
        assert rel_err(lo, hi) < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["T not a multiple of F", "documents, GQA, Tq < Tk"])
def test_autocast_changes_nothing(name: str, dtype: torch.dtype) -> None:
    """Mixed-precision training calls attention inside bf16/fp16 autocast, backward too:
    the tiles still run in fp32, so output and gradients are the same bits as outside."""
    case = CASES[name]
    q, k, v, dout, docs = make_inputs(case, torch.float32)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    kw = {"causal": case.causal, "doc_ids": docs, "fragment_size": case.fragment}
    outside = run(fragment_attention, q, k, v, dout, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = run(fragment_attention, q, k, v, dout, **kw)
    for a, b in zip(inside, outside, strict=True):
        assert a.dtype == dtype and torch.equal(a, b)


def test_merge_of_key_halves_equals_full() -> None:
    case = CASES["documents, GQA, Tq < Tk"]
    q, k, v, _, docs = make_inputs(case, torch.float64)
    q_start, half, scale = case.n_k - case.n_q, 25, 0.3
    common = {"scale": scale, "fragment_size": 4, "q_start": q_start, "q_doc": docs[:, q_start:]}
    full = fragment_forward(q, k, v, k_doc=docs, **common)
    first = fragment_forward(q, k[:, :, :half], v[:, :, :half], k_doc=docs[:, :half], **common)
    second = fragment_forward(
        q, k[:, :, half:], v[:, :, half:], k_start=half, k_doc=docs[:, half:], **common
    )
    # Some rows see nothing in one half and something in the other.
    assert (first[1] == float("-inf")).any() and (second[1] == float("-inf")).any()
    out, lse = merge(*first, *second)
    assert torch.equal(lse.isinf(), full[1].isinf())
    assert rel_err(out, full[0]) < 1e-12
    assert rel_err(lse.nan_to_num(neginf=0), full[1].nan_to_num(neginf=0)) < 1e-12
    want = naive_attention(q, k, v, doc_ids=docs, scale=scale)
    assert rel_err(out, want) < 1e-12


@pytest.mark.parametrize("name", ["documents, GQA, Tq < Tk", "documents"])
def test_backward_blocks_add_up(name: str) -> None:
    """Contributions over two key blocks sum to the gradients, with one ``delta`` for
    both calls (as ring attention passes it): the routine must not change its inputs."""
    case = CASES[name]
    q, k, v, dout, docs = make_inputs(case, torch.float64)
    q_start, half, scale = case.n_k - case.n_q, 17, 0.3
    common = {"scale": scale, "fragment_size": 4, "q_start": q_start, "q_doc": docs[:, q_start:]}
    out, lse = fragment_forward(q, k, v, k_doc=docs, **common)
    delta = (out * dout).sum(-1)
    inputs = [t.clone() for t in (q, k, v, dout, lse, delta)]
    parts = [
        fragment_backward(
            q, k[:, :, s], v[:, :, s], dout, lse, delta, k_start=s.start, k_doc=docs[:, s], **common
        )
        for s in (slice(0, half), slice(half, case.n_k))
    ]
    for before, after in zip(inputs, (q, k, v, dout, lse, delta), strict=True):
        assert torch.equal(before, after)
    got = (
        parts[0][0] + parts[1][0],
        torch.cat([parts[0][1], parts[1][1]], dim=2),
        torch.cat([parts[0][2], parts[1][2]], dim=2),
    )
    want = run(naive_attention, q, k, v, dout, doc_ids=docs, scale=scale)[1:]
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-12


def test_query_block_before_key_block_sees_nothing() -> None:
    q, k, v, dout, _ = make_inputs(Case(n_q=8, n_k=8), torch.float32)
    out, lse = fragment_forward(q, k, v, scale=1.0, fragment_size=4, q_start=0, k_start=8)
    assert (out == 0).all() and (lse == float("-inf")).all()
    grads = fragment_backward(
        q, k, v, dout, lse, torch.zeros_like(lse), scale=1.0, fragment_size=4, k_start=8
    )
    assert all((g == 0).all() for g in grads)


def test_plan_skips_future_and_foreign_tiles() -> None:
    n, size = 64, 16  # 4 x 4 fragments
    causal = plan_tiles(n, n, size, causal=True, q_start=0, k_start=0, q_doc=None, k_doc=None)
    assert len(causal) == 10  # lower triangle only
    assert [t.qf == t.kf for t in causal] == [t.causal_mask for t in causal]
    docs = torch.arange(n).div(32, rounding_mode="floor")[None]  # two documents of 2 fragments
    packed = plan_tiles(n, n, size, causal=True, q_start=0, k_start=0, q_doc=docs, k_doc=docs)
    assert [(t.qf, t.kf) for t in packed] == [(0, 0), (1, 0), (1, 1), (2, 2), (3, 2), (3, 3)]
    assert not any(t.doc_mask for t in packed)  # every kept tile holds one document


class MaxAllocation(TorchDispatchMode):
    """Records the largest output (in elements) of every op run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        self.ops += 1
        return out


@pytest.mark.parametrize("backend", ["fragment", "naive"])
def test_memory_is_linear_in_sequence_length(backend: str) -> None:
    batch, heads, length, dim, fragment = 1, 2, 4096, 16, 128
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, length, dim, generator=gen, requires_grad=True) for _ in range(3)
    )
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), MaxAllocation() as forward:
        out = attention(q, k, v, backend=backend, fragment_size=fragment)
    with MaxAllocation() as backward:
        out.backward(torch.ones_like(out))
    assert backward.ops > 0 and q.grad is not None
    bound = 4 * batch * heads * length * fragment  # a few F x T blocks per (B, H)
    largest = max(forward.largest, backward.largest)
    saved_bound = 4 * q.numel() + batch * heads * length  # q, k, v, out and lse
    fits = largest <= bound and sum(saved) <= saved_bound
    assert fits == (backend == "fragment"), (largest, bound, sum(saved), saved_bound)


def test_backend_switch() -> None:
    q, k, v, _, docs = make_inputs(CASES["documents, GQA, Tq < Tk"], torch.float64)
    want = naive_attention(q, k, v, doc_ids=docs)
    for backend in BACKENDS:
        got = attention(q, k, v, backend=backend, doc_ids=docs, fragment_size=8)
        assert rel_err(got, want) < 1e-10
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="flash")


@pytest.mark.parametrize(
    ("q_shape", "kv_shape", "doc_shape", "match"),
    [
        ((1, 3, 4, 8), (1, 2, 4, 8), None, "incompatible"),
        ((1, 2, 5, 8), (1, 2, 4, 8), None, "must not exceed"),
        ((1, 2, 4, 8), (1, 2, 4, 8), (1, 3), "doc_ids"),
    ],
)
def test_invalid_shapes_raise(q_shape, kv_shape, doc_shape, match) -> None:
    q, k = torch.zeros(q_shape), torch.zeros(kv_shape)
    docs = None if doc_shape is None else torch.zeros(doc_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        fragment_attention(q, k, k, doc_ids=docs)


def _count_host_reads(monkeypatch) -> list[str]:
    """Calls of the Tensor methods that copy values to the host (a wait on a GPU)."""
    reads: list[str] = []
    for name in ("tolist", "item", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_training_step_with_documents_reads_nothing_on_the_host(monkeypatch, op_log) -> None:
    """Document ids on an accelerator are never read by the host: no wait per layer.

    On the CPU the ids are host memory and steer the plan for free; the accelerator
    branch runs here by declaring the ids unreadable, and must still be exact."""
    from fraglm.config import ModelConfig
    from fraglm.nn.model import Transformer

    monkeypatch.setattr(tiles, "reads_on_host", lambda device: False)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(n_layers=2, d_model=32, n_heads=4, context_length=40, fragment_size=8), 50
    )
    idx = torch.randint(0, 50, (2, 40))
    docs = make_docs(2, 40, torch.Generator().manual_seed(0))
    reads = _count_host_reads(monkeypatch)
    with op_log() as log:
        model(idx, doc_ids=docs).float().square().mean().backward()
    assert log.host_syncs == [] and reads == []
    # the same tiles the reference computes
    case = CASES["documents, GQA, Tq < Tk"]
    q, k, v, dout, doc_ids = make_inputs(case, torch.float64)
    kw = {"causal": case.causal, "doc_ids": doc_ids}
    got = run(fragment_attention, q, k, v, dout, fragment_size=case.fragment, **kw)
    want = run(naive_attention, q, k, v, dout, **kw)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-10


def test_plan_is_built_once_per_shape() -> None:
    args = (64, 64, 16)
    first = plan_tiles(*args, causal=True, q_start=0, k_start=0, q_doc=None, k_doc=None)
    again = plan_tiles(*args, causal=True, q_start=0, k_start=0, q_doc=None, k_doc=None)
    assert first is again


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_impl_auto_and_torch_on_cpu_run_the_tile_loop(impl: str) -> None:
    q, k, v, dout, docs = make_inputs(CASES["documents, GQA, Tq < Tk"], torch.float64)
    got = run(fragment_attention, q, k, v, dout, doc_ids=docs, fragment_size=8, impl=impl)
    want = run(fragment_attention, q, k, v, dout, doc_ids=docs, fragment_size=8)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize(
    ("impl", "dtype", "match"),
    [
        ("flash", torch.float32, "unknown fragment attention impl"),
        ("triton", torch.float64, "fp32/fp16/bf16"),
    ],
)
def test_impl_errors_are_one_line(impl: str, dtype: torch.dtype, match: str) -> None:
    q = torch.zeros(1, 2, 4, 8, dtype=dtype)
    with pytest.raises(FraglmError, match=match) as err:
        fragment_attention(q, q, q, impl=impl)
    assert "\n" not in str(err.value)


def test_triton_on_cpu_needs_the_interpreter() -> None:
    """Where triton runs compiled (not the interpreter), CPU tensors are a one-line error."""
    pytest.importorskip("triton")
    from fraglm.attention.triton_op import kernels

    if kernels().INTERPRETED:
        pytest.skip("this process runs triton's interpreter")
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(FraglmError, match="TRITON_INTERPRET=1") as err:
        fragment_attention(q, q, q, impl="triton")
    assert "\n" not in str(err.value)
    from fraglm.config import ModelConfig
    from fraglm.nn.model import Transformer

    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, context_length=8, fragment_impl="triton")
    with pytest.raises(FraglmError, match="TRITON_INTERPRET=1"):
        Transformer(cfg, 20)(torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize(
    ("capability", "dtype", "triton"),
    [
        ((6, 0), torch.float16, False),  # P100: the tile loop
        ((7, 0), torch.float16, False),  # V100: no tensor-core code from Triton, spills
        ((7, 5), torch.float16, False),  # T4: beyond its 64 KiB of shared memory
        ((8, 0), torch.float32, False),  # fp32 products run without tensor cores
        ((8, 0), torch.bfloat16, True),  # A100
        ((8, 6), torch.float16, True),  # RTX 3090
        ((9, 0), torch.bfloat16, True),  # H100
    ],
)
def test_auto_takes_triton_where_the_compile_check_proves_it(
    monkeypatch, capability, dtype, triton
) -> None:
    from fraglm.attention import triton_op

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert triton_op._gpu_proven(torch.device("cuda"), dtype, 64) == triton
    assert triton_op.triton_proven(capability, dtype, 64) == triton


@pytest.mark.parametrize("n_q", [1, 37], ids=["decode step", "prefill"])
def test_sdpa_takes_grouped_heads_as_they_are_and_a_decode_step_builds_no_mask(n_q, op_log):
    case = Case(heads=4, kv_heads=2, n_q=n_q, n_k=37, fragment=16)
    q, k, v, _, _ = make_inputs(case, torch.float32)
    with torch.no_grad(), op_log() as log:
        got = sdpa_attention(q, k, v)
    assert len(log.ops) == 1 and "scaled_dot_product" in str(log.ops[0])  # no mask, no repeat
    assert rel_err(got, naive_attention(q, k, v)) < 1e-5


@pytest.mark.parametrize("sorted_ids", [True, False])
@pytest.mark.parametrize(("row_block", "col_block"), [(4, 8), (8, 4), (16, 16)])
def test_meeting_ranges(sorted_ids: bool, row_block: int, col_block: int) -> None:
    """Every column block that shares a document with a row block lies in its meeting range
    and every block of its inner run holds the row block's one document, without padding;
    with sorted ids, every such one-document column block is in the inner run."""
    gen = torch.Generator().manual_seed(row_block * col_block + sorted_ids)
    for _ in range(20):
        n_r, n_c = (int(n) for n in torch.randint(1, 60, (2,), generator=gen))
        row_doc, col_doc = (torch.randint(-1, 4, (2, n), generator=gen) for n in (n_r, n_c))
        if sorted_ids:
            row_doc, col_doc = row_doc.sort(1).values, col_doc.sort(1).values
        ranges = meeting_ranges(row_doc, row_block, col_doc, col_block)
        for b in range(2):
            for i, (first, last, inner, inner_last) in enumerate(ranges[b].tolist()):
                rows = row_doc[b, i * row_block : (i + 1) * row_block]
                one = len(rows) == row_block and bool((rows == rows[0]).all()) and rows[0] >= 0
                for j in range(-(-n_c // col_block)):
                    cols = col_doc[b, j * col_block : (j + 1) * col_block]
                    if ((rows[:, None] == cols[None, :]) & (rows[:, None] >= 0)).any():
                        assert first <= j <= last
                    same = one and len(cols) == col_block and bool((cols == rows[0]).all())
                    if inner <= j <= inner_last:
                        assert same
                    elif sorted_ids:
                        assert not same
