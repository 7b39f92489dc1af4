"""Dense fp32 matmuls on x86 CPUs through oneDNN instead of MKL.

PyTorch's CPU matmuls (``F.linear``, ``torch.mm``) call MKL's sgemm, and MKL keeps to its
AVX2 kernels on AMD processors even where the CPU has AVX-512 (Zen 4, Zen 5). oneDNN,
which PyTorch ships for its ``mkldnn`` ops, picks its kernels by instruction set. On the
2-core AMD EPYC (Zen 5) of this project's CI and benchmarks, the model's products run at
about 410-440 GFLOP/s through oneDNN against 170-190 through MKL; the training step of the
p100 model is about a fifth faster (docs/benchmarks.md).

The oneDNN path serves float32 CPU tensors with autocast off and at least
:data:`MIN_ROWS` rows, on x86-64 builds of PyTorch with oneDNN. Everything else takes the
regular torch op: float64 (the exactness tests), bf16/fp16 autocast (which PyTorch already
sends to oneDNN), GPUs, other CPU architectures, code that ``torch.compile`` traces, and
decode-step products, where oneDNN's fixed cost per call (about 20 us) exceeds the whole
MKL call.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_ROWS = 64  # below this, MKL's lower fixed cost wins (measured: 64 rows x 128 x 384)

_enabled = True


@functools.cache
def onednn_available() -> bool:
    """PyTorch has oneDNN's linear op on an x86-64 CPU."""
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


@contextlib.contextmanager
def onednn_enabled(enabled: bool) -> Iterator[None]:
    """Turn the oneDNN path on or off inside the block (benchmarks and tests compare)."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def _use_onednn(a: Tensor, *others: Tensor | None) -> bool:
    if not (_enabled and a.device.type == "cpu" and a.dtype == torch.float32):
        return False
    if torch.compiler.is_compiling():
        return False  # inductor lowers oneDNN's linear for frozen (inference) weights only
    rows = a.numel() // max(a.shape[-1], 1)
    if rows < MIN_ROWS or torch.is_autocast_enabled("cpu"):
        return False
    if any(t is not None and t.dtype != torch.float32 for t in others):
        return False
    return onednn_available()


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` by oneDNN (``weight`` may be a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_weight_grad(grad_out: Tensor, x: Tensor) -> Tensor:
    """``grad_out.T @ x`` (out, in) for 2-D ``grad_out`` (N, out) and ``x`` (N, in).

    The long dimension N is the reduction here. oneDNN is fastest with the smaller of
    ``out`` and ``in`` as its row count (2x on the shapes of this model), so the product
    is taken as ``(x.T @ grad_out).T`` when ``in`` is the smaller.
    """
    if x.shape[1] < grad_out.shape[1]:
        return _onednn_linear(x.t(), grad_out.t()).t()
    return _onednn_linear(grad_out.t(), x.t())


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = _onednn_linear(grad_out, weight.t()) if needs_x else None
        grad_weight = (
            _onednn_weight_grad(flat_grad, x.reshape(-1, x.shape[-1])) if needs_weight else None
        )
        grad_bias = flat_grad.sum(0) if needs_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` with oneDNN's matmuls where they serve (see the module docstring)."""
    if _use_onednn(x, weight, bias):
        return _OneDnnLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def mm(a: Tensor, b: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``a @ b`` for 2-D tensors, no autograd. ``out`` is where the torch path writes (a
    reused buffer saves page faults on CPU); the oneDNN path returns a new tensor."""
    if _use_onednn(a, b):
        return _onednn_linear(a, b.t())
    return torch.mm(a, b, out=out)


def add_weight_grad_(acc: Tensor, grad_out: Tensor, x: Tensor) -> Tensor:
    """``acc += grad_out.T @ x`` in place; 2-D ``grad_out`` (N, out), ``x`` (N, in)."""
    if _use_onednn(grad_out, x, acc):
        return acc.add_(_onednn_weight_grad(grad_out, x))
    return acc.addmm_(grad_out.t(), x)
