"""The device plan of each GPU generation fraglm's users train on, MPS and CPU, without a
GPU: the CUDA capability is faked, and the P100's training step runs on CPU tensors."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.torch_version import TorchVersion

from fraglm import device as dev
from fraglm.attention import triton_op
from fraglm.config import ModelConfig, TrainConfig, load_config
from fraglm.data.batches import Batch
from fraglm.errors import FraglmError
from fraglm.nn.loss import TokenLoss
from fraglm.nn.model import Transformer
from fraglm.training.evaluation import token_loss_sum
from fraglm.training.optim import build_optimizer

REPO_ROOT = Path(__file__).resolve().parents[1]
MUON = TrainConfig(optimizer="muon", compile=True)
MODEL = ModelConfig()  # head dim 128 / 8 = 16
FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture
def fake_gpu(monkeypatch):
    """``fake_gpu((major, minor))``: a CUDA device of that capability, with triton."""

    def install(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        # emulated bf16 is reported as supported on old cards: it must not sway the choice
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(triton_op, "HAS_TRITON", True)
        return torch.device("cuda")

    return install


def summary(plan: dev.DevicePlan) -> tuple:
    p = plan.precision
    return (p.name, p.dtype, p.autocast, p.use_scaler, plan.attention, plan.compile,
            plan.muon_dtype, plan.tf32)  # fmt: skip


# precision, autocast dtype, autocast, GradScaler, attention, compile, Muon, TF32
PRE_AMPERE = ("fp16", FP16, True, True, "torch", True, FP32, False)
AMPERE_AND_NEWER = ("bf16", BF16, True, False, "triton", True, BF16, False)


@pytest.mark.parametrize(
    ("capability", "plan"),
    [
        pytest.param((6, 0), (*PRE_AMPERE[:5], False, FP32, False), id="P100"),
        pytest.param((7, 0), PRE_AMPERE, id="V100"),
        pytest.param((7, 5), PRE_AMPERE, id="T4"),
        pytest.param((8, 0), AMPERE_AND_NEWER, id="A100"),
        pytest.param((8, 6), AMPERE_AND_NEWER, id="RTX 3090"),
        pytest.param((8, 9), AMPERE_AND_NEWER, id="RTX 4090"),
        pytest.param((9, 0), AMPERE_AND_NEWER, id="H100"),
    ],
)
def test_each_gpu_generations_plan(fake_gpu, capability, plan):
    got = dev.plan_device(fake_gpu(capability), MUON, MODEL)
    assert got.capability == capability
    assert summary(got) == plan


def test_mps_and_cpu_plans():
    mps = dev.plan_device(torch.device("mps"), MUON, MODEL)
    assert summary(mps) == ("fp32", FP32, False, False, "torch", False, FP32, False)
    # on CPU Muon keeps torch.optim.Muon's bf16, as fraglm's CPU recipes were measured
    cpu = dev.plan_device(torch.device("cpu"), MUON, MODEL)
    assert summary(cpu) == ("fp32", FP32, False, False, "torch", True, BF16, False)
    assert cpu.capability is None


def test_compile_only_when_the_config_asks(fake_gpu):
    assert not dev.plan_device(fake_gpu((9, 0)), TrainConfig(), MODEL).compile


def test_auto_attention_without_triton_installed_is_the_tile_loop(fake_gpu, monkeypatch):
    device = fake_gpu((8, 0))
    monkeypatch.setattr(triton_op, "HAS_TRITON", False)
    assert dev.plan_device(device, MUON, MODEL).attention == "torch"


@pytest.mark.parametrize(
    ("capability", "precision", "model", "attention"),
    [
        ((8, 0), "fp32", MODEL, "torch"),  # fp32 products run without tensor cores
        ((8, 0), "auto", ModelConfig(d_model=1024, n_heads=4), "torch"),  # head dim 256
        ((8, 0), "auto", replace(MODEL, fragment_impl="torch"), "torch"),  # forced
        ((6, 0), "fp32", replace(MODEL, fragment_impl="torch"), "torch"),
    ],
)
def test_attention_follows_dtype_head_dim_and_a_forced_choice(
    fake_gpu, capability, precision, model, attention
):
    train = TrainConfig(precision=precision)
    assert dev.plan_device(fake_gpu(capability), train, model).attention == attention


@pytest.mark.parametrize(
    ("capability", "precision", "where"),
    [
        ((6, 0), "auto", r"a GPU of capability 6\.0 with torch\.float16"),
        ((7, 5), "fp16", r"a GPU of capability 7\.5 with torch\.float16"),
        ((10, 0), "auto", r"a GPU of capability 10\.0 with torch\.bfloat16"),  # unchecked
        (None, "fp32", r"mps with torch\.float32"),
    ],
)
def test_forced_triton_where_it_is_not_proven_is_a_one_line_error(
    fake_gpu, capability, precision, where
):
    device = torch.device("mps") if capability is None else fake_gpu(capability)
    model = replace(MODEL, fragment_impl="triton")
    with pytest.raises(FraglmError, match=f"not proven for {where} at head dim 16") as err:
        dev.plan_device(device, TrainConfig(precision=precision), model)
    assert "\n" not in str(err.value)


def test_forced_triton_on_cpu_needs_the_interpreter_and_on_ampere_is_kept(fake_gpu):
    model = replace(MODEL, fragment_impl="triton")
    with pytest.raises(FraglmError, match="TRITON_INTERPRET=1"):
        dev.plan_device(torch.device("cpu"), MUON, model)
    assert dev.plan_device(fake_gpu((8, 0)), MUON, model).attention == "triton"


def test_describe_is_one_line_of_the_whole_plan(fake_gpu):
    h100 = dev.plan_device(fake_gpu((9, 0)), MUON, MODEL)
    assert h100.describe() == (
        "cuda (capability 9.0): bf16 autocast, FragmentStream Triton kernels, "
        "torch.compile on, Muon in bf16"
    )
    p100 = dev.plan_device(fake_gpu((6, 0)), MUON, MODEL)
    assert p100.describe() == (
        "cuda (capability 6.0): fp16 autocast + GradScaler, FragmentStream tile loop, "
        "torch.compile off, Muon in fp32"
    )
    a100 = dev.plan_device(fake_gpu((8, 0)), TrainConfig(precision="fp32"), MODEL)
    assert a100.describe() == (
        "cuda (capability 8.0): fp32, TF32 matmuls, FragmentStream tile loop, "
        "torch.compile off, Muon in bf16"
    )


def test_bf16_refused_below_ampere(fake_gpu):
    with pytest.raises(FraglmError, match=r"capability 8\.0\+; this GPU is 7\.0"):
        dev.plan_device(fake_gpu((7, 0)), TrainConfig(precision="bf16"), MODEL)


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_fp16_refused_without_a_gradient_scaler(device):
    with pytest.raises(FraglmError, match=f"'fp16' is not supported on {device}"):
        dev.plan_device(torch.device(device), TrainConfig(precision="fp16"), MODEL)


def test_bf16_on_mps_needs_the_torch_that_autocasts_it(monkeypatch):
    mps, bf16 = torch.device("mps"), TrainConfig(precision="bf16")
    assert dev.plan_device(mps, bf16, MODEL).precision.autocast
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.5.1"))
    with pytest.raises(FraglmError, match=r"needs torch 2\.6\+ \(this is 2\.5\.1\)"):
        dev.plan_device(mps, bf16, MODEL)


@pytest.mark.parametrize(
    ("capability", "precision", "tf32"),
    [
        ((8, 0), "fp32", True),
        ((9, 0), "fp32", True),
        ((7, 0), "fp32", False),
        ((8, 0), "bf16", False),
        (None, "fp32", False),  # CPU
    ],
)
def test_fp32_runs_use_tf32_on_ampere_and_newer_inside_the_block(
    fake_gpu, capability, precision, tf32
):
    device = torch.device("cpu") if capability is None else fake_gpu(capability)
    plan = dev.plan_device(device, TrainConfig(precision=precision), MODEL)
    assert plan.tf32 == tf32
    before = torch.get_float32_matmul_precision()
    with plan.matmul_precision():
        assert (torch.get_float32_matmul_precision() == "high") == tf32
    assert torch.get_float32_matmul_precision() == before


def test_explicit_cuda_without_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FraglmError, match="no CUDA device"):
        dev.resolve_device("cuda")


def p100_config_step(plan: dev.DevicePlan, op_log) -> tuple[object, torch.amp.GradScaler]:
    """One whole training step of the shipped p100 model as the trainer runs it, with the
    optimizer and scaler that ``plan`` builds, on CPU tensors (batch 2 of 256 tokens, two
    fragments, documents masked); returns the ops it ran and the scaler."""
    cfg = load_config(REPO_ROOT / "configs/p100.yaml")
    assert cfg.train.optimizer == "muon"
    torch.manual_seed(0)
    model = Transformer(replace(cfg.model, fragment_impl=plan.attention), cfg.tokenizer.vocab_size)
    optimizer = build_optimizer(model, cfg.train, plan.muon_dtype)
    # the CPU's autocast and GradScaler, with the dtypes and scaler the plan chose for the
    # GPU: on a real P100 the same step autocasts on "cuda"
    scaler = torch.amp.GradScaler("cpu", enabled=plan.precision.use_scaler)
    tokens = torch.randint(0, cfg.tokenizer.vocab_size, (2, 257))
    docs = torch.arange(256).div(100, rounding_mode="floor").expand(2, -1)
    batch = Batch(tokens[:, :-1], tokens[:, 1:], docs)
    with op_log() as log:
        loss = token_loss_sum(TokenLoss(model), batch, plan.precision)
        scaler.scale(loss / tokens[:, 1:].numel()).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    assert torch.isfinite(loss)
    return log, scaler


def test_the_p100_configs_training_step_creates_no_bf16_and_launches_no_triton(fake_gpu, op_log):
    cfg = load_config(REPO_ROOT / "configs/p100.yaml")
    plan = dev.plan_device(fake_gpu((6, 0)), cfg.train, cfg.model)
    assert (plan.precision.dtype, plan.precision.use_scaler) == (FP16, True)
    log, scaler = p100_config_step(plan, op_log)
    assert log.ops_with(BF16) == []
    assert [op for op in log.dtypes if op.startswith("fraglm.")] == []  # Triton's ops
    # the step did run as planned: the projections' products in fp16 (the tile loop's
    # products are fp32 by design), gradients unscaled, and the optimizers stepped (no
    # inf or NaN among the gradients made the scaler skip the step)
    assert "aten.mm.default" in log.ops_with(FP16)
    assert "aten._amp_foreach_non_finite_check_and_unscale_.default" in log.dtypes
    assert scaler.get_scale() == 2.0**16


def test_the_a100_plans_muon_does_use_bf16(fake_gpu, op_log):
    """The recorder sees bf16 where there is some: the same step with Muon in the A100
    plan's dtype."""
    cfg = load_config(REPO_ROOT / "configs/p100.yaml")
    a100 = dev.plan_device(fake_gpu((8, 0)), cfg.train, cfg.model)
    p100 = dev.plan_device(fake_gpu((6, 0)), cfg.train, cfg.model)
    log, _ = p100_config_step(replace(p100, muon_dtype=a100.muon_dtype), op_log)
    assert a100.muon_dtype == BF16 and "aten.addmm.default" in log.ops_with(BF16)
