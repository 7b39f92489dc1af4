"""The training objective: summed cross-entropy through the model's ``head``, a chunk of
rows at a time.

The plain head materialises logits of shape (tokens, vocab) three times over (logits,
log-probabilities, their gradient): for the p100 shape at batch 8 that is 8 x 512 x 8000
fp32 values, 131 MB each, and most of a training step's peak memory. Here ``head`` runs
as a module on one chunk of rows at a time, under ``torch.utils.checkpoint``: a chunk's
logits are dropped after its loss and recomputed in the backward pass, so only one
chunk's logits exist at a time, and hooks and wrappers on ``head`` (LoRA, float8) run
in training as they do in inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fraglm.nn.model import Transformer

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 22  # rows x vocab per chunk: 16 MB of fp32 logits


def _chunk_loss(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(
    head: nn.Module, hidden: Tensor, targets: Tensor, *, chunk_rows: int
) -> Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``targets``, in at least fp32.

    hidden (N, d), targets (N,) with ``IGNORE_INDEX`` for rows that do not count. When
    autograd records, each chunk of ``chunk_rows`` rows is checkpointed: its logits are
    recomputed backward instead of kept.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    records = torch.is_grad_enabled()
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        if records:
            part = checkpoint(_chunk_loss, head, hidden[rows], targets[rows], use_reentrant=False)
        else:
            part = _chunk_loss(head, hidden[rows], targets[rows])
        total = total + part
    return total


class TokenLoss(nn.Module):
    """The summed cross-entropy of ``model`` over a batch, as a module's forward.

    What the trainer wraps in DistributedDataParallel and ``torch.compile``: DDP sees
    the whole objective run in one forward, head included.
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        self.chunk_rows = max(1, _CHUNK_ELEMENTS // model.vocab_size)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor,
        *,
        doc_ids: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Summed loss (fp32) of next tokens ``targets`` (B, T) after ``idx`` (B, T)."""
        hidden = self.model.hidden_states(idx, doc_ids=doc_ids, positions=positions)
        return chunked_cross_entropy_sum(
            self.model.head, hidden.flatten(0, 1), targets.flatten(), chunk_rows=self.chunk_rows
        )
