"""Compile every Triton kernel configuration fraglm can launch, ahead of time, no GPU needed.

    python scripts/compile_check.py [--capability 8.0 ...] [--compact] [--workers N]

Prints a markdown table, a row per compile as it finishes (kernel, capability, dtype,
BLOCK_D, documents, tiles/warps/stages, registers, spills, shared memory against the
per-block limit, tensor cores, cp.async copies, verdict; with ``--compact`` one row per
kernel, capability, dtype and BLOCK_D, at the end) and a summary line; see
:mod:`fraglm.attention.compile_check`. Exits 1 when a configuration that
``triton_proven`` covers fails: it does not compile, exceeds shared memory, or runs its
products without tensor cores. Spills are reported, not fatal.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from fraglm.attention import compile_check


def _capability(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    cap = (int(major), int(minor or 0))
    if cap not in compile_check.CAPABILITIES:
        raise argparse.ArgumentTypeError(f"choose from {compile_check.CAPABILITIES}")
    return cap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capability", type=_capability, action="append",
                        help="e.g. 8.0 (repeatable); default: 8.0, 8.6, 8.9 and 9.0")  # fmt: skip
    parser.add_argument("--compact", action="store_true",
                        help="one row per kernel, capability, dtype and BLOCK_D")  # fmt: skip
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16))
    args = parser.parse_args()
    caps = tuple(args.capability or compile_check.CAPABILITIES)
    start = time.perf_counter()
    results = []
    if not args.compact:
        print(compile_check.HEADER)
    for result in compile_check.compile_all(compile_check.configs(caps), args.workers):
        results.append(result)
        if not args.compact:
            print(compile_check.row(result), flush=True)
    if args.compact:
        print(compile_check.table(results, compact=True))
    print()
    print(f"- {compile_check.summary(results)} ({time.perf_counter() - start:.0f} s, "
          f"{args.workers} workers)")  # fmt: skip
    return 0 if all(r.passed for r in results if r.config.proven) else 1


if __name__ == "__main__":
    sys.exit(main())
