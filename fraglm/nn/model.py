"""Decoder-only transformer: Attention, MLP, Block, Transformer.

Two architectures share one code path (``model.arch``):

- ``modern`` (default): RoPE, RMSNorm, SwiGLU MLP, no biases, tied input/output embeddings.
  Weight layout matches Llama (rotate-half RoPE), so export to Hugging Face is a rename.
- ``seed``: the original FragmentStream experiment, GPT-2 style: learned positions,
  LayerNorm, 4x GELU MLP, biases, untied output head.

Attention goes through each block's ``attn.kernel`` (:class:`AttentionKernel`, the
config's backend of :func:`fraglm.attention.attention`); parallelism swaps it from outside
(:func:`fraglm.parallel.context.apply_context_parallel`), so the model holds no attention
math and no process group of its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fraglm.config import ModelConfig
from fraglm.nn.cache import KVCache
from fraglm.nn.layers import AttentionKernel, RMSNorm, RotaryEmbedding, apply_rope, swiglu

Rope = tuple[torch.Tensor, torch.Tensor]


def norm_layer(cfg: ModelConfig) -> nn.Module:
    """RMSNorm (modern) or LayerNorm (seed) over the model width."""
    if cfg.arch == "modern":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Attention(nn.Module):
    """Causal self-attention: fused q/k/v projection, optional QK-norm, RoPE, kernel."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.sizes = (cfg.n_heads, cfg.kv_heads, cfg.kv_heads)
        self.head_dim = cfg.head_dim
        bias = cfg.arch == "seed"
        self.qkv = nn.Linear(cfg.d_model, sum(self.sizes) * self.head_dim, bias=bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.qk_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.kernel: nn.Module = AttentionKernel(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def project(
        self, x: torch.Tensor, rope: Rope | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, hd), keys and values (B, Hkv, T, hd), positions applied."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, sum(self.sizes), self.head_dim).split(self.sizes, 2)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q), self.qk_norm(k)
        if rope is not None:
            cos, sin = rope[0][:, None], rope[1][:, None]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None,
        doc_ids: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.append(self.layer, k, v)
        y = self.kernel(q, k, v, doc_ids).transpose(1, 2).reshape(b, t, d)
        return self.dropout(self.out(y))


class MLP(nn.Module):
    """SwiGLU (modern; gate and up projections fused in ``up``) or GELU (seed)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.mlp_hidden_size
        self.gated = cfg.arch == "modern"
        self.up = nn.Linear(cfg.d_model, 2 * hidden if self.gated else hidden, bias=not self.gated)
        self.down = nn.Linear(hidden, cfg.d_model, bias=not self.gated)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = swiglu(self.up(x)) if self.gated else F.gelu(self.up(x))
        return self.dropout(self.down(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm, self.attn = norm_layer(cfg), Attention(cfg, layer)
        self.mlp_norm, self.mlp = norm_layer(cfg), MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None,
        doc_ids: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, doc_ids, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_embed = (
            nn.Embedding(cfg.context_length, cfg.d_model) if cfg.arch == "seed" else None
        )
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta) if cfg.arch == "modern" else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = norm_layer(cfg)
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
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T).

        With a ``cache``, ``idx`` continues the cached sequence: positions start at
        ``cache.length`` and the cache advances by T. ``positions`` (T,) overrides the
        default ``0..T-1`` (context parallelism's zigzag share). With ``last_only``, logits
        only for the last position (B, 1, vocab): all that sampling needs, without the
        output projection of every prompt token.
        """
        x = self.trunk(idx, doc_ids, cache, positions)
        if last_only:
            x = x[:, -1:]
        return self.head(self.norm(x))

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, T, d_model): what ``head`` turns into logits.
        The training loss (:class:`fraglm.nn.loss.TokenLoss`) projects them a chunk at a
        time, so that all logits never exist at once."""
        return self.norm(self.trunk(idx, doc_ids, None, positions))

    def trunk(
        self,
        idx: torch.Tensor,
        doc_ids: torch.Tensor | None,
        cache: KVCache | None,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """Embeddings through every block, before the final norm."""
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
            x = block(x, rope, doc_ids, cache)
        if cache is not None:
            cache.advance(idx.shape[1])
        return x
