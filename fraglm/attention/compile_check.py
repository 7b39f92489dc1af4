"""Ahead-of-time compile check of the Triton kernels: no GPU needed.

Every configuration :func:`fraglm.attention.fragment_attention` and its block routines can
launch on a target GPU is compiled with Triton's real compiler for that target
(``triton.compile`` with a ``GPUTarget``, through ptxas to a cubin), in a fresh cache
directory so that each result is a real compile, and then read:

* registers per thread and spills: ``cuobjdump --dump-resource-usage`` (``REG``, and
  ``STACK``: the per-thread stack frame in bytes, which holds the spilled registers) and
  the ``STL``/``LDL`` (spill store/load) instructions of ``cuobjdump -sass``, from the
  same cubin the GPU would load;
* shared memory per program (``metadata.shared``) against the per-block limit of the
  capability (opt-in maximum, CUDA programming guide: 8.0: 163 KiB, 8.6 and 8.9: 99 KiB,
  9.0: 227 KiB);
* tensor cores: ``mma.sync`` (sm_80+) or ``wgmma`` (sm_90) in the PTX;
* pipelined loads: the ``cp.async`` copies in the PTX.

The matrix: kernels ``fwd``, ``delta``, ``dkdv``, ``dq``; capabilities 8.0, 8.6, 8.9, 9.0;
operand dtypes fp16 and bf16 (proven, :func:`~fraglm.attention.triton_op.triton_proven`)
and fp32 (reported, not proven: ``tl.dot`` on fp32 at full precision runs no tensor
cores); ``BLOCK_D`` 16, 32, 64, 128 (every head dim 1..128 maps to one of them and is
otherwise a runtime argument, so head dims such as 48, 80 or 96 compile as their
``BLOCK_D``); with or without document ids. Tiles, warps and
stages are :func:`~fraglm.attention.triton_kernels.tile_config`'s, the launchers' own.
Causal or not, outputs in the operands' dtype (``fragment_attention``) or in fp32 (the
block routines of ring attention), grouped-query attention, sequence lengths, offsets and
strides are runtime arguments:
they do not change what is compiled. Integer arguments are compiled as generic ``i32``
(Triton also specializes integers divisible by 16 at launch, which only adds alignment
facts to the same code) and document ids as ``i64`` (what fraglm's batches carry).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

from fraglm.attention import triton_kernels as tk
from fraglm.attention.triton_op import PROVEN_CAPABILITIES, triton_proven

CAPABILITIES = PROVEN_CAPABILITIES
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_BLOCKS = (16, 32, 64, 128)
# maximum shared memory per block (opt-in), bytes
SHARED_LIMITS = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024}
_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# each pointer argument's role: the operands' dtype, the output's, or a fixed one
_POINTERS = {
    "Q": "in", "K": "in", "V": "in", "DO": "in", "DOUT": "in", "OUT": "in", "DK": "in",
    "DV": "in", "DQ": "in", "OUT32": "fp32", "DK32": "fp32", "DV32": "fp32", "DQ32": "fp32",
    "LSE": "fp32", "DELTA": "fp32", "QDOC": "i64", "KDOC": "i64", "RANGES": "i32",
}  # fmt: skip
_FLOATS = ("qk_scale", "scale")


@dataclass(frozen=True)
class Config:
    """One compiled kernel variant."""

    kernel: str
    capability: tuple[int, int]
    dtype: torch.dtype
    head_block: int
    docs: bool = False

    @property
    def proven(self) -> bool:
        return triton_proven(self.capability, self.dtype, self.head_block)


@dataclass
class Result:
    """What the compiler produced for a :class:`Config`."""

    config: Config
    tiles: tuple[int, int, int, int]
    error: str | None = None
    registers: int | None = None
    stack_bytes: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    tensor_cores: bool | None = None
    cp_async: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def limit(self) -> int:
        return SHARED_LIMITS[self.config.capability]

    @property
    def passed(self) -> bool:
        return not self.problems


def configs(capabilities: tuple[tuple[int, int], ...] = CAPABILITIES, *, proven_only: bool = False
            ) -> list[Config]:  # fmt: skip
    """Every configuration the launchers can compile for ``capabilities``."""
    out = []
    for cap in capabilities:
        for dtype in DTYPES:
            for d in HEAD_BLOCKS:
                out.append(Config("delta", cap, dtype, d))
                for kernel in ("fwd", "dkdv", "dq"):
                    for docs in (False, True):
                        out.append(Config(kernel, cap, dtype, d, docs))
    return [c for c in out if c.proven or not proven_only]


def aligned_args(arg_names: list[str]) -> dict[tuple[int], list[list]]:
    """The launch's usual specialization (Triton specializes at launch each pointer
    16-byte aligned and each integer divisible by 16): tensor pointers aligned (torch's
    allocations), the head dim and the strides of q, k, v, outputs and gradients
    divisible by 16 (head dims that are multiples of 16); document ids, sequence lengths
    and offsets generic."""
    return {
        (i,): [["tt.divisibility", 16]] for i, name in enumerate(arg_names)
        if (name in _POINTERS and not name.endswith("DOC"))
        or (re.fullmatch(r"s[a-z]+_[bht]", name) and not name.startswith(("sqd", "skd")))
        or name == "head_dim"
    }  # fmt: skip


def _signature(config: Config) -> tuple[object, dict[str, str], dict[str, object], dict]:
    fn = {"fwd": tk._fwd_kernel, "delta": tk._delta_kernel, "dkdv": tk._dkdv_kernel,
          "dq": tk._dq_kernel}[config.kernel]  # fmt: skip
    tiles = tk.tile_config(config.kernel, config.capability, config.head_block)
    dtypes = {
        "in": _TRITON_DTYPES[config.dtype], "fp32": "fp32", "i64": "i64", "i32": "i32",
    }  # fmt: skip
    constexprs = {
        "HAS_DOCS": config.docs, "BLOCK_M": tiles.block_m,
        "BLOCK_N": tiles.block_n, "BLOCK_D": config.head_block,
        "PRECISION": tk._precision(config.dtype),
    }  # fmt: skip
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            signature[name] = "*" + dtypes[_POINTERS[name]]
        else:
            signature[name] = "fp32" if name in _FLOATS else "i32"
    used = {name: constexprs[name] for name in fn.arg_names if name in constexprs}
    options = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
    return fn, signature, used, options


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _cubin_facts(cubin: bytes) -> tuple[int, int, int, int]:
    """Registers, stack bytes per thread, spill stores and loads (SASS STL/LDL)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = str(_cuobjdump())
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return registers, stack, len(re.findall(r"\bSTL\b", sass)), len(re.findall(r"\bLDL\b", sass))


