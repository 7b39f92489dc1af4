"""Optimizers: AdamW everywhere, or Muon for the blocks' matrices and AdamW for the rest.

Muon (Jordan et al. 2024, ``torch.optim.Muon``) replaces each update of a 2-D weight by the
nearest semi-orthogonal matrix of its momentum (Newton-Schulz iterations), so every
direction of the matrix learns at the same rate. It is meant for the hidden matrices
only: embeddings, the output head and the norm gains keep AdamW. With
``adjust_lr_fn="match_rms_adamw"`` (Liu et al. 2025, "Muon is Scalable for LLM Training")
Muon's update has AdamW's RMS, so both share ``train.lr``, its schedule and
``train.weight_decay``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fraglm.config import TrainConfig
from fraglm.errors import FraglmError


class OptimizerSet:
    """Several optimizers stepped as one: what the trainer and ``GradScaler`` need of one.

    ``param_groups`` lists every optimizer's groups (the trainer sets their lr), and the
    state dict holds one entry per optimizer, so a checkpoint resumes each exactly.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"{len(saved)} optimizer states for {len(self.optimizers)}")
        for opt, opt_state in zip(self.optimizers, saved, strict=True):
            opt.load_state_dict(opt_state)


def optimizer_parts(
    optimizer: torch.optim.Optimizer | OptimizerSet, saved: dict[str, Any], path: Path
) -> list[tuple[torch.optim.Optimizer, dict[str, Any]]]:
    """Each torch optimizer of ``optimizer`` with its part of the saved state ``saved``
    (read from ``path``), for checks before loading; a state saved with another
    ``train.optimizer`` is a one-line error."""
    parts = saved.get("optimizers") if isinstance(saved, dict) else None
    optimizers = optimizer.optimizers if isinstance(optimizer, OptimizerSet) else (optimizer,)
    if isinstance(optimizer, OptimizerSet) != (parts is not None) or len(parts or [saved]) != len(
        optimizers
    ):
        raise FraglmError(
            f"checkpoint state {path} was saved with another train.optimizer than the config's"
        )
    return list(zip(optimizers, parts or [saved], strict=True))


def _adamw(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.AdamW:
    # the fused kernel updates each parameter in one pass; on CPU about 4x faster than the
    # default per-tensor loop (2 ms vs 9 ms a step for the p100 model)
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def muon_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The matrices Muon updates: 2-D weights inside the transformer blocks."""
    blocks = getattr(model, "blocks", [])
    return [p for p in blocks.parameters() if p.requires_grad and p.dim() == 2]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> Any:
    """``train.optimizer``: AdamW with weight decay on matrices only (not on norms and
    biases), or Muon for the blocks' matrices plus that AdamW for everything else."""
    params = [p for p in model.parameters() if p.requires_grad]
    muon = {id(p) for p in muon_parameters(model)} if cfg.optimizer == "muon" else set()
    rest = [p for p in params if id(p) not in muon]
    adamw = _adamw(
        [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        cfg,
    )
    if not muon:
        return adamw
    matrices = [p for p in params if id(p) in muon]
    return OptimizerSet(
        torch.optim.Muon(
            matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"
        ),
        adamw,
    )
