"""The training objective: summed cross-entropy through the model's ``head``, a chunk of
rows at a time.

The plain head materialises logits of shape (tokens, vocab) three times over (logits,
log-probabilities, their gradient): for the p100 shape at batch 8 that is 8 x 512 x 8000
fp32 values, 131 MB each, and most of a training step's peak memory. Here ``head`` runs
as a module on one chunk of rows at a time, and each chunk's gradients (of its hidden
states and of the head's trainable parameters) are taken in the forward pass, so only
one chunk's logits exist at a time and none are recomputed; hooks and wrappers on
``head`` (LoRA, float8) run in training as they do in inference. Gradients reach only
``head``'s trainable parameters (``head.parameters()``), not other tensors it may
close over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # an annotation only: this module needs torch alone
    from fraglm.nn.model import Transformer

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 22  # rows x vocab per chunk: 16 MB of fp32 logits


def _chunk_loss(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy through ``head``, its gradients taken in the forward pass.

    Per chunk of rows h (n, d), with logits z = head(h) and p = softmax(z): the loss is
    sum(logsumexp(z) - z[target]), and autograd of ``head`` gives dh = dz (dhead/dh) and
    dparams = dz (dhead/dparams), where dz = p - onehot(target) (zero on ignored rows);
    for a plain linear head z = h W^T + b, that is dh = dz W, dW = dz^T h, db = sum(dz).
    The forward keeps dh and dparams, not the logits; the backward only scales them by
    the incoming gradient of the sum: 3 products with the head's weight per chunk and
    one softmax, where checkpointing needs 4 and two.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        targets: Tensor,
        head: nn.Module,
        chunk_rows: int,
        *params: Tensor,
    ) -> Tensor:
        grad_hidden = torch.empty_like(hidden)
        grad_params = [torch.zeros_like(p) for p in params]
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows].detach().requires_grad_()
            with torch.enable_grad():
                loss = _chunk_loss(head, h, targets[rows])
            grads = torch.autograd.grad(loss, [h, *params], allow_unused=True)
            grad_hidden[rows] = grads[0]
            for acc, grad in zip(grad_params, grads[1:], strict=True):
                if grad is not None:
                    acc += grad
            total = total + loss.detach()
        ctx.save_for_backward(grad_hidden, *grad_params)
        return total

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor
    ) -> tuple[Tensor | None, ...]:
        grad_hidden, *grad_params = ctx.saved_tensors
        return (
            grad_hidden * grad_total,
            None,
            None,
            None,
            *(grad * grad_total for grad in grad_params),
        )


def chunked_cross_entropy_sum(
    head: nn.Module, hidden: Tensor, targets: Tensor, *, chunk_rows: int
) -> Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``targets``, in at least fp32.

    hidden (N, d), targets (N,) with ``IGNORE_INDEX`` for rows that do not count. When
    autograd records, ``_HeadCrossEntropy`` runs ``head`` on ``chunk_rows`` rows at a
    time and keeps the gradients of ``hidden`` and of the head's trainable parameters
    instead of logits; otherwise (evaluation) the chunks run plainly.
    """
    if torch.is_grad_enabled():
        params = [p for p in head.parameters() if p.requires_grad]
        return _HeadCrossEntropy.apply(hidden, targets, head, chunk_rows, *params)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        total = total + _chunk_loss(head, hidden[rows], targets[rows])
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
