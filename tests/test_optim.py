"""Optimizers: AdamW, or Muon for the blocks' matrices with AdamW for everything else."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fraglm.config import ModelConfig, TrainConfig
from fraglm.model import Transformer
from fraglm.optim import OptimizerSet, build_optimizer, muon_parameters

TINY = ModelConfig(n_layers=2, d_model=32, n_heads=4, context_length=16, fragment_size=4)


def model_and_loss(seed: int = 0) -> tuple[Transformer, torch.Tensor]:
    torch.manual_seed(seed)
    model = Transformer(TINY, 50)
    tokens = torch.randint(0, 50, (8, 17))
    return model, model(tokens[:, :-1], targets=tokens[:, 1:])


def test_adamw_decays_matrices_only():
    model, _ = model_and_loss()
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    assert isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        assert all((p.dim() >= 2) == (group["weight_decay"] > 0) for p in group["params"])


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model, loss = model_and_loss()
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(optimizer, OptimizerSet)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
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
    optimizer = build_optimizer(model, cfg)
    loss.backward()
    optimizer.step()
    twin = build_optimizer(model, cfg)
    twin.load_state_dict(optimizer.state_dict())
    assert torch.equal(
        twin.optimizers[0].state[model.blocks[0].mlp.down.weight]["momentum_buffer"],
        optimizer.optimizers[0].state[model.blocks[0].mlp.down.weight]["momentum_buffer"],
    )
    with pytest.raises(ValueError, match="1 optimizer states for 2"):
        twin.load_state_dict({"optimizers": [optimizer.optimizers[1].state_dict()]})


def test_the_trainers_lr_reaches_every_group():
    model, _ = model_and_loss()
    optimizer = build_optimizer(model, replace(TrainConfig(), optimizer="muon"))
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    assert all(g["lr"] == 1e-4 for opt in optimizer.optimizers for g in opt.param_groups)
