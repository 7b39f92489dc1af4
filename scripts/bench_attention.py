"""Benchmark the attention backends: forward + backward time and peak memory.

Prints a markdown table (and the targets of issue 3 with their measured values).

Time is the median over ``--repeats`` runs of one forward + backward step
(output, ``backward(dout)``); the variants of one (dtype, T) are run round-robin,
so a load change on a shared machine hits them alike. Peak memory is the
largest amount of memory allocated during one such step beyond what existed
before it (inputs and upstream gradient excluded; outputs, saved tensors,
gradients and every temporary included). On CUDA it is
``torch.cuda.max_memory_allocated``; on CPU it is the running sum of the
allocation/free events that the profiler records in the CPU allocator
(``torch.profiler.profile(profile_memory=True)``), which also sees buffers that
ATen kernels allocate internally (e.g. SDPA's per-thread scratch space).

Example: python scripts/bench_attention.py --seq-lens 512 1024 2048 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fraglm.attention import attention
from fraglm.benchmarking import machine, peak_mib, sync

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# name -> (backend, documents packed, SDPA kernel forced)
VARIANTS: dict[str, tuple[str, bool, SDPBackend | None]] = {
    "naive": ("naive", False, None),
    "sdpa": ("sdpa", False, None),
    "sdpa-efficient": ("sdpa", False, SDPBackend.EFFICIENT_ATTENTION),
    "sdpa-flash": ("sdpa", False, SDPBackend.FLASH_ATTENTION),
    "sdpa-doc": ("sdpa", True, None),
    "fragment": ("fragment", False, None),
    "fragment-doc": ("fragment", True, None),
}
NAIVE_BYTES_PER_SCORE = 6.5  # measured peak of the naive backend: ~6 fp32 T x T tensors


@dataclass
class Result:
    seq_len: int
    variant: str
    dtype: str
    fragment: int | None
    ms: float | None = None
    peak_mib: float | None = None
    note: str = ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--backends", nargs="+", choices=list(VARIANTS), default=None,
                   help="default: naive sdpa fragment fragment-doc sdpa-doc, "
                        "plus sdpa-efficient sdpa-flash on CUDA")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                   help="default: fp32 on CPU, fp32 fp16 on CUDA")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--fragment-sizes", type=int, nargs="+", default=[128])
    p.add_argument("--docs", type=int, default=8, help="documents packed in the -doc variants")
    p.add_argument("--naive-limit-gib", type=float, default=16.0,
                   help="skip naive where its estimated peak memory exceeds this")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.backends is None:
        args.backends = ["naive", "sdpa", "fragment", "fragment-doc", "sdpa-doc"]
        if cuda:
            args.backends[2:2] = ["sdpa-efficient", "sdpa-flash"]
    if args.dtypes is None:
        args.dtypes = ["fp32", "fp16"] if cuda else ["fp32"]
    return args


def load_average() -> str:
    """Other processes on the machine skew timings; the load average tells (Unix only)."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def make_step(
    variant: str, fragment: int | None, args: argparse.Namespace, dtype: torch.dtype, n: int
) -> Callable[[], None]:
    backend, packed, kernel = VARIANTS[variant]
    device = torch.device(args.device)
    gen = torch.Generator(device).manual_seed(0)
    kv_heads = args.kv_heads or args.heads

    def randn(heads: int, grad: bool) -> torch.Tensor:
        shape = (args.batch, heads, n, args.head_dim)
        x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        return x.requires_grad_(grad)

    q, k, v = randn(args.heads, True), randn(kv_heads, True), randn(kv_heads, True)
    dout = randn(args.heads, False)
    docs = None
    if packed:
        docs = (torch.arange(n, device=device) * args.docs // n).expand(args.batch, n)
    options = {"backend": backend, "doc_ids": docs}
    if fragment is not None:
        options["fragment_size"] = fragment

    def step() -> None:
        with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
            attention(q, k, v, **options).backward(dout)
        q.grad = k.grad = v.grad = None

    return step


def variants_for(args: argparse.Namespace, n: int) -> Iterator[tuple[str, int | None, str]]:
    """(variant, fragment size, reason to skip or '') for one sequence length."""
    for variant in args.backends:
        if VARIANTS[variant][0] != "fragment":
            naive_gib = NAIVE_BYTES_PER_SCORE * args.batch * args.heads * n * n * 4 / 2**30
            too_big = variant == "naive" and naive_gib > args.naive_limit_gib
            yield variant, None, f"skipped: needs ~{naive_gib:.0f} GiB" if too_big else ""
        else:
            for size in args.fragment_sizes:
                yield variant, size, ""


def bench_length(args: argparse.Namespace, dtype_name: str, n: int) -> list[Result]:
    device = torch.device(args.device)
    dtype = DTYPES[dtype_name]
    results, steps = [], []
    for variant, fragment, skip in variants_for(args, n):
        result = Result(n, variant, dtype_name, fragment, note=skip)
        results.append(result)
        if skip:
            continue
        step = make_step(variant, fragment, args, dtype, n)
        try:  # also finds kernels that do not support this case
            if device.type == "cuda":
                step()  # warm-up: cuBLAS handles and workspaces are not the step's memory
            result.peak_mib = peak_mib(step, device)  # on CPU this run is the warm-up
        except RuntimeError as err:
            result.note = f"n/a: {str(err).splitlines()[0][:60]}"
            continue
        steps.append((result, step, []))
    for _ in range(args.repeats):
        for _, step, times in steps:
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - start)
    for result, _, times in steps:
        result.ms = 1000 * statistics.median(times)
    return results


