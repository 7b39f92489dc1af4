"""Optimizers: AdamW, or Muon for the blocks' matrices with AdamW for everything else."""

from __future__ import annotations

import copy
import functools
from dataclasses import replace

import pytest
import torch

from fraglm.config import ModelConfig, TrainConfig
from fraglm.nn.loss import TokenLoss
from fraglm.nn.model import Transformer
from fraglm.training.optim import (
    Muon,
    OptimizerSet,
    build_optimizer,
    muon_parameters,
    orthogonalize,
)

BF16 = torch.bfloat16
TINY = ModelConfig(n_layers=2, d_model=32, n_heads=4, context_length=16, fragment_size=4)


def model_and_loss(seed: int = 0) -> tuple[Transformer, torch.Tensor]:
    torch.manual_seed(seed)
    model = Transformer(TINY, 50)
    tokens = torch.randint(0, 50, (8, 17))
    return model, TokenLoss(model)(tokens[:, :-1], tokens[:, 1:])


def test_adamw_decays_matrices_only():
    model, _ = model_and_loss()
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1), BF16)
    assert isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        assert all((p.dim() >= 2) == (group["weight_decay"] > 0) for p in group["params"])


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model, loss = model_and_loss()
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), BF16)
    assert isinstance(optimizer, OptimizerSet)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    assert muon.dtype == BF16
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert muon_ids == {id(p) for p in muon_parameters(model)}
    assert len(muon_ids) == 4 * TINY.n_layers  # qkv, out, up (gate + up), down
    everything = [p for g in optimizer.param_groups for p in g["params"]]
    assert sorted(map(id, everything)) == sorted(id(p) for p in model.parameters())
    assert id(model.embed.weight) not in muon_ids  # embeddings and gains stay with AdamW

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    # Muon's update of a matrix is (a multiple of) an orthogonalised gradient: the singular
    # values of the change are about equal (Newton-Schulz leaves the gradient's near-null
    # directions out, so the smallest quarter is not compared)
    change = model.blocks[0].attn.out.weight.detach() - before["blocks.0.attn.out.weight"]
    singular = torch.linalg.svdvals(change)[: 3 * TINY.d_model // 4]
    assert float(singular.min() / singular.max()) > 0.4
    assert all(p.grad is None for p in model.parameters())


def test_muon_state_round_trips_for_an_exact_resume():
    cfg = TrainConfig(optimizer="muon")
    model, loss = model_and_loss()
    optimizer = build_optimizer(model, cfg, BF16)
    loss.backward()
    optimizer.step()
    twin = build_optimizer(model, cfg, BF16)
    twin.load_state_dict(optimizer.state_dict())
    assert torch.equal(
        twin.optimizers[0].state[model.blocks[0].mlp.down.weight]["momentum_buffer"],
        optimizer.optimizers[0].state[model.blocks[0].mlp.down.weight]["momentum_buffer"],
    )
    with pytest.raises(ValueError, match="1 optimizer states for 2"):
        twin.load_state_dict({"optimizers": [optimizer.optimizers[1].state_dict()]})


def test_the_trainers_lr_reaches_every_group():
    model, _ = model_and_loss()
    optimizer = build_optimizer(model, replace(TrainConfig(), optimizer="muon"), BF16)
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    assert all(g["lr"] == 1e-4 for opt in optimizer.optimizers for g in opt.param_groups)


# tall, wide and square matrices: Newton-Schulz works on the wide orientation
SHAPES = [(48, 16), (16, 40), (24, 24)]


def muon_run(
    optimizer_class: type[torch.optim.Muon], steps: int = 4, state=None, **kwargs
) -> tuple[list[torch.Tensor], torch.optim.Muon]:
    """``steps`` steps from the same weights and gradients; the weights after, and the
    optimizer (``state``: a state dict loaded first)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]
    optimizer = optimizer_class(params, lr=0.02, weight_decay=0.1, **kwargs)
    if state is not None:
        # a copy: loading keeps the state's tensors, which the steps then change in place
        optimizer.load_state_dict(copy.deepcopy(state))
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return [p.detach() for p in params], optimizer


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_bf16_muon_is_torchs_update_bit_for_bit(nesterov, adjust_lr_fn):
    kwargs = {"nesterov": nesterov, "adjust_lr_fn": adjust_lr_fn}
    want, torch_muon = muon_run(torch.optim.Muon, **kwargs)
    got, ours = muon_run(functools.partial(Muon, dtype=BF16), **kwargs)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    buffers = [opt.state_dict()["state"][0]["momentum_buffer"] for opt in (ours, torch_muon)]
    assert torch.equal(*buffers)


def test_fp32_muon_makes_no_bf16_tensor_and_is_closer_to_the_exact_iteration(op_log):
    with op_log() as log:
        fp32, _ = muon_run(functools.partial(Muon, dtype=torch.float32))
    assert log.ops_with(BF16) == []
    bf16, _ = muon_run(functools.partial(Muon, dtype=BF16))
    exact, _ = muon_run(functools.partial(Muon, dtype=torch.float64))
    for a, b, ref in zip(fp32, bf16, exact, strict=True):
        assert (a - ref).abs().max() <= (b - ref).abs().max() / 10
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)  # the update is lr-sized: 0.02


def test_orthogonalize_in_fp32_gives_singular_values_near_one():
    grad = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    out = orthogonalize(grad, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    assert out.dtype == torch.float32 and out.shape == grad.shape
    singular = torch.linalg.svdvals(out)
    assert float(singular.min()) > 0.5 and float(singular.max()) < 1.5


def test_a_state_saved_by_torchs_muon_resumes():
    _, torch_muon = muon_run(torch.optim.Muon, steps=2, adjust_lr_fn="match_rms_adamw")
    saved = torch_muon.state_dict()
    continued, _ = muon_run(torch.optim.Muon, steps=2, state=saved)
    ours = functools.partial(Muon, dtype=BF16)
    resumed, optimizer = muon_run(ours, steps=2, state=saved)
    assert optimizer.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"  # from the state
    assert all(torch.equal(a, b) for a, b in zip(resumed, continued, strict=True))
