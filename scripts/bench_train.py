"""Benchmark a full training step of the p100 model shape: fraglm vs Hugging Face Llama.

One step is forward, cross-entropy, backward and an AdamW step, on random
token windows of the p100 shape (8 layers, width 128, 8 heads, context 512, vocabulary
8000). The model section comes from ``--config``: by default the config that trains this
shape on the device benchmarked, ``p100.yaml`` on a GPU and ``medquad-cpu.yaml`` on a
CPU, which differ only in the fragment size (128 and 64; 64 measured faster on a CPU,
docs/benchmarks.md). Compared models:

- fraglm's modern ``Transformer`` with the attention backends in ``--backends``, its loss
  the trainer's (:class:`fraglm.nn.loss.TokenLoss`: the head a chunk at a time), its products
  through torch's own matmuls, as the transformers model's; QK-norm off, so that it
  computes what Llama computes;
- when the config trains with QK-norm (p100.yaml's recipe), one more fraglm row with it,
  in the config's attention backend: what a run of that config pays for it;
- ``transformers``' ``LlamaForCausalLM`` of the same shape and batch: same hidden size,
  layers and heads, ``intermediate_size`` = fraglm's MLP width, tied embeddings,
  ``attn_implementation="sdpa"`` (skipped with a note when transformers is missing), its
  loss as ``F.cross_entropy`` of its logits in fp32.

Both get the same tokens and the trainer's optimizer (fused AdamW, weight decay on
matrices only). The variants run round-robin, so a load change on a shared machine hits
all alike: in each round every variant runs two steps and the second is timed. A step
straight after another model's would pay for that model's memory traffic (on CPU, the
allocator returns the large blocks that the transformers model frees to the OS, and the
next step faults them back in); the second step starts from the state its own training
loop leaves. On CPU the process keeps freed memory for reuse as the ``fraglm train``
command does (:mod:`fraglm.training.allocator`), for every model alike.

Reported per variant:

- tokens/s: batch * context / step time, median over ``--steps`` steps after
  ``--warmup`` steps;
- tokens/s vs HF: the median over rounds of the two step times' ratio in one round;
- resident MiB: weights + AdamW state (what lives between steps);
- step peak MiB: the most memory allocated during one step beyond the resident memory
  (activations saved for backward, gradients, temporaries). On CUDA from
  ``torch.cuda.max_memory_allocated``; on CPU the running sum of the allocation and free
  events that the profiler records in the CPU allocator
  (``torch.profiler.profile(profile_memory=True)``), which also sees buffers that ATen
  kernels allocate internally; the profiled step is not one of the timed steps;
- MFU: achieved FLOP/s / the device's measured matmul peak. Peak = best of several large
  square matmuls in the compute dtype (fp32 on CPU). FLOPs per token follow PaLM
  (Chowdhery et al. 2022, appendix B):
  ``6 * N + 12 * L * T * d`` with N = non-embedding parameters + ``d * V`` (the output
  projection is a matmul every token even though its weight is the tied embedding),
  L layers, T context, d width; the attention term counts the full T x T score matrix,
  as is customary, though causal kernels skip half of it.

Example: python scripts/bench_train.py                        (CPU: batch 8, fp32)
         python scripts/bench_train.py --device cuda         (batch 32, bf16 on sm_80+)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from benchmarking import machine, peak_mib, sync
from torch import nn

from fraglm.config import TrainConfig, load_config
from fraglm.device import Precision, plan_device, resolve_device
from fraglm.errors import FraglmError
from fraglm.export.hf import llama_config
from fraglm.nn.loss import TokenLoss
from fraglm.nn.model import Transformer
from fraglm.training.allocator import keep_freed_memory
from fraglm.training.optim import build_optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB = 8000


@dataclass
class Variant:
    name: str
    attention: str
    model: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs, targets) -> mean
    times: list[float]
    resident_mib: float = 0.0
    peak_mib: float = 0.0

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    def speedup_over(self, other: Variant) -> float:
        """Median over rounds of other's step time / this one's in the same round.

        Steps of one round run back to back, so a slow spell of a shared machine mostly
        slows both; the per-round ratio cancels it where a ratio of medians would not.
        """
        return statistics.median(o / t for o, t in zip(other.times, self.times, strict=True))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 32 on CUDA")
    p.add_argument("--backends", nargs="+", default=["sdpa", "fragment"],
                   choices=["sdpa", "fragment", "naive"])  # fmt: skip
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: bf16 autocast on CUDA sm_80+, fp16 below, fp32 on CPU")  # fmt: skip
    p.add_argument("--no-hf", action="store_true", help="skip the transformers model")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config whose model section is benchmarked (default: "
        "configs/medquad-cpu.yaml on a CPU, configs/p100.yaml elsewhere)",
    )
    p.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE",
                   help="override the config, as `fraglm train --set` does")  # fmt: skip
    return p.parse_args(argv)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of a large square matmul on ``device`` in ``dtype``."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(10 if device.type == "cuda" else 5):
        sync(device)
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def flops_per_token(n_layers: int, d_model: int, context: int, n_matmul: int) -> float:
    return 6 * n_matmul + 12 * n_layers * context * d_model


def hf_llama(cfg, device: torch.device) -> nn.Module | None:
    """LlamaForCausalLM of fraglm's shape, or None when transformers is not installed."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    config = LlamaConfig(**llama_config(cfg, VOCAB), attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device)


