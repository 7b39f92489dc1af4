"""Training and evaluation windows drawn from the memory-mapped token shards.

The windows of optimizer step ``s`` come from an RNG seeded by ``(seed, s)``, so a resumed
run, or a run split over data-parallel ranks, sees exactly the batches of an uninterrupted
single-process run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fraglm.config import ANSWER, END, QUESTION, Config
from fraglm.nn.loss import IGNORE_INDEX


@dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor | None
    positions: torch.Tensor | None = None  # set for a context-parallel share


def answer_target_mask(
    tokens: np.ndarray, question_id: int, answer_id: int, end_id: int
) -> np.ndarray:
    """True where a token is part of an answer: after ``<|A|>``, up to and including ``<|END|>``."""
    index = np.arange(len(tokens))

    def last_before(token_id: int) -> np.ndarray:
        seen = np.maximum.accumulate(np.where(tokens == token_id, index, -1))
        return np.concatenate(([-1], seen[:-1]))

    last_answer = last_before(answer_id)
    return last_answer > np.maximum(last_before(question_id), last_before(end_id))


def document_ids(inputs: torch.Tensor, end_id: int) -> torch.Tensor:
    """Per-token document index within each window; ``<|END|>`` closes its own document."""
    ends = (inputs == end_id).to(torch.int32)
    return torch.cumsum(ends, dim=1) - ends


def make_sampler(tokens: np.ndarray, cfg: Config, ids: dict[str, int]) -> WindowSampler:
    """The sampler the trainer uses for ``tokens``: loss mask and document mask from ``cfg``."""
    mask = None
    if cfg.train.loss_on == "answer":
        mask = answer_target_mask(tokens, ids[QUESTION], ids[ANSWER], ids[END])
    return WindowSampler(
        tokens,
        cfg.model.context_length,
        end_id=ids[END],
        doc_mask=cfg.train.doc_mask,
        target_mask=mask,
    )


class WindowSampler:
    def __init__(
        self,
        tokens: np.ndarray,
        context_length: int,
        *,
        end_id: int,
        doc_mask: bool = False,
        target_mask: np.ndarray | None = None,
    ) -> None:
        self.tokens = tokens
        self.context_length = context_length
        self.end_id = end_id
        self.doc_mask = doc_mask
        self.target_mask = target_mask
        self.max_start = len(tokens) - context_length - 1

    def step_starts(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """Window starts of every sequence in the global batch of ``step``."""
        return np.random.default_rng([seed, step]).integers(0, self.max_start + 1, size=batch_size)

    def counted_targets(self, starts: np.ndarray) -> int:
        """Target tokens that count in the loss over the windows at ``starts``."""
        if self.target_mask is None:
            return len(starts) * self.context_length
        rows = starts[:, None] + np.arange(1, self.context_length + 1)
        return int(self.target_mask[rows].sum())

    def counted_target_bytes(self, starts: np.ndarray, token_bytes: np.ndarray) -> int:
        """UTF-8 bytes of the text that the counted targets at ``starts`` decode to."""
        rows = starts[:, None] + np.arange(1, self.context_length + 1)
        lengths = token_bytes[self.tokens[rows]]
        if self.target_mask is not None:
            lengths = lengths * self.target_mask[rows]
        return int(lengths.sum())

    def eval_starts(self, n_windows: int) -> np.ndarray:
        """Evenly spread, fixed windows: the same evaluation set every time."""
        return np.linspace(0, self.max_start, num=n_windows).astype(np.int64)

    def batch(self, starts: np.ndarray, device: torch.device) -> Batch:
        span = np.arange(self.context_length + 1)
        rows = starts[:, None] + span
        window = torch.from_numpy(self.tokens[rows].astype(np.int64))
        inputs, targets = window[:, :-1], window[:, 1:].clone()
        if self.target_mask is not None:
            targets.masked_fill_(~torch.from_numpy(self.target_mask[rows[:, 1:]]), IGNORE_INDEX)
        doc_ids = document_ids(inputs, self.end_id) if self.doc_mask else None
        return Batch(
            _to_device(inputs, device),
            _to_device(targets, device),
            None if doc_ids is None else _to_device(doc_ids, device),
        )


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to ``device``; to a GPU asynchronously, from pinned (page-locked) memory.

    A ``non_blocking`` copy from ordinary pageable memory is staged by the driver and
    waits anyway; from pinned memory it overlaps with the kernels already queued, and
    torch's pinned-memory cache keeps the host buffer alive until the copy has run.
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
