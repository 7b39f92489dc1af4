"""Training end to end on the sample corpus: learning, exact resume, Ctrl-C, wandb, bad inputs."""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fraglm.config import Config, apply_overrides, from_dict
from fraglm.data.shards import tokenize
from fraglm.data.tokenizer import TOKENIZER_FILE
from fraglm.device import Precision
from fraglm.runs import layout, pointers
from fraglm.training import trainer as train_module
from fraglm.training.tracking import read_metrics
from fraglm.training.trainer import Trainer

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample_health_qa.jsonl"

# A tiny model on the project's sample corpus: a step takes milliseconds, so every test
# below trains for real, from a fresh clone.
BASE: dict[str, dict[str, Any]] = {
    "data": {"path": str(SAMPLE), "val_fraction": 0.1, "num_proc": 1},
    "tokenizer": {"vocab_size": 500},
    "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "context_length": 32, "fragment_size": 8},
    "train": {
        "batch_size": 4,
        "max_steps": 8,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_interval": 3,
        "eval_batches": 2,
        "save_interval": 3,
    },
    "logging": {"log_interval": 1, "progress": False},
}


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    """The sample corpus tokenized once for the whole module (read-only for the tests)."""
    out = tmp_path_factory.mktemp("sample") / "tokenized"
    tokenize(make_config(out, out.parent / "unused"), progress=False)
    return out


def make_config(tokenized: Path, out_dir: Path, *overrides: str) -> Config:
    raw = {**BASE, "data": {**BASE["data"], "tokenized_dir": str(tokenized)}}
    raw["train"] = {**BASE["train"], "out_dir": str(out_dir)}
    return from_dict(apply_overrides(raw, list(overrides)))


def write_config(path: Path, cfg: Config) -> Path:
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    return path


def set_args(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def train_losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run_dir) if "train_loss" in r]


def val_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]


def latest_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(pointers.checkpoint_dir(run_dir, "latest") / layout.WEIGHTS_FILE)


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit code 2, nothing on stderr but ``error: ...``, no traceback."""
    result.assert_user_error(*fragments)
    assert result.stderr.strip() == result.error, result.stderr


@pytest.fixture(scope="module")
def trained(tokenized, tmp_path_factory) -> Path:
    """A run directory after 4 steps (checkpoints at 3 and 4); tests copy it, never edit it."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(make_config(tokenized, run_dir)).run(max_new_steps=4)
    finally:
        torch.set_num_threads(before)
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


# learning


def test_loss_falls_from_chance(tokenized, tmp_path):
    cfg = make_config(
        tokenized,
        tmp_path / "run",
        "model.context_length=64",
        "train.batch_size=8",
        "train.max_steps=80",
        "train.lr=1e-2",
        "train.warmup_steps=5",
        "train.eval_interval=1000",
        "train.save_interval=1000",
        "train.eval_batches=4",
    )
    trainer = Trainer(cfg)
    initial = trainer.evaluate()
    assert initial == pytest.approx(math.log(trainer.vocab_size), abs=0.15)  # chance level
    result = trainer.run()
    final = trainer.evaluate()
    assert result.steps == 80 and result.best_val_loss == pytest.approx(final)
    assert final < initial - 1.0, (initial, final)
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 80 and sum(losses[-10:]) < sum(losses[:10]) - 5.0


def test_the_model_runs_the_plans_attention_and_the_run_keeps_the_configs(tokenized, tmp_path):
    trainer = Trainer(make_config(tokenized, tmp_path / "run"))
    trainer.close()
    assert trainer.plan.attention == "torch" and trainer.model.cfg.fragment_impl == "torch"
    saved = yaml.safe_load((tmp_path / "run" / layout.CONFIG_FILE).read_text(encoding="utf-8"))
    assert trainer.cfg.model.fragment_impl == saved["model"]["fragment_impl"] == "auto"


