"""Zigzag sharding of sequences for context parallelism.

Each of the N ranks holds 2 of the sequence's 2N equal chunks: rank r holds chunks r and
2N-1-r, so under a causal mask every rank has the same amount of attention work.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import torch
from torch import Tensor

BatchT = TypeVar("BatchT", bound=Any)


def zigzag_chunks(rank: int, world: int) -> tuple[int, int]:
    """The two chunk indices (of 2 * world) that ``rank`` holds."""
    return rank, 2 * world - 1 - rank


def zigzag_indices(
    length: int, rank: int, world: int, device: torch.device | None = None
) -> Tensor:
    """Positions of the sequence that ``rank`` holds, in local order."""
    if length % (2 * world):
        raise ValueError(f"sequence length {length} must be divisible by 2 * ranks = {2 * world}")
    chunk = length // (2 * world)
    first, second = zigzag_chunks(rank, world)
    positions = torch.arange(length, device=device).view(2 * world, chunk)
    return torch.cat((positions[first], positions[second]))


def zigzag_split(x: Tensor, rank: int, world: int, dim: int) -> Tensor:
    """This rank's zigzag share of ``x`` along ``dim``."""
    index = zigzag_indices(x.shape[dim], rank, world, x.device)
    return x.index_select(dim, index)


def zigzag_share(batch: BatchT, rank: int, world: int) -> BatchT:
    """The part of every sequence of ``batch`` that context-parallel ``rank`` of ``world``
    holds, with its ``positions``.

    ``batch`` is a dataclass with ``inputs``, ``targets`` and ``doc_ids`` (None or B, T)
    and a ``positions`` field (as :class:`fraglm.data.batches.Batch`, which this room
    cannot import: data sits on the same floor).
    """
    index = zigzag_indices(batch.inputs.shape[1], rank, world, batch.inputs.device)
    return dataclasses.replace(
        batch,
        inputs=batch.inputs[:, index],
        targets=batch.targets[:, index],
        doc_ids=None if batch.doc_ids is None else batch.doc_ids[:, index],
        positions=index,
    )
