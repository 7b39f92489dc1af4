"""Precision and compile choices, including the P100 path, without a GPU."""

import pytest
import torch
from torch.torch_version import TorchVersion

from fraglm import device as dev
from fraglm.errors import FraglmError


@pytest.fixture
def fake_gpu(monkeypatch):
    def install(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        # emulated bf16 is reported as supported on old cards: it must not sway the choice
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        return torch.device("cuda")

    return install


def test_cpu_auto_is_fp32_without_scaler():
    p = dev.resolve_precision("auto", torch.device("cpu"))
    assert (p.name, p.dtype, p.use_scaler, p.autocast) == ("fp32", torch.float32, False, False)


def test_p100_auto_is_fp16_with_grad_scaler(fake_gpu):
    p = dev.resolve_precision("auto", fake_gpu((6, 0)))
    assert (p.name, p.dtype, p.use_scaler) == ("fp16", torch.float16, True)


def test_ampere_and_newer_auto_is_bf16(fake_gpu):
    p = dev.resolve_precision("auto", fake_gpu((8, 0)))
    assert (p.name, p.use_scaler) == ("bf16", False)


def test_bf16_refused_below_ampere(fake_gpu):
    with pytest.raises(FraglmError, match=r"capability 8\.0"):
        dev.resolve_precision("bf16", fake_gpu((7, 0)))


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_fp16_refused_without_a_gradient_scaler(device):
    with pytest.raises(FraglmError, match=f"'fp16' is not supported on {device}"):
        dev.resolve_precision("fp16", torch.device(device))


def test_bf16_on_mps_needs_the_torch_that_autocasts_it(monkeypatch):
    mps = torch.device("mps")
    assert dev.resolve_precision("bf16", mps).autocast
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.5.1"))
    with pytest.raises(FraglmError, match=r"needs torch 2\.6\+ \(this is 2\.5\.1\)"):
        dev.resolve_precision("bf16", mps)


def test_compile_needs_capability_7(fake_gpu):
    assert not dev.compile_supported(fake_gpu((6, 0)))
    assert dev.compile_supported(fake_gpu((7, 0)))
    assert dev.compile_supported(torch.device("cpu"))
    assert not dev.compile_supported(torch.device("mps"))


@pytest.mark.parametrize(
    ("capability", "precision", "tf32"),
    [
        ((8, 0), "fp32", True),
        ((9, 0), "fp32", True),
        ((7, 0), "fp32", False),
        ((8, 0), "bf16", False),
    ],
)
def test_fp32_runs_use_tf32_on_ampere_and_newer_inside_the_block(
    fake_gpu, capability, precision, tf32
):
    device = fake_gpu(capability)
    before = torch.get_float32_matmul_precision()
    with dev.matmul_precision(device, dev.resolve_precision(precision, device)):
        assert (torch.get_float32_matmul_precision() == "high") == tf32
    assert torch.get_float32_matmul_precision() == before
    with dev.matmul_precision(
        torch.device("cpu"), dev.resolve_precision("fp32", torch.device("cpu"))
    ):
        assert torch.get_float32_matmul_precision() == before


def test_explicit_cuda_without_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FraglmError, match="no CUDA device"):
        dev.resolve_device("cuda")
