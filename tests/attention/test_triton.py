"""FragmentStream's Triton kernels against the fp64 reference: on CUDA, or else through
Triton's interpreter on CPU tensors.

The interpreter must be chosen before triton is imported (``TRITON_INTERPRET=1``), and
in a test session something else may have imported it already. So on a machine without
CUDA, :func:`test_under_the_interpreter` runs this module again in a fresh process with
the variable set, and the other tests here skip in the parent process: nothing leaks
into the rest of the suite. Shapes are small (the interpreter runs each program in numpy),
and so are the interpreter's tiles (``tile_config``: 16 to 32 rows, not square, so that
the query and key tilings differ).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attention.test_attention import CASES, Case, make_inputs, rel_err, run

from fraglm.attention import fragment_attention, fragment_backward, fragment_forward
from fraglm.attention.dense import naive_attention

pytest.importorskip("triton")

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETER or not torch.cuda.is_available() else "cuda"
RUNS_HERE = INTERPRETER or DEVICE == "cuda"
here = pytest.mark.skipif(not RUNS_HERE, reason="runs in test_under_the_interpreter's process")
# on a GPU these are CUDA tests (`pytest -m cuda` selects them)
pytestmark = [pytest.mark.cuda] if DEVICE == "cuda" else []


@pytest.mark.skipif(RUNS_HERE, reason="the kernels run in this process")
def test_under_the_interpreter() -> None:
    """This module's tests in a fresh process whose triton runs the interpreter."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout, result.stdout


def inputs(case: Case, dtype: torch.dtype):
    return tuple(None if t is None else t.to(DEVICE) for t in make_inputs(case, dtype))


TRITON_CASES = {
    **{name: CASES[name] for name in CASES if name != "fragment 1"},
    "head dim 16": Case(batch=1, heads=2, kv_heads=1, n_q=40, n_k=40, dim=16),
    "head dim 32": Case(batch=1, heads=2, kv_heads=2, n_q=24, n_k=40, dim=32),
    "head dim 64": Case(batch=1, heads=1, kv_heads=1, n_q=33, n_k=33, dim=64, docs=True),
    "head dim 128": Case(batch=1, heads=1, kv_heads=1, n_q=20, n_k=20, dim=128, causal=False),
}


@here
@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_matches_fp64_reference(name: str) -> None:
    """Outputs and q/k/v gradients of fp32 inputs against the fp64 reference, < 1e-4."""
    case = TRITON_CASES[name]
    q, k, v, dout, docs = inputs(case, torch.float32)
    kw = {"causal": case.causal, "doc_ids": docs}
    got = run(fragment_attention, q, k, v, dout, fragment_size=case.fragment, impl="triton", **kw)
    want = run(naive_attention, *(t.double() for t in (q, k, v, dout)), **kw)
    for g, w, what in zip(got, want, ("out", "dq", "dk", "dv"), strict=True):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert rel_err(g, w) < 1e-4, what


@here
def test_padding_rows_see_nothing() -> None:
    case = CASES["documents, GQA, Tq < Tk"]
    q, k, v, dout, docs = inputs(case, torch.float32)
    q_start = case.n_k - case.n_q
    out, lse = fragment_forward(
        q, k, v, scale=0.3, fragment_size=16, q_start=q_start, q_doc=docs[:, q_start:],
        k_doc=docs, impl="triton",
    )  # fmt: skip
    pad_q = docs[:, q_start:] < 0
    assert pad_q.any()
    assert (out.transpose(1, 2)[pad_q] == 0).all()
    assert (lse.transpose(1, 2)[pad_q] == float("-inf")).all()
    grads = run(fragment_attention, q, k, v, dout, doc_ids=docs, fragment_size=16, impl="triton")
    assert (grads[1].transpose(1, 2)[pad_q] == 0).all()
    assert (grads[2].transpose(1, 2)[docs < 0] == 0).all()


@here
def test_block_routines_match_the_tile_loop() -> None:
    """What ring attention uses: forward and backward over one key block with offsets."""
    case = CASES["documents, GQA, Tq < Tk"]
    q, k, v, dout, docs = inputs(case, torch.float32)
    common = {
        "scale": 0.3, "fragment_size": 16, "q_start": 30, "k_start": 4,
        "q_doc": docs[:, -case.n_q :], "k_doc": docs[:, 4:], "causal": True,
    }  # fmt: skip
    k, v = k[:, :, 4:], v[:, :, 4:]
    fwd = {impl: fragment_forward(q, k, v, impl=impl, **common) for impl in ("triton", "torch")}
    for got, want in zip(fwd["triton"], fwd["torch"], strict=True):
        assert got.dtype == want.dtype == torch.float32
        assert torch.equal(got.isinf(), want.isinf())
        assert rel_err(got.nan_to_num(neginf=0), want.nan_to_num(neginf=0)) < 1e-5
    out, lse = fwd["torch"]
    delta = (out * dout).sum(-1)
    grads = {
        impl: fragment_backward(q, k, v, dout, lse, delta, impl=impl, **common)
        for impl in ("triton", "torch")
    }
    for got, want in zip(grads["triton"], grads["torch"], strict=True):
        assert got.dtype == torch.float32 and rel_err(got, want) < 1e-5


