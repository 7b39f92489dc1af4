"""A p100-shaped CPU training step: fraglm's hand-written autograd Functions and fused
loss (as of commit fbe7477) against plain autograd, one at a time.

Runs against the tree of commit fbe7477, the last with the Functions:

    git archive fbe7477 | tar -x -C /tmp/fbe7477
    PYTHONPATH=/tmp/fbe7477:scripts python scripts/bench_autograd_functions.py

Variants, each a set of patches over that model (p100.yaml's shape, QK-norm on):

- ``functions`` (baseline): ``_RotaryHeads``, ``_SwiGLU``, ``_RMSNormFunction`` and the
  fused head + cross-entropy (``linear_cross_entropy_sum``, reads ``head.weight``);
- ``head as module``: the loss through ``head`` called as a module, chunk by chunk, each
  chunk under ``torch.utils.checkpoint`` (what fraglm.nn.loss does since);
- ``head as module, grads in forward``: ``head`` as a module per chunk, its gradients
  (``torch.autograd.grad``) taken in the forward pass of an autograd Function;
- ``plain rope``: q, k, v split from the projection, QK-norm on q and k, RoPE by
  chunk/cat under autograd (no ``torch.cat`` of the normed heads, no Function);
- ``plain swiglu``: ``F.silu(gate) * up``; ``plain rmsnorm``: ``F.rms_norm``;
- ``all plain``: the four together;
- ``head as module + plain rope``: what this change ships (the SwiGLU and RMSNorm
  Functions kept).

Rounds run every variant in turn (one untimed step, then one timed), so load from other
users of a shared machine hits all alike; reported: median step time, its ratio to the
baseline's in the same round (median), and the step's peak memory beyond the resident
memory (profiler record of the CPU allocator, one untimed step).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from benchmarking import machine, peak_mib
from torch.utils.checkpoint import checkpoint

import fraglm.nn.model as M
from fraglm.config import TrainConfig, load_config
from fraglm.training.allocator import keep_freed_memory
from fraglm.training.trainer import build_optimizer

ROOT = Path(__file__).resolve().parents[1]

VOCAB = 8000
CHUNK_ELEMENTS = 1 << 22
Patches = dict[tuple[object, str], object]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def plain_project(self, x, rope_tables):
    b, t, _ = x.shape
    sizes = (self.n_heads, self.n_kv_heads, self.n_kv_heads)
    q, k, v = self.qkv(x).view(b, t, sum(sizes), self.head_dim).split(sizes, dim=2)
    if self.qk_norm is not None:
        q, k = self.qk_norm(q), self.qk_norm(k)
    if rope_tables is not None:
        cos, sin = rope_tables[0][:, None], rope_tables[1][:, None]
        q, k = rope(q, cos, sin), rope(k, cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def plain_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def plain_rmsnorm(self, x):
    return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def _chunk_loss(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=-100, reduction="sum")


def head_module_loss(model):
    def loss(hidden, weight, bias, targets):
        chunk = max(1, CHUNK_ELEMENTS // VOCAB)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            total = total + checkpoint(
                _chunk_loss, model.head, hidden[rows], targets[rows], use_reentrant=False
            )
        return total

    return loss


def shipped_loss_module() -> ModuleType:
    """This tree's ``fraglm/nn/loss.py``, loaded beside the fbe7477 package the script runs
    against (it imports nothing of fraglm's at run time)."""
    spec = importlib.util.spec_from_file_location("shipped_loss", ROOT / "fraglm/nn/loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def head_grad_in_forward_loss(model):
    shipped = shipped_loss_module()

    def loss(hidden, weight, bias, targets):
        chunk = max(1, CHUNK_ELEMENTS // VOCAB)
        return shipped.chunked_cross_entropy_sum(model.head, hidden, targets, chunk_rows=chunk)

    return loss


def variants(model) -> dict[str, Patches]:
    loss = {(M, "linear_cross_entropy_sum"): head_module_loss(model)}
    grad_in_forward = {(M, "linear_cross_entropy_sum"): head_grad_in_forward_loss(model)}
    rope_ = {(M.Attention, "project"): plain_project}
    swiglu = {(M, "swiglu"): plain_swiglu}
    norm = {(M.RMSNorm, "forward"): plain_rmsnorm}
    return {
        "functions": {},
        "head as module": loss,
        "head as module, grads in forward": grad_in_forward,
        "plain rope": rope_,
        "plain swiglu": swiglu,
        "plain rmsnorm": norm,
        "all plain": loss | rope_ | swiglu | norm,
        "head as module + plain rope": loss | rope_,
    }


@contextlib.contextmanager
def patched(patches: Patches) -> Iterator[None]:
    saved = {key: getattr(*key) for key in patches}
    for (owner, name), value in patches.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32, help="p100.yaml's batch")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=None, help="default: all")
    args = p.parse_args()
    keep_freed_memory()
    cfg = load_config("configs/p100.yaml").model
    torch.manual_seed(0)
    model = M.Transformer(cfg, VOCAB)
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, VOCAB, (args.batch_size, cfg.context_length + 1), generator=gen)

    def step() -> None:
        loss = model(batch[:, :-1], targets=batch[:, 1:]) / batch[:, 1:].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    named = variants(model)
    named = {name: named[name] for name in args.variants or named}
    times: dict[str, list[float]] = {name: [] for name in named}
    peaks: dict[str, float] = {}
    for name, patches in named.items():
        with patched(patches):
            step()
            peaks[name] = peak_mib(step, torch.device("cpu"))
    for _ in range(args.rounds):
        for name, patches in named.items():
            with patched(patches):
                step()
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    print(f"Machine: {machine(torch.device('cpu'))}")
    print(f"p100.yaml shape, batch {args.batch_size}, fp32, AdamW; {args.rounds} rounds\n")
    print("| variant | ms/step (median) | vs functions (median ratio) | step peak MiB |")
    print("|---|---:|---:|---:|")
    base = times["functions"]
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base, strict=True))
        print(
            f"| {name} | {1000 * statistics.median(ts):,.0f} | {ratio:.3f} | {peaks[name]:,.0f} |"
        )
    print("\nstep times (ms) per round:")
    for name, ts in times.items():
        print(f"- {name}: {', '.join(f'{1000 * t:,.0f}' for t in ts)}")


if __name__ == "__main__":
    main()
