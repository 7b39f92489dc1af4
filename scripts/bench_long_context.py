"""How long a sequence can the p100-shaped model train on with fragment vs naive attention?

Runs one training step (forward, cross-entropy, backward) of the p100 model (8 layers,
width 128, 8 heads, vocab 8000) at batch 1 for several sequence lengths, measures the
peak memory of the step, fits memory = a + b*T (fragment) and a + b*T + c*T^2 (naive) and
solves for the longest T that fits in ``--budget-gib``. Then, unless ``--no-verify``,
trains one step at the predicted fragment length to show that it really fits::

    python scripts/bench_long_context.py --lengths 2048 4096 8192 --budget-gib 20
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from benchmarking import machine, peak_mib

from fraglm.config import ModelConfig
from fraglm.nn.model import Transformer

VOCAB = 8000


def step_fn(backend: str, length: int) -> tuple[torch.nn.Module, Callable[[], None]]:
    cfg = ModelConfig(context_length=length, attention=backend, fragment_size=128)
    model = Transformer(cfg, VOCAB)
    idx = torch.randint(0, VOCAB, (1, length + 1))

    def step() -> None:
        logits = model(idx[:, :-1])
        F.cross_entropy(logits.view(-1, VOCAB), idx[:, 1:].reshape(-1)).backward()
        model.zero_grad(set_to_none=True)

    return model, step


def measure(backend: str, length: int) -> tuple[float, float]:
    _, step = step_fn(backend, length)
    start = time.perf_counter()
    memory = peak_mib(step, torch.device("cpu"))
    return memory, time.perf_counter() - start


def longest(lengths: list[int], memories: list[float], degree: int, budget_mib: float) -> int:
    coeffs = np.polyfit(lengths, memories, degree)
    roots = np.roots(coeffs - np.array([0] * degree + [budget_mib]))
    return int(max(r.real for r in roots if abs(r.imag) < 1e-6 and r.real > 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--naive-lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--budget-gib", type=float, default=20.0, help="memory for the step")
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args()
    budget = args.budget_gib * 1024
    print(f"# one training step, p100 model shape, batch 1; {machine(torch.device('cpu'))}\n")
    print("| attention | T | peak step memory (MiB) | step time (s) |")
    print("|---|---|---|---|")
    fits = {}
    for backend, lengths, degree in (
        ("fragment", args.lengths, 1),
        ("naive", args.naive_lengths, 2),
    ):
        memories = []
        for length in lengths:
            memory, seconds = measure(backend, length)
            memories.append(memory)
            print(f"| {backend} | {length} | {memory:,.0f} | {seconds:.1f} |", flush=True)
        fits[backend] = longest(lengths, memories, degree, budget)
    print()
    for backend, length in fits.items():
        print(f"- {backend}: longest T within {args.budget_gib:g} GiB = {length:,} (fitted)")
    if not args.no_verify:
        length = 2 ** int(math.log2(fits["fragment"]))
        memory, seconds = measure("fragment", length)
        print(f"- verified: fragment trains one step at T = {length:,}: "
              f"{memory / 1024:.1f} GiB, {seconds / 60:.1f} min")  # fmt: skip


if __name__ == "__main__":
    main()