# The interpreter reads bf16 memory wrongly (numpy has no bf16): bf16 is checked on CUDA
# GPUs that have it (capability 8.0+).
BF16 = DEVICE == "cuda" and torch.cuda.get_device_capability() >= (8, 0)
HALF = [torch.float16, torch.bfloat16] if BF16 else [torch.float16]


@here
@pytest.mark.parametrize("dtype", HALF)
def test_half_inputs_keep_fp32_statistics(dtype: torch.dtype) -> None:
    case = Case(heads=2, kv_heads=1, n_q=40, n_k=40, dim=16, docs=True)
    q, k, v, dout, docs = inputs(case, torch.float32)
    low = run(
        fragment_attention, *(t.to(dtype) for t in (q, k, v, dout)), doc_ids=docs,
        fragment_size=16, impl="triton",
    )  # fmt: skip
    want = run(naive_attention, q, k, v, dout, doc_ids=docs)
    for got, w in zip(low, want, strict=True):
        assert got.dtype == dtype and rel_err(got, w) < 2e-2


@here
def test_lse_gradient() -> None:
    """The op's log-sum-exp output is differentiable too (dLSE enters as D - dLSE)."""
    case = Case(batch=1, heads=2, kv_heads=2, n_q=20, n_k=20, dim=16)
    q, k, v, _, _ = inputs(case, torch.float64)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    _, lse = torch.ops.fraglm.fragment_fwd(q32, k32, v32, None, None, True, 0.25, 0, 0, False)
    got = torch.autograd.grad(lse.sum(), (q32, k32, v32))
    qd, kd = q.requires_grad_(), k.requires_grad_()
    scores = (qd @ kd.transpose(-1, -2) * 0.25).masked_fill(
        torch.ones(20, 20, dtype=torch.bool, device=DEVICE).triu(1), float("-inf")
    )
    want = torch.autograd.grad(scores.logsumexp(-1).sum(), (qd, kd))
    assert rel_err(got[0], want[0]) < 1e-4 and rel_err(got[1], want[1]) < 1e-4
    assert (got[2] == 0).all()


@here
def test_custom_op_registration() -> None:
    """Schema, fake implementation and autograd registration, as torch.compile needs."""
    case = Case(batch=1, heads=2, kv_heads=1, n_q=12, n_k=20, docs=True)
    q, k, v, _, docs = inputs(case, torch.float32)
    # laid out (B, T, H, D) and transposed, as the model passes them
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    q_start = k.shape[2] - q.shape[2]
    args = (q, k, v, docs[:, q_start:], docs, True, 0.3, q_start, 0, False)
    torch.library.opcheck(torch.ops.fraglm.fragment_fwd.default, args)


@here
def test_compiled_graph_has_no_breaks() -> None:
    case = CASES["documents, GQA, Tq < Tk"]
    q, k, v, dout, docs = inputs(case, torch.float32)

    def attend(q, k, v):
        return fragment_attention(q, k, v, doc_ids=docs, fragment_size=16, impl="triton")

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    got = run(lambda q, k, v: compiled(q, k, v), q, k, v, dout)
    want = run(attend, q, k, v, dout)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def _long_documents(kind: str, length: int) -> torch.Tensor:
    """(2, length) ids whose documents span several kernel blocks: sorted with padding,
    a document that comes back after another (non-monotone) and random ids."""
    gen = torch.Generator().manual_seed(1)
    if kind == "sorted":
        row = torch.tensor([0] * 70 + [1] * 50 + [2] * (length - 123) + [-1] * 3)
        return torch.stack([row, row.roll(40).sort().values])
    if kind == "non-monotone":
        row = torch.tensor(([0] * 40 + [1] * 40) * (length // 80) + [0] * (length % 80))
        return torch.stack([row, torch.randint(-1, 3, (length,), generator=gen)])
    return torch.randint(-1, 2, (2, length), generator=gen)


@here
@pytest.mark.parametrize("kind", ["sorted", "non-monotone", "random"])
@pytest.mark.parametrize("causal", [True, False])
def test_documents_spanning_blocks(kind: str, causal: bool) -> None:
    """Documents longer than the kernels' blocks, so that blocks meet ranges with tiles that
    skip the id mask (a run of one-document blocks) next to masked ones, and ids that
    return after another document (ranges that must stay conservative)."""
    case = Case(batch=2, heads=2, kv_heads=1, n_q=160, n_k=160, dim=16, causal=causal)
    q, k, v, dout, _ = inputs(case, torch.float32)
    docs = _long_documents(kind, case.n_k).to(DEVICE)
    kw = {"causal": causal, "doc_ids": docs}
    got = run(fragment_attention, q, k, v, dout, impl="triton", **kw)
    want = run(naive_attention, *(t.double() for t in (q, k, v, dout)), **kw)
    for g, w, what in zip(got, want, ("out", "dq", "dk", "dv"), strict=True):
        assert rel_err(g, w) < 1e-4, what
