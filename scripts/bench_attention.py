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

Variants: ``fragment`` takes the implementation ``impl="auto"`` picks (the Triton kernels
where the compile check proves them, see ``triton_op.PROVEN``; the tile loop elsewhere);
``fragment-triton`` and ``fragment-torch`` force one. ``-doc`` variants pack ``--docs``
equal documents; ``flex-doc`` is FlexAttention (compiled) with the same causal document mask as a
``BlockMask``, the peer of FragmentStream's document tile skipping.

Example: python scripts/bench_attention.py --seq-lens 512 1024 2048 --repeats 3
         python scripts/bench_attention.py --device cuda --dtypes bf16 --head-dim 64 \
             --backends sdpa-flash fragment-triton fragment-triton-doc flex-doc
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
from benchmarking import machine, peak_mib, sync
from torch.nn.attention import SDPBackend, sdpa_kernel

from fraglm.attention import attention
from fraglm.errors import FraglmError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# name -> (backend, documents packed, SDPA kernel forced, fragment impl)
VARIANTS: dict[str, tuple[str, bool, SDPBackend | None, str]] = {
    "naive": ("naive", False, None, "auto"),
    "sdpa": ("sdpa", False, None, "auto"),
    "sdpa-efficient": ("sdpa", False, SDPBackend.EFFICIENT_ATTENTION, "auto"),
    "sdpa-flash": ("sdpa", False, SDPBackend.FLASH_ATTENTION, "auto"),
    "sdpa-doc": ("sdpa", True, None, "auto"),
    "flex-doc": ("flex", True, None, "auto"),
    "fragment": ("fragment", False, None, "auto"),
    "fragment-doc": ("fragment", True, None, "auto"),
    "fragment-triton": ("fragment", False, None, "triton"),
    "fragment-triton-doc": ("fragment", True, None, "triton"),
    "fragment-torch": ("fragment", False, None, "torch"),
    "fragment-torch-doc": ("fragment", True, None, "torch"),
}
NAIVE_BYTES_PER_SCORE = 6.5  # measured peak of the naive backend: ~6 fp32 T x T tensors


@dataclass
class Result:
    seq_len: int
    variant: str
    dtype: str
    fragment: int | None
    head_dim: int = 0
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
    backend, packed, kernel, impl = VARIANTS[variant]
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
        options.update(fragment_size=fragment, impl=impl)
    attend = flex_document_attention(docs, q, k) if backend == "flex" else attention

    def step() -> None:
        with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
            attend(q, k, v, **options).backward(dout)
        q.grad = k.grad = v.grad = None

    return step


def flex_document_attention(
    docs: torch.Tensor, q: torch.Tensor, k: torch.Tensor
) -> Callable[..., torch.Tensor]:
    """Compiled FlexAttention with a causal document ``BlockMask`` built once (as a
    training loop would per batch), same arguments as :func:`attention`."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    n = q.shape[2]
    mask = create_block_mask(mask_mod, q.shape[0], None, n, n, device=q.device)
    flex = torch.compile(flex_attention, dynamic=False)
    gqa = q.shape[1] != k.shape[1]

    def attend(q, k, v, **_options) -> torch.Tensor:
        return flex(q, k, v, block_mask=mask, enable_gqa=gqa)

    return attend


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
        result = Result(n, variant, dtype_name, fragment, args.head_dim, note=skip)
        results.append(result)
        if skip:
            continue
        step = make_step(variant, fragment, args, dtype, n)
        try:  # also finds kernels that do not support this case
            if device.type == "cuda":
                step()  # warm-up: cuBLAS handles and workspaces are not the step's memory
            result.peak_mib = peak_mib(step, device)  # on CPU this run is the warm-up
        except (RuntimeError, FraglmError) as err:  # also torch.compile's errors (flex)
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


TABLE_HEADER = (
    "| T | backend | dtype | F | fwd+bwd ms | peak MiB | time / sdpa | memory / sdpa |\n"
    "|---:|---|---|---:|---:|---:|---:|---:|"
)


def table_rows(results: list[Result]) -> str:
    """Rows of the results of one sequence length; ratios against ``sdpa`` (or
    ``sdpa-flash`` where it did not run), ``-doc`` variants against ``sdpa-doc``."""
    lines = []
    for r in results:
        base = find(results, "sdpa", r.seq_len, r.dtype) or find(
            results, "sdpa-flash", r.seq_len, r.dtype
        )
        if r.variant.endswith("-doc"):
            base = find(results, "sdpa-doc", r.seq_len, r.dtype)
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


def gpu_targets(results: list[Result]) -> list[str]:
    """Issue 12's targets for the Triton kernels, against SDPA's flash kernel and
    FlexAttention (rows present only on CUDA)."""
    lines = []
    for r in (r for r in results if r.variant == "fragment-triton" and r.ms is not None):
        flash = find(results, "sdpa-flash", r.seq_len, r.dtype)
        tag = f"T={r.seq_len} {r.dtype} F={r.fragment}"
        if flash and r.seq_len >= 2048 and r.dtype == "bf16":
            limit = 1.2 if r.head_dim == 64 else 1.5
            lines.append(check(f"{tag} D={r.head_dim}: time / sdpa-flash", r.ms / flash.ms,
                               "<=", limit))  # fmt: skip
    for r in (r for r in results if r.variant == "fragment-triton-doc" and r.ms is not None):
        if r.seq_len != 8192:
            continue
        tag = f"T={r.seq_len} {r.dtype} D={r.head_dim} F={r.fragment}"
        flash = find(results, "sdpa-flash", r.seq_len, r.dtype)
        flex = find(results, "flex-doc", r.seq_len, r.dtype)
        if flash:
            lines.append(check(f"{tag}: doc time / sdpa-flash causal", r.ms / flash.ms, "<=", 0.3))
        if flex:
            lines.append(check(f"{tag}: doc time / flex-doc", r.ms / flex.ms, "<", 1.0))
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
    print(TABLE_HEADER, flush=True)
    results = []
    for dtype_name in args.dtypes:
        for n in args.seq_lens:
            length_results = bench_length(args, dtype_name, n)
            results += length_results
            # each length's rows as soon as they are measured: a run stopped by a time
            # limit keeps what it measured
            print(table_rows(length_results), flush=True)
    print(f"\nLoad average (1, 5, 15 min) at start {load_start}, at end {load_average()}")
    lines = targets(results) + gpu_targets(results)
    if lines:
        print("\nTargets:\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
