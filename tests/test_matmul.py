"""oneDNN matmuls: the same values and gradients as torch's, and only where they serve."""

import pytest
import torch
import torch.nn.functional as F

from fraglm import matmul

ONEDNN = torch.ops.mkldnn._linear_pointwise.default if matmul.onednn_available() else None
needs_onednn = pytest.mark.skipif(ONEDNN is None, reason="oneDNN path not used on this CPU")


def _tensors(*shapes, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen, dtype=dtype) for shape in shapes]


def _linear_and_grads(fn, x, weight, bias, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = fn(*leaves, b)
    out.backward(grad)
    return [out.detach(), *(t.grad for t in leaves), None if b is None else b.grad]


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    ("d_in", "d_out"), [(32, 96), (96, 32)], ids=["in < out", "in > out"]
)  # both orientations of the weight gradient
def test_linear_equals_torch_values_and_gradients(op_log, bias, d_in, d_out):
    x, weight, b, grad = _tensors((3, 40, d_in), (d_out, d_in), (d_out,), (3, 40, d_out))
    b = b if bias else None
    with op_log() as log:
        got = _linear_and_grads(matmul.linear, x, weight, b, grad)
    want = _linear_and_grads(F.linear, x, weight, b, grad)
    assert log.ops.count(ONEDNN) == 3  # forward, input gradient, weight gradient
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_strided_weight_and_bias_views():
    x, fused, bias = _tensors((70, 16), (48, 16), (48,))
    half = fused.chunk(2)[1]  # the MLP's gate and up halves are such views
    for weight, b in [(half, bias[::2]), (fused.t().contiguous().t(), bias)]:
        torch.testing.assert_close(matmul.linear(x, weight, b), F.linear(x, weight, b))


@needs_onednn
def test_without_gradients_nothing_is_saved(op_log):
    x, weight = _tensors((70, 16), (24, 16))
    weight.requires_grad_()
    with torch.no_grad():
        out = matmul.linear(x, weight)
    assert out.grad_fn is None
    torch.testing.assert_close(out, F.linear(x, weight.detach()))


@needs_onednn
def test_second_derivatives_are_refused():
    x, weight = (t.requires_grad_() for t in _tensors((70, 8), (12, 8)))
    (grad,) = torch.autograd.grad(matmul.linear(x, weight).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


@needs_onednn
def test_loss_head_products_equal_torch(op_log):
    h, w, grad = _tensors((70, 16), (50, 16), (70, 50))
    with op_log() as log:
        logits = matmul.mm(h, w.t())
        grad_h = matmul.mm(grad, w)
        acc = matmul.add_weight_grad_(torch.ones(50, 16), grad, h)
    assert log.ops.count(ONEDNN) == 3
    torch.testing.assert_close(logits, h @ w.t())
    torch.testing.assert_close(grad_h, grad @ w)
    torch.testing.assert_close(acc, 1 + grad.t() @ h)


@pytest.mark.parametrize("case", ["float64", "bf16 autocast", "few rows", "switched off"])
def test_torch_path_where_onednn_does_not_serve(op_log, case):
    dtype = torch.float64 if case == "float64" else torch.float32
    rows = matmul.MIN_ROWS - 1 if case == "few rows" else matmul.MIN_ROWS
    x, weight = _tensors((rows, 8), (12, 8), dtype=dtype)
    with (
        op_log() as log,
        torch.autocast("cpu", torch.bfloat16, enabled=case == "bf16 autocast"),
        matmul.onednn_enabled(case != "switched off"),
    ):
        out = matmul.linear(x, weight)
        matmul.mm(x, weight.t())
        want = F.linear(x, weight)
    assert ONEDNN is None or ONEDNN not in log.ops
    assert torch.equal(out, want)


@needs_onednn
def test_switching_off_lasts_only_for_the_block(op_log):
    x, weight = _tensors((matmul.MIN_ROWS, 8), (12, 8))
    with matmul.onednn_enabled(False):
        pass
    with op_log() as log:
        matmul.linear(x, weight)
    assert ONEDNN in log.ops