def train_step(
    variant: Variant,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: torch.Tensor,
    precision: Precision,
) -> None:
    inputs, targets = batch[:, :-1], batch[:, 1:]
    with precision.context(batch.device):
        loss = variant.loss(inputs, targets)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def resident_mib(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    tensors = {p.data_ptr(): p for p in model.parameters()}
    for state in optimizer.state.values():
        tensors.update({t.data_ptr(): t for t in state.values() if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def build_variants(args: argparse.Namespace, cfg, device: torch.device) -> list[Variant]:
    variants = []
    rows = [("fraglm", replace(cfg, attention=backend, qk_norm=False)) for backend in args.backends]
    if cfg.qk_norm:
        rows.append(("fraglm + QK-norm (config's recipe)", cfg))
    for name, model_cfg in rows:
        torch.manual_seed(0)
        model = Transformer(model_cfg, VOCAB).to(device)
        loss = TokenLoss(model)
        # the trainer's own path: fraglm.nn.loss's TokenLoss
        variants.append(
            Variant(
                name,
                model_cfg.attention,
                model,
                lambda x, y, loss=loss: loss(x, y) / y.numel(),
                [],
            )
        )
    if not args.no_hf:
        torch.manual_seed(0)
        llama = hf_llama(cfg, device)
        if llama is None:
            print("note: transformers is not installed; the Llama comparison is skipped\n")
        else:
            import transformers

            variants.append(
                Variant(
                    f"HF Llama (transformers {transformers.__version__})",
                    "sdpa",
                    llama,
                    lambda x, y, m=llama: F.cross_entropy(
                        m(input_ids=x, use_cache=False).logits.float().flatten(0, 1), y.flatten()
                    ),
                    [],
                )
            )
    return variants


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as `fraglm train` does; process-wide, so for every model here
    batch_size = args.batch_size or (32 if device.type == "cuda" else 8)
    # the config that trains the p100 shape on this kind of device
    config = args.config or CONFIGS / ("medquad-cpu.yaml" if device.type == "cpu" else "p100.yaml")
    try:
        cfg = load_config(config, args.set).model
    except FraglmError as err:
        raise SystemExit(f"error: {err}") from None
    train_cfg = TrainConfig(precision=args.precision)
    plan = plan_device(device, train_cfg, cfg)
    precision = plan.precision
    context = cfg.context_length

    variants = build_variants(args, cfg, device)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, VOCAB, (batch_size, context + 1), generator=gen).to(device)
    runs = []
    for variant in variants:
        optimizer = build_optimizer(variant.model, train_cfg, plan.muon_dtype)
        scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
        step = functools.partial(train_step, variant, optimizer, scaler, batch, precision)
        for _ in range(args.warmup):
            step()
        variant.resident_mib = resident_mib(variant.model, optimizer)
        variant.peak_mib = peak_mib(step, device)
        runs.append((variant, step))
    for _ in range(args.steps):
        for variant, step in runs:
            step()  # untimed: the timed step starts from this model's own memory state
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            variant.times.append(time.perf_counter() - start)

    compute_dtype = precision.dtype if precision.autocast else torch.float32
    peak = matmul_peak(device, compute_dtype)
    embedding = VOCAB * cfg.d_model
    non_embedding = sum(p.numel() for p in variants[0].model.parameters()) - embedding
    # the input embedding is a lookup, but the tied output projection is a d x V matmul
    fpt = flops_per_token(cfg.n_layers, cfg.d_model, context, non_embedding + embedding)
    tokens = batch_size * context

    print(f"Machine: {machine(device)}; precision {precision.name}")
    print(
        f"Config: {config.name}; shape: {cfg.n_layers} layers, d={cfg.d_model}, "
        f"{cfg.n_heads} heads, T={context}, fragment {cfg.fragment_size}, V={VOCAB}, "
        f"batch {batch_size}; median of {args.steps} rounds (the second of two "
        f"steps per model timed) after {args.warmup} warm-up steps"
    )
    print(
        f"Matmul peak ({str(compute_dtype).removeprefix('torch.')}): {peak / 1e9:,.1f} GFLOP/s; "
        f"{fpt / 1e6:.1f} MFLOP per token\n"
    )
    hf = next((v for v in variants if v.name.startswith("HF")), None)
    print(
        "| model | attention | params | tokens/s | ms/step | resident MiB | step peak MiB "
        "| MFU | tokens/s vs HF |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        rate = tokens / v.seconds
        params = sum(p.numel() for p in v.model.parameters())
        versus = f"{v.speedup_over(hf):.2f}x" if hf is not None else ""
        print(
            f"| {v.name} | {v.attention} | {params:,} | {rate:,.0f} | {1000 * v.seconds:,.0f} "
            f"| {v.resident_mib:.1f} | {v.peak_mib:,.0f} | {100 * rate * fpt / peak:.1f}% "
            f"| {versus} |"
        )
    if hf is not None:
        print()
        for v in variants:
            if v.name == "fraglm":
                ratio = v.speedup_over(hf)
                verdict = "met" if ratio >= 1.3 else "NOT met"
                print(
                    f"fraglm ({v.attention}) / HF Llama tokens/s = {ratio:.2f} "
                    f"(target >= 1.3: {verdict})"
                )


if __name__ == "__main__":
    main()
