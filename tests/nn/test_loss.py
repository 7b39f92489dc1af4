"""The fused head + cross-entropy equals the plain one, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from fraglm.nn import loss as fused
from fraglm.nn.loss import IGNORE_INDEX, linear_cross_entropy_sum


def _inputs(dtype, rows=37, dim=8, vocab=50, bias=True):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, dtype=dtype, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=dtype, generator=gen, requires_grad=True)
    b = torch.randn(vocab, dtype=dtype, generator=gen, requires_grad=True) if bias else None
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[::5] = IGNORE_INDEX
    return hidden, weight, b, targets


def _reference(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_elements", [50, 7 * 50, 1 << 21])  # 1 row, 7 rows, all rows
def test_matches_plain_cross_entropy_fp64(monkeypatch, bias, chunk_elements):
    monkeypatch.setattr(fused, "_CHUNK_ELEMENTS", chunk_elements)
    args = _inputs(torch.float64, bias=bias)
    got = linear_cross_entropy_sum(*args)
    grads = torch.autograd.grad(3.0 * got, [t for t in args[:3] if t is not None])
    ref_args = [t.detach().clone().requires_grad_() if t is not None else None for t in args[:3]]
    want = _reference(*ref_args, args[3])
    want_grads = torch.autograd.grad(3.0 * want, [t for t in ref_args if t is not None])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_float32_at_training_size_matches_plain_cross_entropy(monkeypatch):
    """float32 with enough rows for several chunks, as in training."""
    monkeypatch.setattr(fused, "_CHUNK_ELEMENTS", 128 * 70)
    args = _inputs(torch.float32, rows=300, dim=16, vocab=70)
    got = linear_cross_entropy_sum(*args)
    grads = torch.autograd.grad(got, args[:3])
    ref_args = [t.detach().clone().requires_grad_() for t in args[:3]]
    want = _reference(*ref_args, args[3])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for g, w in zip(grads, torch.autograd.grad(want, ref_args), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_gradcheck():
    hidden, weight, bias, targets = _inputs(torch.float64, rows=6, dim=3, vocab=5)
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_cross_entropy_sum(h, w, b, targets), (hidden, weight, bias)
    )


def test_bf16_autocast_is_close_to_fp32():
    hidden, weight, bias, targets = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy_sum(hidden, weight, bias, targets)
    assert got.dtype == torch.float32
    want = _reference(hidden, weight, bias, targets)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)


def test_all_rows_ignored_is_zero_with_zero_gradients():
    hidden, weight, bias, targets = _inputs(torch.float32)
    targets[:] = IGNORE_INDEX
    total = linear_cross_entropy_sum(hidden, weight, bias, targets)
    total.backward()
    assert total == 0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_ignored_rows_cost_no_host_sync(op_log):
    hidden, weight, bias, targets = _inputs(torch.float32)
    with op_log() as log:
        linear_cross_entropy_sum(hidden, weight, bias, targets).backward()
    assert log.host_syncs == []


def test_no_grad_does_no_gradient_work(monkeypatch, op_log):
    """Evaluation (no_grad) computes each chunk's logits and loss only: one product per
    chunk, not three, and the same loss as with gradients."""
    monkeypatch.setattr(fused, "_CHUNK_ELEMENTS", 8 * 50)  # 37 rows: 5 chunks
    hidden, weight, bias, targets = _inputs(torch.float32)
    products = (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm_.default)
    counts = []
    for grad_enabled in (True, False):
        with torch.set_grad_enabled(grad_enabled), op_log() as log:
            total = linear_cross_entropy_sum(hidden, weight, bias, targets)
        counts.append((sum(op in products for op in log.ops), len(log.ops)))
        assert total.requires_grad == grad_enabled
        if grad_enabled:
            with_grad = total.detach()
    (grad_products, grad_ops), (eval_products, eval_ops) = counts
    assert (grad_products, eval_products) == (3 * 5, 5)
    assert eval_ops < grad_ops
    torch.testing.assert_close(total, with_grad, rtol=0, atol=0)
