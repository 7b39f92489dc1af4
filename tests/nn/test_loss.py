"""The training loss through ``head`` a chunk at a time equals the plain one, values and
gradients; hooks on ``head`` run; one chunk's logits at a time."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fraglm.config import ModelConfig
from fraglm.nn.loss import IGNORE_INDEX, TokenLoss, chunked_cross_entropy_sum
from fraglm.nn.model import Transformer


def _inputs(dtype, rows=37, dim=8, vocab=50, bias=True):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, dtype=dtype, generator=gen, requires_grad=True)
    head = nn.Linear(dim, vocab, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, dtype=dtype, generator=gen))
        if bias:
            head.bias.copy_(torch.randn(vocab, dtype=dtype, generator=gen))
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[::5] = IGNORE_INDEX
    return hidden, head, targets


def _leaves(hidden, head):
    return [hidden, *head.parameters()]


def _reference(hidden, head, targets):
    """Plain cross-entropy of all logits at once, on detached copies."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = head.weight.detach().clone().requires_grad_()
    bias = None if head.bias is None else head.bias.detach().clone().requires_grad_()
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, [t for t in (hidden, weight, bias) if t is not None]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])  # 1 row, 7 rows, all rows
def test_matches_plain_cross_entropy_fp64(bias, chunk_rows):
    hidden, head, targets = _inputs(torch.float64, bias=bias)
    got = chunked_cross_entropy_sum(head, hidden, targets, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(3.0 * got, _leaves(hidden, head))
    want, ref_leaves = _reference(hidden, head, targets)
    want_grads = torch.autograd.grad(3.0 * want, ref_leaves)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_float32_at_training_size_matches_plain_cross_entropy():
    """float32 with enough rows for several chunks, as in training."""
    hidden, head, targets = _inputs(torch.float32, rows=300, dim=16, vocab=70)
    got = chunked_cross_entropy_sum(head, hidden, targets, chunk_rows=128)
    grads = torch.autograd.grad(got, _leaves(hidden, head))
    want, ref_leaves = _reference(hidden, head, targets)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for g, w in zip(grads, torch.autograd.grad(want, ref_leaves), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_gradcheck():
    """The head's parameters are gradcheck's inputs: perturbed in place, seen by ``head``."""
    hidden, head, targets = _inputs(torch.float64, rows=6, dim=3, vocab=5)
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_cross_entropy_sum(head, h, targets, chunk_rows=4),
        (hidden, head.weight, head.bias),
    )


class _LoRA(nn.Module):
    """A frozen linear head plus a trainable low-rank delta: x W^T + b + (x A^T) B^T."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        gen = torch.Generator().manual_seed(2)
        dtype = base.weight.dtype
        self.a = nn.Parameter(torch.randn(rank, base.in_features, dtype=dtype, generator=gen))
        self.b = nn.Parameter(torch.randn(base.out_features, rank, dtype=dtype, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.a), self.b)


def test_lora_wrapped_head_gets_grads_for_its_trainable_params_only():
    hidden, base, targets = _inputs(torch.float64)
    head = _LoRA(base, rank=2)
    got = chunked_cross_entropy_sum(head, hidden, targets, chunk_rows=7)
    grads = torch.autograd.grad(got, [hidden, head.a, head.b])
    logits = head(hidden)
    want = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for g, w in zip(grads, torch.autograd.grad(want, [hidden, head.a, head.b]), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    assert base.weight.grad is None


def test_bf16_autocast_is_close_to_fp32():
    hidden, head, targets = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_cross_entropy_sum(head, hidden, targets, chunk_rows=8)
    assert got.dtype == torch.float32
    want, _ = _reference(hidden, head, targets)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)


def test_all_rows_ignored_is_zero_with_zero_gradients():
    hidden, head, targets = _inputs(torch.float32)
    targets[:] = IGNORE_INDEX
    total = chunked_cross_entropy_sum(head, hidden, targets, chunk_rows=8)
    total.backward()
    assert total == 0 and hidden.grad.abs().sum() == 0 and head.weight.grad.abs().sum() == 0


def test_ignored_rows_cost_no_host_sync(op_log):
    hidden, head, targets = _inputs(torch.float32)
    with op_log() as log:
        chunked_cross_entropy_sum(head, hidden, targets, chunk_rows=8).backward()
    assert log.host_syncs == []


def test_only_one_chunks_logits_are_kept_for_backward():
    """Under autograd, nothing saved is larger than one chunk's logits or the head's
    weight: the loss keeps the gradients of hidden and of the head's parameters, not the
    logits, so memory does not grow with rows x vocab."""
    hidden, head, targets = _inputs(torch.float32, rows=40, vocab=50)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total = chunked_cross_entropy_sum(head, hidden, targets, chunk_rows=8)
    assert max(saved, default=0) <= max(8 * 50, head.weight.numel())
    total.backward()
    assert hidden.grad is not None


def test_no_grad_runs_each_chunk_once():
    """Evaluation (no_grad) projects each chunk once, with the same loss as with gradients."""
    hidden, head, targets = _inputs(torch.float32)  # 37 rows: 5 chunks of 8
    calls: list[int] = []
    head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        total = chunked_cross_entropy_sum(head, hidden, targets, chunk_rows=8)
    assert calls == [8, 8, 8, 8, 5] and not total.requires_grad
    torch.testing.assert_close(
        total, chunked_cross_entropy_sum(head, hidden, targets, chunk_rows=8).detach()
    )


def test_token_loss_runs_head_hooks_and_equals_plain_logits():
    """The objective goes through ``head`` as a module (hooks see every chunk, forward
    run once, in the forward pass) and equals cross-entropy of the model's own logits."""
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, context_length=32, fragment_size=4)
    torch.manual_seed(0)
    model = Transformer(cfg, 50).double()
    objective = TokenLoss(model)
    objective.chunk_rows = 5
    idx, targets = torch.randint(0, 50, (2, 2, 12), generator=torch.Generator().manual_seed(1))
    rows: list[int] = []
    model.head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    total = objective(idx, targets)
    assert rows == [5] * 4 + [4]
    total.backward()
    assert len(rows) == 5  # backward only scales the gradients kept in the forward pass
    grads = [p.grad for p in model.parameters()]
    model.zero_grad()
    want = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), reduction="sum")
    want.backward()
    torch.testing.assert_close(total, want, rtol=0, atol=1e-10)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-10)
