"""The transformer: parameter budget, weight tying, backends, KV cache, initialisation, RoPE."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fraglm.attention import tiles
from fraglm.config import ModelConfig, load_config
from fraglm.nn.cache import KVCache
from fraglm.nn.layers import RMSNorm, RotaryEmbedding, apply_rope, swiglu
from fraglm.nn.loss import TokenLoss
from fraglm.nn.model import MLP, Transformer

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 8000  # the p100 and seed presets' BPE vocabulary
TINY = ModelConfig(n_layers=2, d_model=32, n_heads=4, context_length=32, fragment_size=4)


def preset(name: str) -> ModelConfig:
    return load_config(REPO_ROOT / "configs" / f"{name}.yaml").model


def build(cfg: ModelConfig, vocab: int = 50, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg, vocab)


# parameter budget and weight tying


def test_modern_p100_model_has_about_3m_parameters():
    cfg = preset("p100")
    assert cfg.arch == "modern" and cfg.mlp_hidden is None
    d, layers, hidden = cfg.d_model, cfg.n_layers, 4 * cfg.d_model
    per_layer = (
        d * 3 * d  # fused q, k, v (no biases)
        + d * d  # attention output
        + d * 2 * hidden  # fused SwiGLU gate and up
        + hidden * d  # down
        + 2 * d  # two RMSNorm weights
        + d // cfg.n_heads  # the QK-norm gain
    )
    expected = VOCAB * d + layers * per_layer + d  # tied embedding/head, final RMSNorm
    model = Transformer(cfg, VOCAB)
    assert cfg.qk_norm and model.num_parameters() == expected == 3_123_456


def test_seed_preset_has_about_3_7m_parameters():
    cfg = preset("seed")
    assert cfg.arch == "seed"
    d, layers, hidden = cfg.d_model, cfg.n_layers, 4 * cfg.d_model
    per_layer = (
        (d * 3 * d + 3 * d)  # q, k, v with biases
        + (d * d + d)  # attention output
        + (d * hidden + hidden)  # GELU up
        + (hidden * d + d)  # down
        + 2 * 2 * d  # two LayerNorms (weight and bias)
    )
    expected = (
        VOCAB * d  # token embedding
        + cfg.context_length * d  # learned positions
        + layers * per_layer
        + 2 * d  # final LayerNorm
        + (d * VOCAB + VOCAB)  # untied head with bias
    )
    model = Transformer(cfg, VOCAB)
    assert model.num_parameters() == expected == 3_707_968


def test_modern_ties_the_head_to_the_embedding():
    model = build(TINY)
    assert model.head.weight is model.embed.weight
    names = [name for name, _ in model.named_parameters()]
    assert "embed.weight" in names and "head.weight" not in names  # one tensor, counted once
    with torch.no_grad():
        model.embed.weight[3].zero_()
    assert not model.head.weight[3].any()


def test_untied_modern_model_has_its_own_head():
    tied, untied = build(TINY), build(replace(TINY, tie_embeddings=False))
    assert untied.head.weight is not untied.embed.weight
    assert untied.num_parameters() == tied.num_parameters() + 50 * TINY.d_model


def test_seed_has_an_untied_head():
    model = build(replace(TINY, arch="seed"))
    assert model.head.weight is not model.embed.weight
    assert model.head.weight.data_ptr() != model.embed.weight.data_ptr()
    assert model.head.bias is not None


@pytest.mark.parametrize("arch", ["modern", "seed"])
def test_forward_gives_logits_for_every_position(arch):
    model = build(replace(TINY, arch=arch), vocab=50)
    logits = model(torch.randint(0, 50, (3, 11)))
    assert logits.shape == (3, 11, 50)
    assert logits.dtype == torch.float32 and logits.isfinite().all()


def test_seed_refuses_positions_past_its_learned_table():
    cfg = replace(TINY, arch="seed")
    model = build(cfg)
    with pytest.raises(ValueError, match="past the learned positions"):
        model(torch.zeros(1, cfg.context_length + 1, dtype=torch.long))


# backends


def _logits_and_grads(
    cfg: ModelConfig, idx: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = build(cfg).double()
    logits = model(idx, doc_ids=doc_ids)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["modern", "seed"])
@pytest.mark.parametrize("documents", [False, True], ids=["one doc", "packed docs"])
def test_attention_backends_agree_on_logits_and_gradients(arch, documents):
    cfg = replace(TINY, arch=arch, n_kv_heads=2)  # GQA too
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50, (2, 18), generator=gen)  # not a multiple of the fragment size
    targets = torch.randint(0, 50, (2, 18), generator=gen)
    doc_ids = None
    if documents:
        doc_ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * 4, [0] * 11 + [1] * 7])
    ref_logits, ref_grads = _logits_and_grads(
        replace(cfg, attention="naive"), idx, targets, doc_ids
    )
    for backend in ("fragment", "sdpa"):
        logits, grads = _logits_and_grads(replace(cfg, attention=backend), idx, targets, doc_ids)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("arch", ["modern", "seed"])
@pytest.mark.parametrize("backend", ["fragment", "sdpa", "naive"])
def test_trains_under_bf16_autocast(arch, backend, op_log):
    """The mixed-precision path (bf16 here, fp16 on a P100): loss and gradients close to
    fp32, and no host sync in the step."""
    cfg = replace(TINY, arch=arch, attention=backend)
    gen = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 50, (2, 2, 18), generator=gen)
    results = []
    for autocast in (False, True):
        model = build(cfg)
        with op_log() as log:
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                loss = TokenLoss(model)(idx, targets) / targets.numel()
            loss.backward()
        assert log.host_syncs == [] and loss.dtype == torch.float32
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss32, grads32), (loss16, grads16) = results
    torch.testing.assert_close(loss16, loss32, rtol=1e-2, atol=0)
    for g16, g32 in zip(grads16, grads32, strict=True):
        assert (g16 - g32).norm() < 0.1 * g32.norm()


@pytest.mark.parametrize("arch", ["modern", "seed"])
def test_forward_calls_every_linear_module(arch):
    """The model calls its modules: forward hooks (LoRA, float8 and other wrappers of
    nn.Linear rely on them) see every linear layer, head included, in a training step
    with targets and in decoding."""
    model = build(replace(TINY, arch=arch))
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 4 * TINY.n_layers + 1  # qkv, out, up, down per block; head
    called: list[str] = []
    for name, module in linears.items():
        module.register_forward_hook(lambda m, args, out, name=name: called.append(name))
    idx, targets = torch.randint(0, 50, (2, 2, 9), generator=torch.Generator().manual_seed(0))
    TokenLoss(model)(idx, targets).backward()  # a training step, loss included
    assert set(called) == set(linears)
    assert all(p.grad is not None for p in model.parameters())
    called.clear()
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 9)), last_only=True)
    assert sorted(called) == sorted(linears)


def test_documents_do_not_see_each_other():
    """With doc_ids, a document's logits do not depend on the document packed before it."""
    model = build(replace(TINY, attention="fragment")).eval()
    gen = torch.Generator().manual_seed(2)
    first, second = (torch.randint(0, 50, (1, n), generator=gen) for n in (7, 9))
    packed = torch.cat([first, second], dim=1)
    other = torch.cat([torch.randint(0, 50, (1, 7), generator=gen), second], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    a, b = model(packed, doc_ids=doc_ids), model(other, doc_ids=doc_ids)
    # RoPE is relative, so the second document's logits are the same whatever precedes it
    torch.testing.assert_close(a[:, 7:], b[:, 7:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 7:], model(packed)[:, 7:], atol=1e-3)


# KV cache


@pytest.mark.parametrize("backend", ["fragment", "sdpa", "naive"])
@pytest.mark.parametrize(
    ("arch", "kv", "qk_norm"),
    [("modern", None, False), ("seed", None, False), ("modern", 2, False), ("modern", 1, False),
     ("modern", 2, True)],
)  # fmt: skip
def test_cached_decoding_equals_the_full_forward(arch, kv, qk_norm, backend):
    cfg = replace(TINY, arch=arch, n_kv_heads=kv, attention=backend, qk_norm=qk_norm)
    model = build(cfg).eval()
    idx = torch.randint(0, 50, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(cfg, 2, device="cpu", dtype=torch.float32)
        pieces = [model(idx[:, :6], cache=cache)]  # prefill
        pieces.append(model(idx[:, 6:9], cache=cache))  # a chunk continuing the cache
        pieces += [model(idx[:, t : t + 1], cache=cache) for t in range(9, 21)]  # one by one
    assert cache.length == 21
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_refuses_to_overflow():
    cfg = replace(TINY, context_length=8)
    model = build(cfg).eval()
    cache = KVCache(cfg, 1, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="KV cache holds 8 positions"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


# initialisation and RoPE


@pytest.mark.parametrize("arch", ["modern", "seed"])
def test_residual_projections_start_smaller(arch):
    """GPT-2 style: projections into the residual stream get std 0.02 / sqrt(2 * n_layers)."""
    cfg = ModelConfig(arch=arch, n_layers=8, d_model=128, n_heads=8)
    model = build(cfg, vocab=1000)
    residual = 0.02 / math.sqrt(2 * cfg.n_layers)
    for block in model.blocks:
        for weight in (block.attn.out.weight, block.mlp.down.weight):
            assert float(weight.detach().std()) == pytest.approx(residual, rel=0.05)
        for weight in (block.attn.qkv.weight, block.mlp.up.weight):
            assert float(weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(model.embed.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    if arch == "seed":
        assert not model.blocks[0].attn.qkv.bias.any()


def test_zero_initialised_output_projections_make_each_block_the_identity():
    model = build(replace(TINY, zero_init_out=True))
    x = torch.randn(2, 5, TINY.d_model)
    rope = model.rope(torch.arange(5))
    for block in model.blocks:
        assert not block.attn.out.weight.any() and not block.mlp.down.weight.any()
        torch.testing.assert_close(block(x, rope, None, None), x, rtol=0, atol=0)
    assert float(model.blocks[0].attn.qkv.weight.detach().std()) == pytest.approx(0.02, rel=0.1)


def test_qk_norm_normalises_each_query_and_key_head():
    """With QK-norm, queries and keys have unit RMS per head before RoPE, times one gain."""
    model = build(replace(TINY, qk_norm=True))
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.qk_norm.weight.fill_(2.0)
        q, k, v = attn.project(torch.randn(2, 5, TINY.d_model) * 7, rope=None)
    for t in (q, k):
        rms = t.square().mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, 2.0), rtol=1e-4, atol=1e-4)
    assert v.square().mean(-1).sqrt().std() > 0.1  # values are not normalised


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(head_dim=16, theta=10000.0)
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(16, generator=gen), torch.randn(16, generator=gen)

    def score(m: int, n: int) -> float:
        cos, sin = rope(torch.tensor([m, n]))
        return float(apply_rope(q, cos[0], sin[0]) @ apply_rope(k, cos[1], sin[1]))

    assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4)
    assert score(0, 0) == pytest.approx(float(q @ k), rel=1e-5)  # position 0 is the identity
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_rope_matches_llamas_rotate_half():
    """The rotation of halves is Llama's ``x * cos + cat(-x2, x1) * sin``."""
    rope = RotaryEmbedding(head_dim=16, theta=10000.0)
    positions = torch.arange(7)
    x = torch.randn(2, 7, 3, 16, generator=torch.Generator().manual_seed(5))
    freqs = torch.outer(positions.float(), rope.inv_freq)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    llama = x * cos[:, None] + torch.cat((-x[..., 8:], x[..., :8]), -1) * sin[:, None]
    cos_table, sin_table = rope(positions)
    torch.testing.assert_close(apply_rope(x, cos_table[:, None], sin_table[:, None]), llama)


# SwiGLU


def test_swiglu_gradients_are_exact():
    gen = torch.Generator().manual_seed(6)
    gate_up = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.autograd.gradcheck(swiglu, (gate_up,))
    torch.testing.assert_close(swiglu(gate_up), F.silu(gate) * up)
    with torch.no_grad():
        torch.testing.assert_close(swiglu(gate_up), F.silu(gate) * up)


def test_mlp_keeps_no_activation_it_can_recompute():
    """Saved for backward: the MLP's input, the fused gate/up projection and the down
    projection's input, not silu(gate) too (one (tokens, hidden) activation less per layer)."""
    cfg = ModelConfig(d_model=16, n_heads=2, mlp_hidden=24)
    torch.manual_seed(0)
    mlp, x = MLP(cfg), torch.randn(2, 5, 16, requires_grad=True)
    parameters = {p.data_ptr() for p in mlp.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in parameters:
            saved[t.data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mlp(x)
    tokens = 2 * 5
    assert sorted(saved.values()) == [tokens * 16, tokens * 24, tokens * 2 * 24]
    gate, up = F.linear(x, mlp.up.weight).chunk(2, dim=-1)
    torch.testing.assert_close(out, mlp.down(F.silu(gate) * up))


# RMSNorm


def test_rmsnorm_matches_torch_and_its_gradients_are_exact():
    gen = torch.Generator().manual_seed(7)
    norm = RMSNorm(8, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
    x = torch.randn(3, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 4, 8, generator=gen, dtype=torch.float64)
    out = norm(x)
    ours = torch.autograd.grad(out, (x, norm.weight), grad)
    expected = F.rms_norm(x, (8,), norm.weight, 1e-5)
    torch.testing.assert_close(out, expected)
    reference = torch.autograd.grad(expected, (x, norm.weight), grad)
    for got, want in zip(ours, reference, strict=True):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(norm, (x,))
    with torch.no_grad():  # inference takes ATen's fused forward
        torch.testing.assert_close(norm(x), expected)


@pytest.mark.slow
@pytest.mark.parametrize("with_documents", [False, True])
def test_compiled_loss_matches_eager_with_fragment_attention(monkeypatch, with_documents):
    """torch.compile of the training objective (what ``train.compile`` does on a CPU, a
    V100 or a T4, where attention is the tile loop) traces FragmentAttention, its tile plan
    built while tracing (a cold cache, as in a run's first step), and gives eager's loss
    and gradients."""
    monkeypatch.setattr(tiles, "_PLANS", {})
    cfg = ModelConfig(d_model=32, n_heads=4, n_layers=2, context_length=32, fragment_size=8)
    torch.manual_seed(0)
    model = Transformer(cfg, 64)
    idx, targets = torch.randint(0, 64, (2, 32)), torch.randint(0, 64, (2, 32))
    doc_ids = (torch.arange(32) // 12).expand(2, -1) if with_documents else None
    results = []
    for objective in (torch.compile(TokenLoss(model)), TokenLoss(model)):
        model.zero_grad()
        loss = objective(idx, targets, doc_ids=doc_ids)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (compiled, compiled_grads), (eager, eager_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
