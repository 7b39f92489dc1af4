"""The model's layers: rotary positions, RMSNorm, SwiGLU and the attention kernel.

RMSNorm and SwiGLU train through autograd Functions with hand-written backward passes,
which save less for backward than autograd of the plain ops; RoPE runs as plain ops.
docs/benchmarks.md ("Layers: hand-written autograd Functions or plain autograd")
records the measurement behind each choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fraglm.attention import attention
from fraglm.config import ModelConfig


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (the Llama convention): cos and sin tables for positions.

    Llama rotates ``x`` with halves ``x1, x2`` of its head dimension to
    ``(x1 cos - x2 sin, x2 cos + x1 sin)``, one frequency per pair ``(x1[i], x2[i])``.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin``, each (T, head_dim / 2), for ``positions`` (T,)."""
        freqs = torch.outer(positions.float(), self.inv_freq)
        return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., head_dim) by tables from :class:`RotaryEmbedding` (broadcast to
    ``x``'s leading dimensions); ``sin = -sin`` rotates back."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward pass.

    On CPU, ``F.rms_norm`` differentiates through its decomposition (power, mean,
    reciprocal root, two products), which saves the normalised input on top of the input
    and runs a dozen kernels backward. This saves the input and the reciprocal RMS only
    and computes ``dx = rstd * (g - x_hat * mean(g * x_hat))`` with ``g = dy * weight``.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(wide.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return (wide * rstd).mul_(weight).to(x.dtype)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        grad = grad.to(rstd.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).flatten(0, -2).sum(0).to(weight.dtype)
        grad_normed = grad * weight
        projection = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.sub_(normed.mul_(projection)).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in at least fp32; same parameter as ``nn.RMSNorm``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        # inference: ATen's one-kernel forward (the hand-written pass is for backward)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of the halves of ``gate_up`` (..., 2 * hidden), saving only
    ``gate_up`` and recomputing ``silu`` backward.

    Autograd would also keep ``silu(gate)``, one more (tokens, hidden) activation per layer
    (an eighth of a p100 training step's peak memory), and allocate a further buffer for
    each of the three products; here the results are written in place, and the two halves
    of the gradient straight into one (..., 2 * hidden) tensor, the gradient of the fused
    projection's output (no concatenation).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad, up, out=grad_gate)
        # d silu(g)/dg applied by ATen's own fused kernel, writing over its input
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        torch.mul(F.silu(gate), grad, out=grad_up)
        return grad_gate_up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate, up = gate_up.chunk(2, dim=-1)``."""
    if torch.is_grad_enabled():
        return _SwiGLU.apply(gate_up)
    # no backward to serve: skip the autograd.Function call, which costs microseconds
    # that decoding, a few dozen small kernels per token, would notice
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


class AttentionKernel(nn.Module):
    """Attention of q (B, H, Tq, hd) over k, v (B, Hkv, Tk, hd) through
    :func:`fraglm.attention.attention`, causal, with the config's backend.

    A module of its own so that a parallelism applied from outside (context parallelism's
    ring, :mod:`fraglm.parallel.context`) can swap it without the model knowing.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.backend, self.fragment_size, self.impl = (
            cfg.attention,
            cfg.fragment_size,
            cfg.fragment_impl,
        )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None
    ) -> torch.Tensor:
        return attention(
            q, k, v, backend=self.backend, causal=True, fragment_size=self.fragment_size,
            doc_ids=doc_ids, impl=self.impl,
        )  # fmt: skip
