"""Device and numeric precision choices, with the P100 (sm_60) in mind.

``torch.cuda.is_bf16_supported()`` reports emulated bf16 as support on pre-Ampere cards,
so bf16 is chosen from the device capability, never from that call alone.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

from fraglm.config import show
from fraglm.errors import FraglmError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def resolve_precision(name: str, device: torch.device) -> Precision:
    """auto: bf16 on CUDA >= 8.0, fp16 + GradScaler on older CUDA (P100), fp32 elsewhere."""
    capability = cuda_capability(device)
    if name == "auto":
        name = "fp32" if capability is None else "bf16" if capability >= (8, 0) else "fp16"
    if name == "bf16" and capability is not None and capability < (8, 0):
        raise FraglmError(
            f"train.precision = 'bf16' needs CUDA capability 8.0+; this GPU is "
            f"{capability[0]}.{capability[1]} (use fp16 or auto)"
        )
    if name == "fp16" and device.type == "cpu":
        raise FraglmError("train.precision = 'fp16' is not supported on CPU (use fp32 or bf16)")
    return Precision(name, _DTYPES[name], use_scaler=name == "fp16" and device.type == "cuda")


def compile_supported(device: torch.device) -> bool:
    """torch.compile's Triton backend needs CUDA capability 7.0+ (not the P100)."""
    capability = cuda_capability(device)
    return capability is None or capability >= (7, 0)
