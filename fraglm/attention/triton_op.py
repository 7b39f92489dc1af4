"""FragmentStream's Triton kernels as PyTorch custom ops, and the choice of implementation.

``torch.ops.fraglm.fragment_fwd``, ``fragment_delta`` and ``fragment_bwd`` wrap the
launchers of :mod:`fraglm.attention.triton_kernels` with fake (meta) implementations, and
``fragment_fwd`` carries its own autograd formula, so ``torch.compile`` traces a model
that calls them in one graph (the ops are opaque nodes) and CUDA graphs can capture them.
Triton itself is imported on the first call, so fraglm runs without it (CPU, MPS, P100).
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch
from torch import Tensor

from fraglm.errors import FraglmError

__all__ = ["IMPLS", "choose_impl", "resolve_impl", "triton_proven"]

IMPLS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128


# Looked up once, without importing triton (which costs seconds and is not needed on CPU).
HAS_TRITON = importlib.util.find_spec("triton") is not None


def kernels() -> ModuleType:
    """The kernel module (imports triton); a one-line error where triton is missing."""
    if not HAS_TRITON:
        raise FraglmError("impl='triton' needs triton: pip install 'fraglm[gpu]'")
    from fraglm.attention import triton_kernels

    return triton_kernels


# What the ahead-of-time compile check (``scripts/compile_check.py``) proves: on these
# capabilities (A100; RTX 30xx; RTX 40xx and L4; H100 and H200), dtypes and head dims every
# kernel compiles, fits the per-block shared memory, runs its products on tensor cores and
# (with Triton 3.9) spills nothing. It compiles the variant Triton launches for head dims
# that are multiples of 16 (aligned, vectorised, pipelined loads). Elsewhere ``auto``
# takes the tile loop.
PROVEN_CAPABILITIES = ((8, 0), (8, 6), (8, 9), (9, 0))
PROVEN_DTYPES = (torch.float16, torch.bfloat16)
PROVEN = "CUDA capabilities 8.0, 8.6, 8.9 and 9.0 with fp16/bf16, head dims 16, 32, ... 128"


def triton_proven(capability: tuple[int, int], dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the compile check proves the Triton kernels for a GPU of ``capability``
    with operands of ``dtype`` and head dim ``head_dim``."""
    return (
        tuple(capability) in PROVEN_CAPABILITIES
        and dtype in PROVEN_DTYPES
        and head_dim % 16 == 0
        and 16 <= head_dim <= MAX_HEAD_DIM
    )


