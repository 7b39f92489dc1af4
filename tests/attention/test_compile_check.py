"""The ahead-of-time compile check (:mod:`fraglm.attention.compile_check`) in CI: every
configuration :func:`~fraglm.attention.triton_op.triton_proven` covers compiles for
capabilities 8.0, 8.6, 8.9 and 9.0 with Triton's real compiler, fits the per-block shared
memory and runs its products on tensor cores. No GPU needed; about 3 minutes on 2 cores."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

pytest.importorskip("triton")

from fraglm.attention import compile_check, triton_kernels
from fraglm.attention.compile_check import Config
from fraglm.attention.triton_op import triton_proven


def test_every_proven_configuration_passes() -> None:
    configs = compile_check.configs(proven_only=True)
    covered = {(c.kernel, c.capability, c.dtype, c.head_block) for c in configs}
    assert covered == set(itertools.product(
        triton_kernels.KERNELS, compile_check.CAPABILITIES, (torch.float16, torch.bfloat16),
        compile_check.HEAD_BLOCKS,
    ))  # fmt: skip
    assert all(triton_proven(c.capability, c.dtype, c.head_block) for c in configs)
    results = list(compile_check.compile_all(configs))
    failed = [r for r in results if not r.passed]
    assert not failed, compile_check.table(failed)
    for r in results:
        assert r.shared <= compile_check.SHARED_LIMITS[r.config.capability]
        assert r.tensor_cores or r.config.kernel == "delta"


def test_the_check_reports_failures(monkeypatch) -> None:
    """An fp32 kernel runs no tensor cores, an oversized tile exceeds sm_86's shared
    memory, and a kernel that reads a plain (not constexpr) global does not compile."""
    compile_check._fresh_cache()
    fp32 = compile_check.compile_one(Config("dq", (8, 0), torch.float32, 32))
    assert fp32.problems == ["no tensor cores"] and not fp32.config.proven
    assert "not proven" in compile_check.table([fp32])

    huge = triton_kernels.Tiles(256, 256, 8, 4)
    monkeypatch.setitem(triton_kernels._GPU_TILES, ("fwd", 128), huge)
    big = compile_check.compile_one(Config("fwd", (8, 6), torch.float16, 128))
    assert big.config.proven and "exceeds shared memory" in big.problems
    assert "FAIL: exceeds shared memory" in compile_check.table([big])
    monkeypatch.undo()

    monkeypatch.setattr(triton_kernels, "_LN2", math.log(2.0))
    broken = compile_check.compile_one(Config("fwd", (9, 0), torch.bfloat16, 64))
    assert broken.problems == ["does not compile"] and "_LN2" in broken.error
