"""The learning-rate schedule: warmup, then a cosine or warmup-stable-decay (``wsd``)."""

from __future__ import annotations

import math

from fraglm.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then down to ``lr * min_lr_ratio`` at ``max_steps``: a cosine,
    or (``wsd``) constant until the last ``decay_fraction`` of the steps, then linear."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, round(cfg.max_steps * (1 - cfg.decay_fraction)))
        progress = (step - decay_start) / max(cfg.max_steps - decay_start, 1)
        return cfg.lr - (cfg.lr - floor) * min(max(progress, 0.0), 1.0)
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))
