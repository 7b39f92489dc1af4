"""CUDA-only checks (``pytest -m cuda``; skipped without a GPU): mixed-precision training,
resume, torch.compile with the Triton op, SDPA's fused kernels, no host syncs.

``tests/attention/test_triton.py`` runs the Triton kernels against the fp64 reference on the GPU
where there is one. ``scripts/gpu_check.sh`` runs both files first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from attention.test_attention import CASES, make_inputs, rel_err, run
from torch.nn.attention import SDPBackend, sdpa_kernel
from training.test_trainer import latest_weights, make_config, train_losses

from fraglm.attention import fragment_attention, naive_attention, sdpa_attention
from fraglm.attention.triton_op import resolve_impl
from fraglm.config import ModelConfig
from fraglm.data.shards import tokenize
from fraglm.nn.model import Transformer
from fraglm.training.trainer import Trainer

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
# the corpus that ships with the repository, so that a bare GPU machine runs these too
SAMPLE = f"data.path={Path(__file__).resolve().parents[1] / 'data' / 'sample_health_qa.jsonl'}"


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "tokenized"
    tokenize(make_config(out, out.parent / "unused", SAMPLE), progress=False)
    return out


def _bf16_ok() -> bool:
    """bf16 by capability: ``torch.cuda.is_bf16_supported()`` counts emulation (pre-8.0)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def cuda_inputs(name: str, dtype: torch.dtype):
    return tuple(None if t is None else t.to(CUDA) for t in make_inputs(CASES[name], dtype))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_steps(tokenized, tmp_path, precision):
    """bf16 autocast, and fp16 autocast + GradScaler (the P100's path), with documents."""
    if precision == "bf16" and not _bf16_ok():
        pytest.skip("this GPU has no bf16")
    overrides = (SAMPLE, "train.device=cuda", f"train.precision={precision}", "train.doc_mask=true")
    trainer = Trainer(make_config(tokenized, tmp_path / "run", *overrides))
    trainer.run()
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert trainer.scaler.is_enabled() == (precision == "fp16")


def test_resume_on_cuda(tokenized, tmp_path):
    """4 steps + resume for 4 == 8 in one go (to float tolerance: CUDA's embedding
    backward adds with atomics, so bits may differ)."""
    overrides = (SAMPLE, "train.device=cuda", "train.doc_mask=true")
    whole, split = tmp_path / "whole", tmp_path / "split"
    Trainer(make_config(tokenized, whole, *overrides)).run()
    Trainer(make_config(tokenized, split, *overrides)).run(max_new_steps=4)
    Trainer(make_config(tokenized, split, *overrides), resume=True).run()
    torch.testing.assert_close(train_losses(split), train_losses(whole), rtol=1e-4, atol=1e-4)
    a, b = latest_weights(whole), latest_weights(split)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)


def test_compiled_model_captures_the_triton_op():
    """torch.compile of the model in one graph, the Triton custom op inside, = eager."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layers=2, d_model=64, n_heads=4, context_length=256, fragment_size=64,
        fragment_impl="triton",
    )  # fmt: skip
    model = Transformer(cfg, 100).to(CUDA)
    idx = torch.randint(0, 100, (2, 256), device=CUDA)
    docs = torch.arange(256, device=CUDA).div(40, rounding_mode="floor").expand(2, -1)
    bf16_head = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16, device=CUDA)
    assert resolve_impl("auto", bf16_head) == ("triton" if _bf16_ok() else "torch")
    compiled = torch.compile(model, fullgraph=True)
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        fn(idx, doc_ids=docs).float().square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for eager, comp in zip(*grads, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_no_host_sync_with_documents(impl):
    """Forward and backward with document ids never make the host wait (both paths)."""
    q, k, v, dout, docs = cuda_inputs("documents, GQA, Tq < Tk", torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fragment_attention(q, k, v, doc_ids=docs, fragment_size=16, impl=impl).backward(dout)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fragment_attention(q, k, v, doc_ids=docs, fragment_size=16, impl=impl)
        out.backward(dout)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    ("kernel", "name"),
    [
        (SDPBackend.FLASH_ATTENTION, "T not a multiple of F"),
        (SDPBackend.FLASH_ATTENTION, "not causal"),
        (SDPBackend.EFFICIENT_ATTENTION, "T not a multiple of F"),
        (SDPBackend.EFFICIENT_ATTENTION, "documents, GQA, Tq < Tk"),
    ],
)
def test_sdpa_fused_kernels(kernel, name):
    """The sdpa backend's flash and memory-efficient kernels agree with the reference."""
    case = CASES[name]
    q, k, v, dout, docs = cuda_inputs(name, torch.float32)
    half = [t.half() for t in (q, k, v, dout)]
    kw = {"causal": case.causal, "doc_ids": docs}
    with sdpa_kernel(kernel):
        got = run(sdpa_attention, *half, **kw)
    want = run(naive_attention, q, k, v, dout, **kw)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 2e-2
