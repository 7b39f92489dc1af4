"""Output projection and cross-entropy fused, a chunk of rows at a time.

The plain head materialises logits of shape (tokens, vocab) three times over (logits,
log-probabilities, their gradient): for the p100 shape at batch 8 that is 8 x 512 x 8000
fp32 values, 131 MB each, and most of a training step's peak memory. Here each chunk of
rows goes through ``logits = h W^T + b``, its log-sum-exp, its loss and, straight away, its
gradients ``dh = (P - Y) W`` and ``dW += (P - Y)^T h``: the forward pass does the backward
pass's work, nothing of vocabulary size outlives a chunk, and the backward pass only scales
the stored gradients by the incoming gradient of the loss (a scalar).
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 22  # rows x vocab per chunk: 16 MB of fp32 logits


def _chunked_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    compute_dtype: torch.dtype,
    with_grads: bool,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """The summed loss and, ``with_grads``, its gradients for hidden, weight and bias."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    acc = torch.promote_types(compute_dtype, torch.float32)
    chunk = max(1, _CHUNK_ELEMENTS // vocab)
    w = weight.to(compute_dtype)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    if with_grads:
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device)
    # one logits buffer for all chunks: a fresh multi-MB tensor per chunk would cost page
    # faults on CPU, where the allocator may hand large freed blocks back to the OS
    buffer = hidden.new_empty(min(chunk, rows), vocab, dtype=compute_dtype)
    for start in range(0, rows, chunk):
        h = hidden[start : start + chunk].to(compute_dtype)
        target = targets[start : start + chunk]
        logits = torch.mm(h, w.t(), out=buffer[: h.shape[0]]).to(acc)
        if bias is not None:
            logits += bias.to(acc)
        counted = target != IGNORE_INDEX
        safe_target = target.clamp(min=0)[:, None]
        picked = logits.gather(1, safe_target).squeeze(1)
        # one exp pass serves the log-sum-exp and, for the gradient, the softmax
        row_max = logits.amax(dim=-1, keepdim=True)
        probs = logits.sub_(row_max).exp_()
        row_sum = probs.sum(dim=-1, keepdim=True)
        lse = (row_max + row_sum.log()).squeeze(1)
        total += ((lse - picked) * counted).sum()
        if not with_grads:
            continue
        # dLoss/dlogits = softmax - onehot(target), zero on ignored rows; in place. The
        # row mask rides on the softmax scale: no branch on its values, so no host sync
        weight_of_row = counted[:, None].to(acc)
        grad = probs.mul_(weight_of_row / row_sum)
        grad.scatter_add_(1, safe_target, -weight_of_row)
        grad_hidden[start : start + chunk] = torch.mm(grad.to(compute_dtype), w)
        grad_weight.addmm_(grad.t(), h.to(acc))
        if bias is not None:
            grad_bias += grad.sum(0)
    return total, (grad_hidden, grad_weight, grad_bias) if with_grads else None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        compute_dtype: torch.dtype,
    ) -> Tensor:
        total, grads = _chunked_loss(hidden, weight, bias, targets, compute_dtype, True)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor
    ) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        return (
            grad_hidden * grad_total.to(grad_hidden.dtype) if needs_hidden else None,
            (grad_weight * grad_total).to(weight_dtype) if needs_weight else None,
            (grad_bias * grad_total).to(bias_dtype) if needs_bias else None,
            None,
            None,
        )


def linear_cross_entropy_sum(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor
) -> Tensor:
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``.

    hidden (N, d), weight (V, d), bias (V,) or None, targets (N,) with ``IGNORE_INDEX``
    for rows that do not count. Matmuls run in the autocast dtype when autocast is on,
    else in the dtype of ``hidden``; log-sum-exp, loss and gradient sums in at least fp32.
    """
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    # gradient work only when autograd records it (never under no_grad, as in evaluation):
    # the Function's own flags, ctx.needs_input_grad, stay true under no_grad
    records = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    with torch.autocast(device_type, enabled=False):
        if records:
            return _LinearCrossEntropy.apply(hidden, weight, bias, targets, compute_dtype)
        return _chunked_loss(hidden, weight, bias, targets, compute_dtype, False)[0]