@pytest.mark.parametrize("backend", ["fragment", "sdpa"])
def test_a_step_waits_for_the_device_once(tokenized, tmp_path, op_log, backend):
    """Micro-batches, loss and clipping queue without waiting; the step's loss is read once."""
    cfg = make_config(
        tokenized, tmp_path / "run", "train.grad_accum=2", f"model.attention={backend}"
    )
    trainer = Trainer(cfg)
    with op_log() as log:
        trainer.train_step()
    assert log.host_syncs == ["aten._local_scalar_dense.default"]


@pytest.mark.slow
def test_compiled_training_matches_eager(tokenized, tmp_path):
    overrides = ("train.max_steps=3", "train.eval_interval=1000", "train.save_interval=1000")
    Trainer(make_config(tokenized, tmp_path / "eager", *overrides)).run()
    compiled = Trainer(
        make_config(tokenized, tmp_path / "compiled", "train.compile=true", *overrides)
    )
    assert compiled.forward_model is not compiled.model  # the torch.compile wrapper
    compiled.run()
    eager_losses, compiled_losses = (
        train_losses(tmp_path / "eager"),
        train_losses(tmp_path / "compiled"),
    )
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)


# exact resume


RESUME_CASES = {
    "plain": (),
    "dropout": ("model.dropout=0.2",),
    "bf16 autocast": ("train.precision=bf16",),
    "accumulation, document mask, answer loss": (
        "train.grad_accum=2",
        "train.doc_mask=true",
        "train.loss_on=answer",
    ),
    "muon, qk-norm, untied, zero-initialised projections, wsd": (
        "train.optimizer=muon",
        "model.qk_norm=true",
        "model.tie_embeddings=false",
        "model.zero_init_out=true",
        "train.schedule=wsd",
    ),
}


