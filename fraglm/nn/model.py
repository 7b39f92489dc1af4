"""Decoder-only transformer with a preallocated KV cache.

Two architectures share one code path (``model.arch``):

- ``modern`` (default): RoPE, RMSNorm, SwiGLU MLP, no biases, tied input/output embeddings.
  Weight layout matches Llama (rotate-half RoPE), so export to Hugging Face is a rename.
- ``seed``: the original FragmentStream experiment, GPT-2 style: learned positions,
  LayerNorm, 4x GELU MLP, biases, untied output head.

Attention goes through :func:`fraglm.attention.attention`, so the backend (fragment, sdpa,
naive) is a config switch and the model holds no attention math of its own.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fraglm.attention import attention
from fraglm.config import ModelConfig
from fraglm.nn.loss import linear_cross_entropy_sum
from fraglm.parallel.ring import ring_attention


def mlp_hidden_size(cfg: ModelConfig) -> int:
    return cfg.mlp_hidden if cfg.mlp_hidden is not None else 4 * cfg.d_model


def kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_heads if cfg.n_kv_heads is not None else cfg.n_heads


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions.

    ``length`` positions are filled; a forward pass with a cache appends its tokens and
    attends to everything cached, so each generated token costs one position.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        max_len: int | None = None,
    ) -> None:
        self.max_len = max_len or cfg.context_length
        shape = (cfg.n_layers, batch_size, kv_heads(cfg), self.max_len, cfg.d_model // cfg.n_heads)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's ``k``, ``v`` for ``layer``; return all cached keys and values."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


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


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate ``x`` (..., head_dim) by tables from :class:`RotaryEmbedding` (broadcast to
    ``x``'s leading dimensions), into ``out`` if given; ``sin = -sin`` rotates back."""
    half = x.shape[-1] // 2
    out = torch.empty_like(x) if out is None else out
    x1, x2, out1, out2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)
    return out


