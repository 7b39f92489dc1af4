"""Dense fp32 matmuls on AMD x86 CPUs through oneDNN instead of MKL.

PyTorch's CPU matmuls (``F.linear``, ``torch.mm``) call MKL's sgemm, and MKL keeps to its
AVX2 kernels on AMD processors even where the CPU has AVX-512 (Zen 4, Zen 5). oneDNN,
which PyTorch ships for its ``mkldnn`` ops, picks its kernels by instruction set. On the
2-core AMD EPYC (Zen 5) of this project's CI and benchmarks, the model's products run at
about 410-440 GFLOP/s through oneDNN against 170-190 through MKL, and a training step of
the p100 model is about a quarter faster (docs/benchmarks.md).

The oneDNN path serves float32 CPU tensors with autocast off and at least
:data:`MIN_ROWS` rows, on AMD (and Hygon) x86-64 CPUs with a PyTorch built with oneDNN.
Everything else takes the regular torch op: float64 (the exactness tests), bf16/fp16
autocast (which PyTorch already sends to oneDNN), GPUs, Intel CPUs (where MKL uses
AVX-512 itself), other architectures, code that ``torch.compile`` traces, and decode-step
products, where oneDNN's fixed cost per call (about 20 us) exceeds the whole MKL call.

The model calls :func:`linear` with its ``nn.Linear`` modules' parameters, so forward
hooks registered on those modules do not run.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_ROWS = 64  # below this, MKL's lower fixed cost wins (measured: 64 rows x 128 x 384)
_MKL_AVX2_ONLY_VENDORS = ("AuthenticAMD", "HygonGenuine")

_enabled = True


def _cpu_vendor() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    return platform.processor()  # Windows: "AMD64 Family 25 Model 97 ..., AuthenticAMD"


@functools.cache
def onednn_available() -> bool:
    """An AMD x86-64 CPU and a PyTorch with oneDNN's linear op."""
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and any(vendor in _cpu_vendor() for vendor in _MKL_AVX2_ONLY_VENDORS)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


@contextlib.contextmanager
def onednn_enabled(enabled: bool) -> Iterator[None]:
    """Turn the oneDNN path on or off, process-wide, inside the block (benchmarks and
    tests compare). A linear layer's backward follows the choice made in its forward."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def uses_onednn(a: Tensor, *others: Tensor | None) -> bool:
    """Whether a product of ``a`` (rows in all but its last dimension) with ``others``
    goes to oneDNN."""
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
    """``x @ weight.T + bias`` by oneDNN (``weight`` may be a strided view; a strided bias
    would be read wrongly, so it is made contiguous)."""
    bias = None if bias is None else bias.contiguous()
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
        return _onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable  # oneDNN's op has no derivative itself
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
        grad_bias = flat_grad.sum(0) if needs_bias else None
        return grad_x, grad_weight, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` with oneDNN's matmuls where they serve (see the module docstring)."""
    if not uses_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        return _OneDnnLinear.apply(x, weight, bias)
    return _onednn_linear(x, weight, bias)


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D tensors, no autograd."""
    if uses_onednn(a, b):
        return _onednn_linear(a, b.t())
    return torch.mm(a, b)


def add_weight_grad_(acc: Tensor, grad_out: Tensor, x: Tensor) -> Tensor:
    """``acc += grad_out.T @ x`` in place; 2-D ``grad_out`` (N, out), ``x`` (N, in)."""
    if uses_onednn(grad_out, x, acc):
        return acc.add_(_onednn_weight_grad(grad_out, x))
    return acc.addmm_(grad_out.t(), x)
