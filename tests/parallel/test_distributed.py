"""torchrun training: 2 data-parallel or context-parallel ranks equal one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fraglm.config import load_config
from fraglm.errors import FraglmError
from fraglm.parallel.distributed import backend_for, setup

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r]


def _train(tmp_path: Path, name: str, nproc: int, *extra: str) -> list[float]:
    out = tmp_path / name
    args = [
        "train", "-c", str(ROOT / "configs/tiny.yaml"),
        "--set", f"train.out_dir={out}",
        "--set", f"data.tokenized_dir={tmp_path / 'tokens'}",
        "--set", f"data.path={ROOT / 'data/sample_health_qa.jsonl'}",
        "--set", f"train.max_steps={STEPS}",
        "--set", "logging.log_interval=1",
        "--set", "logging.progress=false",
        *extra,
    ]  # fmt: skip
    if nproc == 1:
        command = [sys.executable, "-m", "fraglm", *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "fraglm", *args,
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("model: ") == 1, result.stdout  # rank 0 speaks, not every rank
    return _losses(out)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, list[float]]:
    tmp = tmp_path_factory.mktemp("dist")
    return tmp, _train(tmp, "single", 1, "--set", "train.doc_mask=true")


@pytest.mark.slow
def test_two_data_parallel_ranks_match_one_process(single):
    tmp, expected = single
    got = _train(tmp, "ddp", 2, "--set", "train.doc_mask=true")
    assert len(got) == STEPS
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_two_data_parallel_ranks_with_accumulation_match_one_process(single):
    """Each rank runs two micro-batches (DDP syncs gradients on the last only): the
    losses are still those of one process on the whole batch."""
    tmp, expected = single
    got = _train(tmp, "ddp-accum", 2, "--set", "train.doc_mask=true", "--set", "train.grad_accum=2")
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_two_context_parallel_ranks_match_one_process(single):
    tmp, expected = single
    got = _train(tmp, "cp", 2, "--set", "train.doc_mask=true", "--set", "train.context_parallel=2")
    assert got == pytest.approx(expected, abs=1e-5)


def test_context_parallel_without_torchrun_is_an_error(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.context_parallel=2"])
    with pytest.raises(FraglmError, match="must divide the number of processes"):
        setup(cfg)


def test_batch_must_split_over_data_parallel_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.batch_size=8"])
    with pytest.raises(FraglmError, match="batch_size = 8 must be divisible"):
        setup(cfg)


def test_context_must_split_into_zigzag_chunks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = load_config(
        ROOT / "configs/tiny.yaml", ["train.context_parallel=4", "model.context_length=60"]
    )
    with pytest.raises(FraglmError, match=r"divisible by 2 \* train\.context_parallel"):
        setup(cfg)


@pytest.mark.parametrize(
    ("device", "cuda_available", "backend"),
    [
        ("cuda", True, "nccl"),
        ("cuda:0", True, "nccl"),
        ("cuda:3", True, "nccl"),
        ("auto", True, "nccl"),
        ("auto", False, "gloo"),
        ("cpu", True, "gloo"),
        ("mps", False, "gloo"),
    ],
)
def test_the_backend_follows_the_device_type(device, cuda_available, backend):
    assert backend_for(device, cuda_available=cuda_available) == backend