def rotary_heads(
    heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sizes: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries and keys (rotated together: one set of kernels) and values of ``heads``.

    The rotation writes queries and keys head-major, so that ``q.transpose(1, 2)`` is a
    contiguous (B, H, T, hd) tensor: the layout attention reads, with no copy of its own.
    """
    b, t, _, head_dim = heads.shape
    n_rotated = sizes[0] + sizes[1]
    rotated = heads.new_empty(b, n_rotated, t, head_dim).transpose(1, 2)
    apply_rope(heads[:, :, :n_rotated], cos, sin, out=rotated)
    q, k = rotated.split(sizes[:2], dim=2)
    return q, k, heads[:, :, n_rotated:]


class _RotaryHeads(torch.autograd.Function):
    """Queries and keys rotated, and values, from the fused projection's heads
    (B, T, H + 2 Hkv, hd), split at ``sizes`` = (H, Hkv, Hkv).

    Autograd of ``split`` and a ``roll``-based rotation would copy every activation once
    more each way (the roll and, backward, a concatenation for each split). Here the
    rotation reads the halves in place, values are a view, and backward writes the
    three gradients (queries' and keys' rotated back) straight into one tensor of the
    heads' shape: the gradient the projection needs.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        heads: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        sizes: tuple[int, int, int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        ctx.sizes = sizes
        return rotary_heads(heads, cos, sin, sizes)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None, None]:
        cos, sin = ctx.saved_tensors
        like = next(g for g in grads if g is not None)
        b, t, _, hd = like.shape
        grad = like.new_empty(b, t, sum(ctx.sizes), hd)
        parts = grad.split(ctx.sizes, dim=2)
        for index, (part, part_grad) in enumerate(zip(parts, grads, strict=True)):
            if part_grad is None:
                part.zero_()
            elif index < 2:
                apply_rope(part_grad, cos, -sin, out=part)  # the inverse rotation
            else:
                part.copy_(part_grad)
        return grad, None, None, None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.n_heads, self.n_kv_heads = cfg.n_heads, kv_heads(cfg)
        self.head_dim = cfg.d_model // cfg.n_heads
        bias = cfg.arch == "seed"
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.qk_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = nn.Dropout(cfg.dropout)

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, hd), keys and values (B, Hkv, T, hd), positions applied."""
        b, t, _ = x.shape
        sizes = (self.n_heads, self.n_kv_heads, self.n_kv_heads)
        heads = self.qkv(x).view(b, t, sum(sizes), self.head_dim)
        if self.qk_norm is not None:
            qk, v = heads.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=2)
            heads = torch.cat((self.qk_norm(qk), v), dim=2)
        if rope is not None:
            cos, sin = rope[0][:, None], rope[1][:, None]
            # without a backward to serve, the plain function (no autograd.Function call)
            rotate = _RotaryHeads.apply if torch.is_grad_enabled() else rotary_heads
            q, k, v = rotate(heads, cos, sin, sizes)
        else:
            q, k, v = heads.split(sizes, dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        doc_ids: torch.Tensor | None,
        cache: KVCache | None,
        cp_group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.append(self.layer, k, v)
        if cp_group is not None:
            y = ring_attention(
                q, k, v, group=cp_group, fragment_size=self.cfg.fragment_size, doc_ids=doc_ids,
                impl=self.cfg.fragment_impl,
            )  # fmt: skip
        else:
            y = attention(
                q,
                k,
                v,
                backend=self.cfg.attention,
                causal=True,
                fragment_size=self.cfg.fragment_size,
                doc_ids=doc_ids,
                impl=self.cfg.fragment_impl,
            )
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.dropout(self.out(y))


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


class MLP(nn.Module):
    """SwiGLU (modern; gate and up projections fused in ``up``) or GELU (seed)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = mlp_hidden_size(cfg)
        self.gated = cfg.arch == "modern"
        self.up = nn.Linear(cfg.d_model, 2 * hidden if self.gated else hidden, bias=not self.gated)
        self.down = nn.Linear(hidden, cfg.d_model, bias=not self.gated)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = swiglu(self.up(x)) if self.gated else F.gelu(self.up(x))
        return self.dropout(self.down(h))


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


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "modern":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm, self.attn = _norm(cfg), Attention(cfg, layer)
        self.mlp_norm, self.mlp = _norm(cfg), MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        doc_ids: torch.Tensor | None,
        cache: KVCache | None,
        cp_group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, doc_ids, cache, cp_group)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_embed = (
            nn.Embedding(cfg.context_length, cfg.d_model) if cfg.arch == "seed" else None
        )
        self.rope = (
            RotaryEmbedding(cfg.d_model // cfg.n_heads, cfg.rope_theta)
            if cfg.arch == "modern"
            else None
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = _norm(cfg)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=cfg.arch == "seed")
        if cfg.arch == "modern" and cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init_weights)
        residual_std = 0.0 if cfg.zero_init_out else 0.02 / math.sqrt(2 * cfg.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        *,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        cp_group: dist.ProcessGroup | None = None,
        last_only: bool = False,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T).

        With a ``cache``, ``idx`` continues the cached sequence: positions start at
        ``cache.length`` and the cache advances by T. With ``cp_group`` (context
        parallelism), ``idx`` is this rank's zigzag share of each sequence, ``positions``
        its positions, and attention runs as ring attention over the group. With
        ``last_only``, logits only for the last position (B, 1, vocab): all that sampling
        needs, without the output projection of every prompt token. With ``targets``
        (B, T; -100 where a token does not count), the summed cross-entropy instead of
        logits, through the fused head (:mod:`fraglm.nn.loss`), which never holds all logits
        (it reads ``head``'s parameters: a kernel of its own, so hooks on ``head`` do not run).
        """
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + idx.shape[1], device=idx.device)
            last_position = start + idx.shape[1] - 1
        else:
            last_position = None  # read from the tensor only if needed: a host sync on GPUs
        x = self.embed(idx)
        rope = None
        if self.pos_embed is not None:
            if last_position is None:
                last_position = int(positions.max())
            if last_position >= self.cfg.context_length:
                raise ValueError(f"position {last_position} is past the learned positions")
            x = x + self.pos_embed(positions)
        else:
            rope = self.rope(positions)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, rope, doc_ids, cache, cp_group)
        if cache is not None:
            cache.advance(idx.shape[1])
        if targets is not None:
            hidden = self.norm(x).flatten(0, 1)
            return linear_cross_entropy_sum(
                hidden, self.head.weight, self.head.bias, targets.flatten()
            )
        if last_only:
            x = x[:, -1:]
        return self.head(self.norm(x))