@pytest.mark.parametrize("overrides", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_resume_continues_bit_identically(tokenized, tmp_path, overrides):
    """8 steps in one go == 4 steps + resume for 4 (evaluations at 3 and 6 on both sides)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    Trainer(make_config(tokenized, whole, *overrides)).run()
    Trainer(make_config(tokenized, split, *overrides)).run(max_new_steps=4)
    assert len(train_losses(split)) == 4
    Trainer(make_config(tokenized, split, *overrides), resume=True).run()

    assert len(train_losses(whole)) == 8
    assert train_losses(split) == train_losses(whole)  # exact float equality
    assert val_losses(split) == val_losses(whole)
    assert [step for step, _ in val_losses(whole)] == [3, 6, 8]
    a, b = latest_weights(whole), latest_weights(split)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_resume_through_the_cli(tokenized, tmp_path, run_cli):
    whole, split = tmp_path / "whole", tmp_path / "split"
    Trainer(make_config(tokenized, whole)).run()
    config = write_config(tmp_path / "cfg.yaml", make_config(tokenized, split))

    first = run_cli("train", "-c", config, "--steps", "4")
    assert first.exit_code == 0, first.stderr
    assert "trained to step 4" in first.stdout
    refused = run_cli("train", "-c", config)
    assert_one_line_error(refused, "already holds a trained run", "--resume")
    second = run_cli("train", "-c", config, "--resume")
    assert second.exit_code == 0, second.stderr
    assert "trained to step 8" in second.stdout

    assert train_losses(split) == train_losses(whole)
    a, b = latest_weights(whole), latest_weights(split)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_resume_with_another_optimizer(tokenized, run_copy, tmp_path, run_cli):
    config = write_config(tmp_path / "cfg.yaml", make_config(tokenized, run_copy))
    assert_one_line_error(
        run_cli("train", "-c", config, "--resume", *set_args("train.optimizer=muon")),
        "was saved with another train.optimizer than the config's",
    )


def test_a_resume_hashes_the_corpus_once(tokenized, run_copy, monkeypatch):
    """The resume check's corpus fingerprint is the one compared with the shards'."""
    from fraglm.data.corpus import corpus_fingerprint

    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return corpus_fingerprint(*args, **kwargs)

    for module in list(sys.modules.values()):  # every fraglm module that holds the function
        name = getattr(module, "__name__", "")
        if (
            name.startswith("fraglm.")
            and vars(module).get("corpus_fingerprint") is corpus_fingerprint
        ):
            monkeypatch.setattr(module, "corpus_fingerprint", counting)
    Trainer(make_config(tokenized, run_copy), resume=True).close()
    assert len(calls) == 1


# early stopping


def test_early_stopping_stops_at_the_right_evaluation_and_keeps_the_best(
    tokenized, tmp_path, run_cli, monkeypatch
):
    """Validation losses 5, 4, 4.5, 4.2, ...: with patience 2 the run stops at the 4th
    evaluation (step 12), and its best checkpoint is the model of step 6."""
    scripted = itertools.chain([5.0, 4.0, 4.5, 4.2], itertools.repeat(4.5))
    monkeypatch.setattr(Trainer, "evaluate", lambda self: next(scripted))
    settings = ("train.max_steps=30", "train.save_interval=100")
    cfg = make_config(tokenized, tmp_path / "run", *settings, "train.early_stopping_patience=2")
    config = write_config(tmp_path / "cfg.yaml", cfg)

    result = run_cli("train", "-c", config)
    assert result.exit_code == 0, result.stderr
    assert "early stopping at step 12: validation loss has not improved for 2 evaluations; " \
        "best 4.0000 at step 6" in result.stdout  # fmt: skip
    assert "trained to step 12" in result.stdout
    assert [step for step, _ in val_losses(tmp_path / "run")] == [3, 6, 9, 12]
    assert pointers.read_pointer(tmp_path / "run", "best")["step"] == 6
    assert pointers.read_pointer(tmp_path / "run", "latest")["step"] == 12
    Trainer(make_config(tokenized, tmp_path / "six", *settings)).run(max_new_steps=6)
    best = load_file(pointers.checkpoint_dir(tmp_path / "run", "best") / layout.WEIGHTS_FILE)
    six = latest_weights(tmp_path / "six")
    assert all(torch.equal(best[name], six[name]) for name in six)

    again = run_cli("train", "-c", config, "--resume")
    assert again.exit_code == 0, again.stderr
    assert "nothing to do: the run stopped early at step 12" in again.stdout
    assert pointers.read_pointer(tmp_path / "run", "latest")["step"] == 12
    onward = run_cli(
        "train", "-c", config, "--resume", *set_args("train.early_stopping_patience=0")
    )
    assert onward.exit_code == 0, onward.stderr
    assert "trained to step 30" in onward.stdout
    assert pointers.read_pointer(tmp_path / "run", "best")["step"] == 6


# Ctrl-C


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_finishes(tokenized, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    cfg = make_config(tokenized, run_dir, "train.max_steps=100000", "train.save_interval=5")
    config = write_config(tmp_path / "cfg.yaml", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fraglm", "train", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "latest.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err
    match = re.search(r"interrupted at step (\d+): checkpoint saved", out + err)
    assert match, (out, err)
    step = int(match.group(1))
    assert pointers.read_pointer(run_dir, "latest")["step"] == step
    assert [r["step"] for r in read_metrics(run_dir) if "train_loss" in r] == list(
        range(1, step + 1)
    )

    resumed = run_cli("train", "-c", config, "--resume", "--steps", "3")
    assert resumed.exit_code == 0, resumed.stderr
    assert f"trained to step {step + 3}" in resumed.stdout
    assert len(train_losses(run_dir)) == step + 3


# wandb


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics(tokenized, tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)  # the config alone must keep it offline
    run_dir = tmp_path / "run"
    cfg = make_config(
        tokenized,
        run_dir,
        "train.max_steps=3",
        "logging.wandb=true",
        "logging.wandb_mode=offline",
        "logging.wandb_project=fraglm-tests",
    )
    Trainer(cfg).run()
    wandb.teardown()  # finish() may return before wandb's writer process has flushed
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1, list((run_dir / "wandb").iterdir())
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    records = offline_runs[0] / f"run-{run_id}.wandb"
    data = records.read_bytes()
    for name in ("train_loss", "val_loss", "tokens_per_s", "lr"):
        assert name.encode() in data, name
    assert len(train_losses(run_dir)) == 3 and val_losses(run_dir)[-1][0] == 3


# checkpoints that must not load


def test_resume_with_corrupt_weights(tokenized, run_copy, tmp_path, run_cli):
    weights = pointers.checkpoint_dir(run_copy) / layout.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    config = write_config(tmp_path / "cfg.yaml", make_config(tokenized, run_copy))
    assert_one_line_error(run_cli("train", "-c", config, "--resume"), "is damaged", str(weights))


def test_resume_with_another_model_shape(tokenized, run_copy, tmp_path, run_cli):
    config = write_config(tmp_path / "cfg.yaml", make_config(tokenized, run_copy))
    assert_one_line_error(
        run_cli("train", "-c", config, "--resume", *set_args("model.d_model=64")),
        "cannot resume: model.d_model is 32 in the checkpoint but 64",
    )
    # the schedule may change on resume
    longer = run_cli("train", "-c", config, "--resume", *set_args("train.max_steps=5"))
    assert longer.exit_code == 0, longer.stderr
    assert "trained to step 5" in longer.stdout


def test_resume_after_a_corpus_change_is_refused(tmp_path, run_cli):
    corpus = Path(shutil.copy(SAMPLE, tmp_path / "corpus.jsonl"))
    tokenized = tmp_path / "tokenized"
    cfg = make_config(tokenized, tmp_path / "run", f"data.path={corpus}")
    config = write_config(tmp_path / "cfg.yaml", cfg)
    assert run_cli("train", "-c", config, "--steps", "3").exit_code == 0
    shards = {p.name: p.read_bytes() for p in tokenized.iterdir()}
    with corpus.open("a", encoding="utf-8") as fh:
        fh.write('{"question": "What is new?", "answer": "This record."}\n')
    assert_one_line_error(
        run_cli("train", "-c", config, "--resume"),
        f"cannot resume: the corpus {corpus} or a data.* setting changed since",
        "another train.out_dir",
    )
    # refused before tokenizing: the shards the run was trained on are still there
    assert {p.name: p.read_bytes() for p in tokenized.iterdir()} == shards
    assert_one_line_error(
        run_cli("train", "-c", config, "--resume", *set_args("data.val_fraction=0.2")),
        "a data.* setting changed",
    )


def test_resume_with_another_tokenizer_is_refused(tokenized, run_copy, tmp_path, run_cli):
    """A tokenized directory whose tokenizer is not the run's (made again, or replaced)."""
    run_tokenizer = run_copy / TOKENIZER_FILE
    run_tokenizer.write_text(run_tokenizer.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    config = write_config(tmp_path / "cfg.yaml", make_config(tokenized, run_copy))
    assert_one_line_error(
        run_cli("train", "-c", config, "--resume"),
        f"cannot resume: {tokenized / TOKENIZER_FILE} is not the tokenizer",
    )


def test_resume_without_a_checkpoint(tokenized, tmp_path, run_cli):
    config = write_config(tmp_path / "cfg.yaml", make_config(tokenized, tmp_path / "empty"))
    assert_one_line_error(
        run_cli("train", "-c", config, "--resume"), "cannot resume: no checkpoint", "empty"
    )


# training that must stop


def test_context_longer_than_the_training_tokens(tokenized, tmp_path, run_cli):
    cfg = make_config(tokenized, tmp_path / "run", "model.context_length=1000000")
    result = run_cli("train", "-c", write_config(tmp_path / "cfg.yaml", cfg))
    assert_one_line_error(result, "training split has", "model.context_length = 1000000")
    assert not pointers.has_checkpoint(tmp_path / "run")


def test_exploding_learning_rate_stops_and_keeps_finite_weights(tokenized, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    cfg = make_config(
        tokenized,
        run_dir,
        "train.lr=1e30",
        "train.warmup_steps=0",
        "train.save_interval=1",
        "train.max_steps=50",
    )
    result = run_cli("train", "-c", write_config(tmp_path / "cfg.yaml", cfg))
    assert_one_line_error(result, "non-finite", "lower train.lr")
    assert pointers.has_checkpoint(run_dir)  # step 1 was still fine, and saved
    for name, tensor in latest_weights(run_dir).items():
        assert tensor.isfinite().all(), name


def test_non_finite_loss_keeps_the_last_good_checkpoint(run_copy, tokenized, monkeypatch, tmp_path):
    before = latest_weights(run_copy)
    real = train_module.token_loss_sum

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        return real(*args, **kwargs) * float("nan")

    monkeypatch.setattr(train_module, "token_loss_sum", poisoned)
    trainer = Trainer(make_config(tokenized, run_copy, "train.save_interval=1"), resume=True)
    with pytest.raises(train_module.FraglmError, match="non-finite at step 4"):
        trainer.run()
    assert pointers.read_pointer(run_copy, "latest")["step"] == 4
    after = latest_weights(run_copy)
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.fixture
def p100_precision(monkeypatch):
    """The P100's path, fp16 autocast + GradScaler, on the CPU (which runs it, slowly; the
    trainer refuses fp16 on a CPU only because it is no use there)."""
    fp16 = Precision("fp16", torch.float16, use_scaler=True)
    cpu_plan = train_module.plan_device
    monkeypatch.setattr(
        train_module, "plan_device", lambda *args: replace(cpu_plan(*args), precision=fp16)
    )


def test_resume_with_grad_scaler_continues_bit_identically(tokenized, tmp_path, p100_precision):
    whole, split = tmp_path / "whole", tmp_path / "split"
    Trainer(make_config(tokenized, whole)).run()
    Trainer(make_config(tokenized, split)).run(max_new_steps=4)
    resumed = Trainer(make_config(tokenized, split), resume=True)
    assert resumed.scaler.state_dict()["_growth_tracker"] == 4  # restored, not fresh
    resumed.run()
    assert train_losses(split) == train_losses(whole) and len(train_losses(whole)) == 8
    assert val_losses(split) == val_losses(whole)
    a, b = latest_weights(whole), latest_weights(split)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_non_finite_loss_under_grad_scaler_skips_the_step(
    tokenized, tmp_path, monkeypatch, p100_precision
):
    trainer = Trainer(make_config(tokenized, tmp_path / "run", "train.grad_clip=1.0"))
    trainer.train_step()
    scale = trainer.scaler.get_scale()
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    real = train_module.token_loss_sum
    monkeypatch.setattr(
        train_module, "token_loss_sum", lambda *a, **kw: real(*a, **kw) * float("inf")
    )
    assert math.isinf(trainer.train_step())  # no error: the scaler skips the step
    assert trainer.step == 2 and trainer.scaler.get_scale() == scale / 2
    assert all(torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
    monkeypatch.setattr(train_module, "token_loss_sum", real)
    assert math.isfinite(trainer.train_step())
    assert not all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_fp16_steps_skipped_in_a_row_stop_the_run(tokenized, tmp_path, monkeypatch, p100_precision):
    """A model that overflows at every loss scale stops with a message, not after
    max_steps of skipped steps, and its checkpoint keeps the last good weights."""
    real = train_module.token_loss_sum
    monkeypatch.setattr(
        train_module, "token_loss_sum", lambda *a, **kw: real(*a, **kw) * float("inf")
    )
    run_dir = tmp_path / "run"
    trainer = Trainer(
        make_config(tokenized, run_dir, "train.max_steps=100", "train.max_skipped_steps=3")
    )
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with pytest.raises(train_module.FraglmError, match="last 3 steps were skipped") as error:
        trainer.run()
    assert "stopped at step 3" in str(error.value) and "\n" not in str(error.value)
    assert trainer.step == 3  # steps 0, 1 and 2 skipped, the third seen at step 3's loss
    assert pointers.read_pointer(run_dir, "latest")["step"] == 3
    saved = latest_weights(run_dir)
    assert all(torch.equal(saved[name], p) for name, p in initial.items())


def test_config_in_the_run_dir_is_the_resolved_config(trained):
    saved = yaml.safe_load((trained / layout.CONFIG_FILE).read_text(encoding="utf-8"))
    assert saved["model"]["d_model"] == 32 and saved["train"]["out_dir"] == str(trained)
    assert (trained / TOKENIZER_FILE).is_file()
