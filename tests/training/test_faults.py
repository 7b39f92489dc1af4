"""A hostile user's faults against a real run: damaged checkpoints, broken pointers, a second
writer, a full disk during each kind of save and during tokenize, bad sampling inputs.

Every fault is one line on stderr with exit code 2, leaves the run directory as it was, and
the run then continues from its last good checkpoint with the loss curve of a run that
never met the fault.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fraglm.config import load_config
from fraglm.data.shards import tokenize
from fraglm.runs import checkpoint as ckpt
from fraglm.runs import layout, pointers
from fraglm.training.tracking import read_metrics
from fraglm.training.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "data" / "sample_health_qa.jsonl"
OVERRIDES = [
    "tokenizer.vocab_size=400",
    "model.context_length=32",
    "model.fragment_size=8",
    "train.batch_size=4",
    "train.max_steps=8",
    "train.eval_interval=3",
    "train.eval_batches=1",
    "train.save_interval=3",
    "logging.log_interval=1",
    "logging.progress=false",
]


def write_config(path: Path, tokenized: Path, out_dir: Path) -> Path:
    cfg = load_config(
        REPO_ROOT / "configs" / "tiny.yaml",
        [
            *OVERRIDES,
            f"data.path={json.dumps(str(SAMPLE))}",
            f"data.tokenized_dir={json.dumps(str(tokenized))}",
            f"train.out_dir={json.dumps(str(out_dir))}",
        ],
    )
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    return path


def train_losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run_dir) if "train_loss" in r]


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenized sample corpus, a config for it, the loss curve of 8 uninterrupted steps and
    a run stopped after 4 (checkpoints at steps 3 and 4); tests copy, never edit them."""
    root = tmp_path_factory.mktemp("faults")
    tokenized = root / "tokenized"
    config = write_config(root / "config.yaml", tokenized, root / "whole")
    tokenize(load_config(config), progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config(config)).run()
        half = write_config(root / "half.yaml", tokenized, root / "half")
        Trainer(load_config(half)).run(max_new_steps=4)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "tokenized": tokenized, "whole": train_losses(root / "whole")}


@pytest.fixture
def run(world, tmp_path):
    """A copy of the 4-step run and its config: ``(run_dir, config)``."""
    run_dir = Path(shutil.copytree(world["root"] / "half", tmp_path / "run"))
    return run_dir, write_config(tmp_path / "config.yaml", world["tokenized"], run_dir)


def one_line(result, *fragments: str) -> None:
    result.assert_user_error(*fragments)
    assert result.stderr.strip() == result.error, result.stderr


# damaged checkpoints and pointers


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _nan_weights(step_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(step_dir / layout.WEIGHTS_FILE)
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, step_dir / layout.WEIGHTS_FILE)


DAMAGE = {
    "flipped-weights": (lambda d: _flip(d / layout.WEIGHTS_FILE), "SHA-256 differs"),
    "flipped-state": (lambda d: _flip(d / layout.STATE_FILE), "SHA-256 differs"),
    "truncated-state": (
        lambda d: (d / layout.STATE_FILE).write_bytes((d / layout.STATE_FILE).read_bytes()[:999]),
        "truncated or overwritten",
    ),
    "nan-weights": (_nan_weights, "is damaged"),
    "nan-weights-resigned": (
        lambda d: (_nan_weights(d), ckpt.write_manifest(d, 4)),
        "holds non-finite weights",
    ),
    "wrong-types-resigned": (
        lambda d: (torch.save({"step": [4]}, d / layout.STATE_FILE), ckpt.write_manifest(d, 4)),
        "is malformed",
    ),
}