def find(results: list[Result], variant: str, n: int, dtype: str) -> Result | None:
    return next(
        (r for r in results if (r.variant, r.seq_len, r.dtype) == (variant, n, dtype) and r.ms),
        None,
    )


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else ""


def table(results: list[Result]) -> str:
    lines = [
        "| T | backend | dtype | F | fwd+bwd ms | peak MiB | time / sdpa | memory / sdpa |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        base = find(
            results, "sdpa-doc" if r.variant.endswith("-doc") else "sdpa", r.seq_len, r.dtype
        )
        ms = f"{r.ms:.1f}" if r.ms is not None else r.note
        mib = f"{r.peak_mib:.1f}" if r.peak_mib is not None else ""
        lines.append(
            f"| {r.seq_len} | {r.variant} | {r.dtype} | {r.fragment or ''} | {ms} | {mib} "
            f"| {ratio(r.ms, base and base.ms)} | {ratio(r.peak_mib, base and base.peak_mib)} |"
        )
    return "\n".join(lines)


def targets(results: list[Result]) -> list[str]:
    """Issue 3's targets, each with its measured value (for the fragment rows present)."""
    lines = []
    for r in (r for r in results if r.variant == "fragment" and r.ms is not None):
        sdpa = find(results, "sdpa", r.seq_len, r.dtype)
        naive = find(results, "naive", r.seq_len, r.dtype)
        doc = next(
            (d for d in results
             if (d.variant, d.seq_len, d.dtype, d.fragment)
             == ("fragment-doc", r.seq_len, r.dtype, r.fragment) and d.ms),
            None,
        )  # fmt: skip
        tag = f"T={r.seq_len} {r.dtype} F={r.fragment}"
        if sdpa and r.seq_len >= 2048:
            lines.append(check(f"{tag}: time / sdpa", r.ms / sdpa.ms, "<=", 1.5))
        if sdpa and r.seq_len == 8192:
            lines.append(check(f"{tag}: memory / sdpa", r.peak_mib / sdpa.peak_mib, "<=", 1.1))
        if naive and r.seq_len == 8192:
            lines.append(check(f"{tag}: memory / naive", r.peak_mib / naive.peak_mib, "<", 0.02))
        if doc and r.seq_len == 4096:
            lines.append(check(f"{tag}: time fragment-doc / fragment", doc.ms / r.ms, "<=", 0.3))
    return lines


def check(what: str, value: float, op: str, limit: float) -> str:
    ok = value <= limit if op == "<=" else value < limit
    return f"- {what} = {value:.3f} (target {op} {limit}): {'met' if ok else 'NOT met'}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kv = f", Hkv={args.kv_heads}" if args.kv_heads else ""
    load_start = load_average()
    print(f"Machine: {machine(device)}")
    print(
        f"Shape: B={args.batch}, H={args.heads}{kv}, D={args.head_dim}, causal; -doc variants "
        f"pack {args.docs} equal documents; median of {args.repeats} runs\n"
    )
    results = []
    for dtype_name in args.dtypes:
        for n in args.seq_lens:
            results += bench_length(args, dtype_name, n)
            print(f"done T={n} {dtype_name}", file=sys.stderr, flush=True)
    print(table(results))
    print(f"\nLoad average (1, 5, 15 min) at start {load_start}, at end {load_average()}")
    lines = targets(results)
    if lines:
        print("\nTargets:\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
