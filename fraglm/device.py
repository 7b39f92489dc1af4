"""Every per-device choice of a training run in one place: :func:`plan_device`'s
:class:`DevicePlan` (precision and gradient scaler, attention kernels, torch.compile,
Muon's dtype, TF32), with the P100 (sm_60) in mind.

``torch.cuda.is_bf16_supported()`` reports emulated bf16 as support on pre-Ampere cards,
so bf16 is chosen from the device capability, never from that call alone.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fraglm.attention.triton_op import choose_impl
from fraglm.config import ModelConfig, TrainConfig, show
from fraglm.errors import FraglmError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: torch.dtype
    use_scaler: bool

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32

    def context(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast for mixed precision, a no-op for fp32."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit choice must be available."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", name):
        raise FraglmError(f"device {show(name)} is not one of auto, cpu, cuda, cuda:N, mps")
    if name.startswith("cuda:") and torch.cuda.is_available():
        index, count = int(name.removeprefix("cuda:")), torch.cuda.device_count()
        if index >= count:
            raise FraglmError(f"device {name!r}: this machine has {count} CUDA device(s)")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FraglmError("train.device = 'cuda' but no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise FraglmError("train.device = 'mps' but MPS is not available")
    return torch.device(name)


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def _version(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def _resolve_precision(name: str, device: torch.device) -> Precision:
    """auto: bf16 on CUDA >= 8.0, fp16 + GradScaler on older CUDA (P100), fp32 elsewhere
    (MPS included: bf16 autocast there is a choice to make explicitly)."""
    capability = _cuda_capability(device)
    if name == "auto":
        name = "fp32" if capability is None else "bf16" if capability >= (8, 0) else "fp16"
    if name == "bf16" and capability is not None and capability < (8, 0):
        raise FraglmError(
            f"train.precision = 'bf16' needs CUDA capability 8.0+; this GPU is "
            f"{_version(capability)} (use fp16 or auto)"
        )
    if name == "fp16" and device.type != "cuda":
        # fp16 trains only with a gradient scaler, which fraglm uses on CUDA alone
        raise FraglmError(
            f"train.precision = 'fp16' is not supported on {device.type} (use fp32 or bf16)"
        )
    if name == "bf16" and device.type == "mps" and torch.__version__ < "2.6":
        raise FraglmError(
            f"train.precision = 'bf16' on MPS needs torch 2.6+ (this is {torch.__version__}); "
            "use fp32 or upgrade torch"
        )
    return Precision(name, _DTYPES[name], use_scaler=name == "fp16")


@dataclass(frozen=True)
class DevicePlan:
    """Every choice that depends on the device, made once by :func:`plan_device`."""

    device: torch.device
    capability: tuple[int, int] | None  # CUDA compute capability; None off CUDA
    precision: Precision
    attention: str  # FragmentStream kernels: "triton" or "torch" (the tile loop)
    compile: bool  # torch.compile the model
    muon_dtype: torch.dtype  # Muon's Newton-Schulz iterations
    tf32: bool  # TF32 tensor cores for the fp32 matmuls of an fp32 run

    def describe(self) -> str:
        """One line for the start of a run."""
        where = str(self.device)
        if self.capability is not None:
            where += f" (capability {_version(self.capability)})"
        precision = self.precision.name
        if self.precision.autocast:
            precision += " autocast" + (" + GradScaler" if self.precision.use_scaler else "")
        kernels = "Triton kernels" if self.attention == "triton" else "tile loop"
        return (
            f"{where}: {precision}{', TF32 matmuls' if self.tf32 else ''}, FragmentStream "
            f"{kernels}, torch.compile {'on' if self.compile else 'off'}, "
            f"Muon in {_NAMES[self.muon_dtype]}"
        )

    @contextlib.contextmanager
    def matmul_precision(self) -> Iterator[None]:
        """TF32 for fp32 matmuls inside the block only, where the plan says so (the setting
        is process-wide; it is restored after).

        TF32 keeps fp32's range with a 10-bit mantissa, about bf16 autocast's accuracy for
        the products, at several times fp32's speed on Ampere and newer GPUs.
        """
        if not self.tf32:
            yield
            return
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)


def plan_device(device: torch.device, train: TrainConfig, model: ModelConfig) -> DevicePlan:
    """The plan for training ``model`` with ``train`` on ``device``, decided from the
    device's kind and CUDA capability (never from ``torch.cuda.is_bf16_supported()``).

    - precision: ``train.precision`` as :func:`_resolve_precision` decides it.
    - attention: ``model.fragment_impl``; ``auto`` takes the Triton kernels where the
      compile check proves them for the capability, the autocast dtype and the head dim
      (:data:`~fraglm.attention.triton_op.PROVEN`), the tile loop elsewhere.
    - compile: ``train.compile`` where torch.compile's Triton backend runs: CUDA capability
      7.0+ (not the P100) and CPU; not on MPS (untested there).
    - Muon: bf16 Newton-Schulz (as ``torch.optim.Muon``) on CUDA 8.0+, and on CPU, where
      it is what fraglm's CPU recipes were measured with (and faster than fp32 on CPUs with
      bf16 instructions); fp32 below capability 8.0, which has no bf16 GEMMs (the P100
      fails with CUBLAS_STATUS_NOT_SUPPORTED) or emulates them, and on MPS.
    - TF32: for an fp32 run on CUDA 8.0+.
    """
    capability = _cuda_capability(device)
    precision = _resolve_precision(train.precision, device)
    head_dim = model.head_dim
    attention = choose_impl(model.fragment_impl, device, precision.dtype, head_dim)
    compiles = device.type != "mps" and (capability is None or capability >= (7, 0))
    ampere = capability is not None and capability >= (8, 0)
    return DevicePlan(
        device=device,
        capability=capability,
        precision=precision,
        attention=attention,
        compile=train.compile and compiles,
        muon_dtype=torch.bfloat16 if ampere or device.type == "cpu" else torch.float32,
        tf32=ampere and not precision.autocast,
    )