@pytest.mark.parametrize(("damage", "expected"), DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_checkpoint_is_refused_and_the_run_goes_on_from_the_last_good(
    world, run, run_cli, damage, expected
):
    run_dir, config = run
    damage(run_dir / "step-0000004")
    before = snapshot(run_dir)
    resumed = run_cli("train", "-c", config, "--resume")
    one_line(resumed, expected, "step-0000004", "--resume-from step-0000003")
    one_line(run_cli("train", "-c", config), "already holds a trained run", "--overwrite")
    if damage in (DAMAGE["flipped-weights"][0], _nan_weights) or "non-finite" in expected:
        one_line(run_cli("eval", "--run", run_dir, "--checkpoint", "latest"), "step-0000004")
        one_line(
            run_cli("generate", "Hi?", "--run", run_dir, "--checkpoint", "latest"), "step-0000004"
        )
    assert snapshot(run_dir) == before  # nothing written into the run

    fallback = run_cli("train", "-c", config, "--resume-from", "step-0000003")
    assert fallback.exit_code == 0, fallback.stderr
    assert "resuming from" in fallback.stdout and "step-0000003 (step 3)" in fallback.stdout
    assert train_losses(run_dir) == world["whole"]


POINTERS = {
    "garbled": (lambda d: (d / "latest.json").write_text('{"dir": "st'), "not valid JSON"),
    "number": (lambda d: (d / "latest.json").write_text("4"), "a JSON int"),
    "list": (lambda d: (d / "latest.json").write_text('["step-0000004"]'), "a JSON list"),
    "elsewhere": (
        lambda d: (d / "latest.json").write_text('{"dir": "../half", "step": 4}'),
        "not a step-NNNNNNN",
    ),
    "deleted": (lambda d: (d / "latest.json").unlink(), "cannot resume: no checkpoint"),
    "best-garbled": (lambda d: (d / "best.json").write_text("null"), "best.json is broken"),
}


@pytest.mark.parametrize(("damage", "expected"), POINTERS.values(), ids=POINTERS.keys())
def test_a_broken_pointer_is_named_and_nothing_is_destroyed(world, run, run_cli, damage, expected):
    run_dir, config = run
    damage(run_dir)
    before = snapshot(run_dir)
    one_line(run_cli("train", "-c", config, "--resume"), expected, "--resume-from step-0000004")
    # a plain train (no --resume) must never start over a run whose pointers are broken
    one_line(run_cli("train", "-c", config), "already holds a trained run")
    assert snapshot(run_dir) == before
    fallback = run_cli("train", "-c", config, "--resume-from", "step-0000004")
    assert fallback.exit_code == 0, fallback.stderr
    assert train_losses(run_dir) == world["whole"]


def test_overwrite_starts_over(world, run, run_cli):
    run_dir, config = run
    result = run_cli("train", "-c", config, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert train_losses(run_dir) == world["whole"]


# a second writer

HOLD = """
import sys, time
from fraglm.storage import locks
lock = locks.lock_run(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_with_the_holder_named(world, run, run_cli):
    run_dir, config = run
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run_dir)
        for args in (["--resume"], [], ["--overwrite"]):
            one_line(run_cli("train", "-c", config, *args), "is in use", f"pid {holder.pid}")
        assert snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait(timeout=30)
    resumed = run_cli("train", "-c", config, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert train_losses(run_dir) == world["whole"]


# a full disk (a file-size limit) during each kind of save

LIMITED = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.argv = ["fraglm", *sys.argv[2:]]
from fraglm.cli.app import main
main()
"""


def run_limited(limit: int, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LIMITED, str(limit), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def assert_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def no_temporaries(root: Path) -> None:
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name], list(root.rglob("*"))


def _size(*parts: str):
    return lambda run_dir: run_dir.joinpath(*parts).stat().st_size


SAVES = [  # each limit lets the files before the one named be written, not that one
    pytest.param(_size("step-0000004", layout.STATE_FILE), -1, "state.pt", id="state"),
    pytest.param(
        _size("step-0000004", layout.WEIGHTS_FILE), -1, "model.safetensors", id="weights",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        _size(layout.METRICS_FILE), 20, "metrics.jsonl", id="metrics", marks=pytest.mark.slow
    ),
]  # fmt: skip


@pytest.mark.parametrize(("size_of", "offset", "file_name"), SAVES)
def test_a_full_disk_during_a_save_stops_cleanly_and_the_run_resumes(
    world, run, run_cli, size_of, offset, file_name
):
    run_dir, config = run
    lines_before = (run_dir / layout.METRICS_FILE).read_text()
    result = run_limited(size_of(run_dir) + offset, "train", "-c", config, "--resume")
    assert_one_line(result, "could not", file_name, "File too large")
    no_temporaries(run_dir)
    assert pointers.read_pointer(run_dir, "latest")["step"] == 4
    metrics = (run_dir / layout.METRICS_FILE).read_text()
    assert metrics.startswith(lines_before) and metrics.endswith("\n")  # earlier lines whole
    assert all(json.loads(line) for line in metrics.splitlines())
    resumed = run_cli("train", "-c", config, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert train_losses(run_dir) == world["whole"]


@pytest.mark.slow
def test_a_full_disk_while_writing_the_config_of_a_new_run(world, tmp_path, run_cli):
    run_dir = tmp_path / "new"
    config = write_config(tmp_path / "config.yaml", world["tokenized"], run_dir)
    assert_one_line(run_limited(500, "train", "-c", config), "config.yaml", "File too large")
    assert list(run_dir.iterdir()) == []
    fresh = run_cli("train", "-c", config)
    assert fresh.exit_code == 0, fresh.stderr
    assert train_losses(run_dir) == world["whole"]


def test_a_full_disk_during_tokenize_keeps_the_previous_shards(world, tmp_path):
    tokenized = Path(shutil.copytree(world["tokenized"], tmp_path / "tokenized"))
    config = write_config(tmp_path / "config.yaml", tokenized, tmp_path / "unused")
    before = snapshot(tokenized)
    limit = (tokenized / "train.bin").stat().st_size - 1
    assert (tokenized / "tokenizer.json").stat().st_size < limit  # the shard is what fails
    result = run_limited(limit, "tokenize", "-c", config)
    assert_one_line(result, "could not write", "train.bin", "File too large")
    assert snapshot(tokenized) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "tokenized"]


# sampling inputs


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--temperature", "1e-45"], "must be 0 (greedy) or at least 0.01"),
        (["--temperature", "inf"], "must be a finite number"),
        (["--seed", "1000000000000000000000000000000"], "sample.seed"),
        (["--seed", "-1"], "sample.seed"),
        (["--device", "bogus"], "device 'bogus' is not one of auto, cpu, cuda"),
        (["--top-p", "nan"], "must be a finite number"),
    ],
)
def test_sampling_inputs_are_checked(run, run_cli, args, expected):
    run_dir, _ = run
    one_line(run_cli("generate", "Hi?", "--run", run_dir, *args), expected)


def test_a_prompts_file_that_is_not_utf8(run, run_cli, tmp_path):
    run_dir, _ = run
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("first question\nsecond: caf\xe9\n".encode("latin-1"))
    one_line(
        run_cli("generate", "--prompts-file", prompts, "--run", run_dir),
        f"prompts file {prompts} is not UTF-8 text (line 2)",
    )
