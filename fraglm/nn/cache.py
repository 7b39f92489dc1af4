"""The key/value cache that decoding appends to, one position per generated token."""

from __future__ import annotations

import torch

from fraglm.config import ModelConfig


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
        shape = (cfg.n_layers, batch_size, cfg.kv_heads, self.max_len, cfg.head_dim)
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