def compile_one(config: Config) -> Result:
    """Compile ``config`` for its target and read the facts of the module docstring."""
    fn, signature, constexprs, options = _signature(config)
    tiles = (constexprs["BLOCK_M"], constexprs.get("BLOCK_N", 0), options["num_warps"],
             options["num_stages"])  # fmt: skip
    result = Result(config, tiles)
    major, minor = config.capability
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernel = triton.compile(
                triton.compiler.ASTSource(fn, signature, constexprs, aligned_args(fn.arg_names)),
                target=GPUTarget("cuda", major * 10 + minor, 32), options=options,
            )  # fmt: skip
    except Exception as e:  # any compile failure is a reported result
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
        result.problems.append("does not compile")
        return result
    ptx = kernel.asm["ptx"]
    facts = _cubin_facts(kernel.asm["cubin"])
    result.registers, result.stack_bytes, result.spill_stores, result.spill_loads = facts
    result.shared = kernel.metadata.shared
    result.tensor_cores = bool(re.search(r"\bmma\.sync|\bwgmma\.", ptx))
    result.cp_async = len(re.findall(r"\bcp\.async\.c[ag]\b", ptx))
    if result.shared > result.limit:
        result.problems.append("exceeds shared memory")
    if config.kernel != "delta" and not result.tensor_cores:
        result.problems.append("no tensor cores")
    return result


def _fresh_cache() -> None:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fraglm-compile-check-")


def compile_all(configs_: list[Config], workers: int = 2) -> Iterator[Result]:
    """Compile every configuration in ``workers`` processes, each with an empty cache;
    the results in the order of ``configs_``, each as soon as it and those before it are
    done."""
    with ProcessPoolExecutor(workers, initializer=_fresh_cache) as pool:
        yield from pool.map(compile_one, configs_)


def _span(values: list) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _verdict(results: list[Result]) -> str:
    problems = sorted({p for r in results for p in r.problems})
    if not results[0].config.proven:
        why = "fp32, no tensor cores" if results[0].config.dtype == torch.float32 else "excluded"
        return f"not proven ({why})" + (f": {', '.join(problems)}" if problems else "")
    return "ok" if not problems else "FAIL: " + ", ".join(problems)


def _row(results: list[Result], docs: str) -> str:
    c, first = results[0].config, results[0]
    m, n, warps, stages = first.tiles
    tiles = f"{m}x{n} w{warps} s{stages}" if n else f"{m} w{warps} s{stages}"
    built = [r for r in results if r.error is None]
    if not built:
        facts = ["-"] * 5
    else:
        facts = [
            _span([r.registers for r in built]),
            f"{_span([r.stack_bytes for r in built])} B, "
            f"{_span([r.spill_stores for r in built])}/{_span([r.spill_loads for r in built])}",
            f"{_span([r.shared // 1024 for r in built])} / {first.limit // 1024} KiB",
            "yes" if all(r.tensor_cores for r in built) else "no",
            _span([r.cp_async for r in built]),
        ]  # fmt: skip
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[c.dtype]
    cap = f"{c.capability[0]}.{c.capability[1]}"
    cells = [c.kernel, cap, name, str(c.head_block), docs, tiles, *facts, _verdict(results)]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| kernel | capability | dtype | BLOCK_D | docs | tiles | registers "
    "| spills (stack, STL/LDL) | shared / limit | tensor cores | cp.async | verdict |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(result: Result) -> str:
    """``result`` as a row of :data:`HEADER`'s table."""
    return _row([result], "yes" if result.config.docs else "no")


def table(results: list[Result], *, compact: bool = False) -> str:
    """A markdown table of ``results``, one row per compile, or with ``compact`` one row
    per kernel, capability, dtype and BLOCK_D (ranges over with and without documents)."""
    if not compact:
        return "\n".join([HEADER, *map(row, results)])
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        c = r.config
        groups.setdefault((c.kernel, c.capability, str(c.dtype), c.head_block), []).append(r)
    return "\n".join([HEADER, *(_row(group, "both") for group in groups.values())])


def summary(results: list[Result]) -> str:
    proven = [r for r in results if r.config.proven]
    failed = [r for r in proven if not r.passed]
    spilled = [r for r in results if r.spill_stores and r.config.dtype != torch.float32]
    return (
        f"{len(results)} compiles: {len(proven) - len(failed)} of {len(proven)} proven "
        f"configurations pass (compile, shared memory, tensor cores), {len(failed)} fail; "
        f"{len(spilled)} 16-bit compiles spill"
    )
