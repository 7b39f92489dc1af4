"""Loss on held-out text: the training loss, and the validation loss over fixed windows
(the trainer's periodic evaluation; ``fraglm eval`` in :mod:`fraglm.training.run_evaluation`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fraglm.config import TrainConfig
from fraglm.data.batches import Batch, WindowSampler
from fraglm.device import Precision
from fraglm.nn.loss import TokenLoss
from fraglm.nn.model import Transformer


def token_loss_sum(objective: torch.nn.Module, batch: Batch, precision: Precision) -> torch.Tensor:
    """Summed cross-entropy over the batch's counted target tokens (fp32), through
    ``objective``: a :class:`~fraglm.nn.loss.TokenLoss`, or the trainer's wrapping of one."""
    with precision.context(batch.inputs.device):
        return objective(
            batch.inputs, batch.targets, doc_ids=batch.doc_ids, positions=batch.positions
        )


@torch.no_grad()
def evaluate(
    model: Transformer,
    sampler: WindowSampler,
    starts: np.ndarray,
    *,
    batch_size: int,
    precision: Precision,
    device: torch.device,
) -> tuple[float, int]:
    """Mean loss per counted token over the windows at ``starts``, and the token count."""
    was_training = model.training
    model.eval()
    objective = TokenLoss(model)
    sums, count = [], 0
    for chunk in np.array_split(starts, max(1, math.ceil(len(starts) / batch_size))):
        sums.append(token_loss_sum(objective, sampler.batch(chunk, device), precision))
        count += sampler.counted_targets(chunk)  # counted on the host, from the windows
    model.train(was_training)
    total = float(torch.stack(sums).sum()) if sums else 0.0  # the one host sync, at the end
    return total / max(count, 1), count


def bits_per_byte(mean_loss: float, tokens: int, n_bytes: int) -> float:
    """Summed nats over the targets / (ln 2 x the UTF-8 bytes of the text they decode to).

    Unlike loss per token, it does not depend on the tokenizer: models with different
    vocabularies (or other projects' models) compare on the same text.
    """
    return mean_loss * tokens / (math.log(2) * max(n_bytes, 1))


@dataclass(frozen=True)
class EvalWindows:
    """Fixed windows of held-out text, evaluated ``batch_size`` at a time: the validation
    split's (:meth:`of`; the same at every evaluation, and so are their token and byte
    counts), or every window of another corpus file (``fraglm eval --data``)."""

    sampler: WindowSampler
    starts: np.ndarray
    batch_size: int
    token_bytes: np.ndarray  # UTF-8 bytes per token id

    @classmethod
    def of(cls, sampler: WindowSampler, cfg: TrainConfig, token_bytes: np.ndarray) -> EvalWindows:
        """The windows of the validation split ``sampler`` draws from: ``train.eval_batches``
        micro-batches, at fixed places (what ``fraglm eval`` reproduces)."""
        micro_batch = cfg.batch_size // cfg.grad_accum
        starts = sampler.eval_starts(cfg.eval_batches * micro_batch)
        return cls(sampler, starts, micro_batch, token_bytes)

    def loss(self, model: torch.nn.Module, precision: Precision, device: torch.device) -> float:
        loss, _ = evaluate(
            model,
            self.sampler,
            self.starts,
            batch_size=self.batch_size,
            precision=precision,
            device=device,
        )
        return loss

    def bits_per_byte(self, loss: float) -> float:
        n_bytes = self.sampler.counted_target_bytes(self.starts, self.token_bytes)
        return bits_per_byte(loss, self.sampler.counted_targets(self.starts), n_bytes)