@torch.compiler.assume_constant_result
def _gpu_proven(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    if device.type != "cuda":
        return False
    return triton_proven(torch.cuda.get_device_capability(device), dtype, head_dim)


def resolve_impl(impl: str, q: Tensor) -> str:
    """``"triton"`` or ``"torch"`` for attention on ``q``: :func:`choose_impl` for its
    device, dtype and head dim."""
    return choose_impl(impl, q.device, q.dtype, q.shape[-1])


def choose_impl(impl: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """``"triton"`` or ``"torch"`` for attention on ``device`` with ``dtype`` operands.

    ``auto`` takes Triton where :func:`triton_proven` holds for the GPU, the dtype and the
    head dim (:data:`PROVEN`), the torch tile loop elsewhere (P100, V100, T4, GPUs newer
    than the check, fp32, CPU, MPS). A forced ``triton`` on a GPU whose capability the check
    does not compile for is a one-line error; on the checked capabilities it also runs fp32
    (compiled and reported by the check, without tensor cores) and any head dim up to 128
    (the same code with unaligned, unpipelined loads), which the GPU tests use. ``triton``
    on CPU tensors runs Triton's interpreter (any dtype the kernels take), which must have
    been switched on with ``TRITON_INTERPRET=1`` before fraglm loaded its kernels.
    """
    if impl not in IMPLS:
        raise FraglmError(f"unknown fragment attention impl {impl!r}; choose one of {IMPLS}")
    if impl == "torch" or (impl == "auto" and not _gpu_proven(device, dtype, head_dim)):
        return "torch"
    if impl == "auto":
        return "triton" if HAS_TRITON else "torch"
    if dtype not in TRITON_DTYPES or head_dim > MAX_HEAD_DIM:
        raise FraglmError(
            f"impl='triton' takes fp32/fp16/bf16 with head dim <= {MAX_HEAD_DIM}, "
            f"got {dtype} with head dim {head_dim}"
        )
    module = kernels()
    if device.type == "cpu" and not module.INTERPRETED:
        raise FraglmError(
            "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment "
            "before fraglm loads its kernels (or a CUDA GPU); use impl='auto' or 'torch'"
        )
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if device.type != "cpu" and tuple(capability or ()) not in PROVEN_CAPABILITIES:
        where = device.type
        if capability is not None:
            where = f"a GPU of capability {capability[0]}.{capability[1]}"
        raise FraglmError(
            f"impl='triton' is not proven for {where} with {dtype} at head dim {head_dim} "
            f"(the compile check covers {PROVEN}); use impl='auto'"
        )
    return "triton"


def _grad_dtype(fp32: bool) -> torch.dtype | None:
    return torch.float32 if fp32 else None


@torch.library.custom_op("fraglm::fragment_fwd", mutates_args=())
def fragment_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_doc: Tensor | None,
    k_doc: Tensor | None,
    causal: bool,
    scale: float,
    q_start: int,
    k_start: int,
    fp32_out: bool,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)``: out in fp32 when ``fp32_out`` (block routines), else q's dtype."""
    return kernels().forward(
        q, k, v, q_doc, k_doc, causal=causal, scale=scale, q_start=q_start, k_start=k_start,
        out_dtype=torch.float32 if fp32_out else q.dtype,
    )  # fmt: skip


@fragment_fwd.register_fake
def _(q, k, v, q_doc, k_doc, causal, scale, q_start, k_start, fp32_out):
    # contiguous, as the kernels write them (empty_like would copy a transposed q's strides)
    out = q.new_empty(q.shape, dtype=torch.float32 if fp32_out else q.dtype)
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fraglm::fragment_delta", mutates_args=())
def fragment_delta(out: Tensor, dout: Tensor) -> Tensor:
    """``rowsum(dout * out)`` in fp32."""
    return kernels().softmax_delta(out, dout)


@fragment_delta.register_fake
def _(out, dout):
    return out.new_empty(out.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fraglm::fragment_bwd", mutates_args=())
def fragment_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    lse: Tensor,
    delta: Tensor,
    q_doc: Tensor | None,
    k_doc: Tensor | None,
    causal: bool,
    scale: float,
    q_start: int,
    k_start: int,
    fp32_grads: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``, in fp32 when ``fp32_grads`` (block routines), else the inputs'."""
    return kernels().backward(
        q, k, v, dout, lse, delta, q_doc, k_doc, causal=causal, scale=scale, q_start=q_start,
        k_start=k_start, grad_dtype=_grad_dtype(fp32_grads),
    )  # fmt: skip


@fragment_bwd.register_fake
def _(q, k, v, dout, lse, delta, q_doc, k_doc, causal, scale, q_start, k_start, fp32):
    dtype = _grad_dtype(fp32)
    return tuple(t.new_empty(t.shape, dtype=dtype or t.dtype) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, q_doc, k_doc, causal, scale, q_start, k_start, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, q_doc, k_doc, out, lse)
    ctx.options = (causal, scale, q_start, k_start)


def _backward(ctx, dout: Tensor, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
    """The lse output is differentiable too: its gradient enters as ``D - dLSE``."""
    q, k, v, q_doc, k_doc, out, lse = ctx.saved_tensors
    causal, scale, q_start, k_start = ctx.options
    delta = torch.ops.fraglm.fragment_delta(out, dout)
    if dlse is not None:
        delta = delta - dlse
    dq, dk, dv = torch.ops.fraglm.fragment_bwd(
        q, k, v, dout, lse, delta, q_doc, k_doc, causal, scale, q_start, k_start, False
    )
    return dq, dk, dv, None, None, None, None, None, None, None


fragment_fwd.register_autograd(_backward, setup_context=_setup_context)
