"""``fraglm train --init-from RUN``: a new run from another run's weights and tokenizer."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fraglm.config import load_config
from fraglm.data.shards import load_run_tokenizer
from fraglm.data.tokenizer import TOKENIZER_FILE
from fraglm.runs import layout, pointers
from fraglm.training.trainer import Trainer, train

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_overrides) -> Path:
    """The tiny config trained for 10 steps on the sample corpus."""
    overrides = tiny_overrides(tmp_path_factory.mktemp("parent"), steps=10)
    return train(load_config(REPO_ROOT / "configs" / "tiny.yaml", overrides)).run_dir


@pytest.fixture
def child_args(tmp_path, qa_jsonl, tiny_overrides):
    """``child_args(*overrides)``: ``fraglm train`` arguments for a run on the Q&A corpus."""

    def args(*overrides: str) -> list[str]:
        items = tiny_overrides(
            tmp_path, "train.loss_on=answer", *overrides, name="child", corpus=qa_jsonl, steps=10
        )
        return ["train", "-c", REPO_ROOT / "configs" / "tiny.yaml"] + [
            arg for item in items for arg in ("--set", item)
        ]

    return args


def test_child_starts_from_the_parents_best_weights_and_tokenizer(
    parent, tmp_path, qa_jsonl, tiny_overrides
):
    cfg = load_config(
        REPO_ROOT / "configs" / "tiny.yaml",
        tiny_overrides(
            tmp_path,
            f"train.init_from={json.dumps(str(parent))}",
            name="child",
            corpus=qa_jsonl,
            steps=10,
        ),
    )
    trainer = Trainer(cfg)
    best = load_file(pointers.checkpoint_dir(parent, "best") / layout.WEIGHTS_FILE)
    own = trainer.model.state_dict()
    assert all(torch.equal(own[name], best[name]) for name in best)
    # the child's corpus is encoded with the parent's tokenizer, not a new one
    parent_tokenizer = (parent / TOKENIZER_FILE).read_text(encoding="utf-8")
    assert (
        load_run_tokenizer(cfg.data.tokenized_dir).to_str() == load_run_tokenizer(parent).to_str()
    )
    assert (trainer.run_dir / TOKENIZER_FILE).read_text(encoding="utf-8") == parent_tokenizer


def test_init_from_through_the_cli_records_the_parent(parent, tmp_path, run_cli, child_args):
    result = run_cli(*child_args(), "--init-from", parent, "--steps", "4")
    assert result.exit_code == 0, result.stderr
    assert f"initialised from {pointers.checkpoint_dir(parent, 'best')}" in result.stdout
    saved = layout.load_run_config(tmp_path / "child")
    assert saved.train.init_from == str(parent) and saved.train.loss_on == "answer"
    # resume continues the child (weights from its own checkpoint, tokenizer from its run dir)
    resumed = run_cli(*child_args(), "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert "trained to step 10" in resumed.stdout and "initialised from" not in resumed.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.d_model=64", "model.d_model is 32 there but 64 in the config"),
        ("model.qk_norm=true", "model.qk_norm is False there but True in the config"),
        ("tokenizer.vocab_size=600", "tokenizer.vocab_size is 512 there but 600 in the config"),
    ],
)
def test_init_from_refuses_another_shape_or_tokenizer(
    parent, tmp_path, run_cli, child_args, override, message
):
    result = run_cli(*child_args(override), "--init-from", parent)
    result.assert_user_error(f"cannot initialise from {parent}: {message}")
    assert result.stderr.strip() == result.error
    assert not (tmp_path / "child" / layout.CONFIG_FILE).exists()  # nothing of a run written
    assert not (tmp_path / "tokens-child").exists()


def test_init_from_input_errors(parent, tmp_path, run_cli, child_args):
    run_cli(*child_args(), "--init-from", tmp_path / "nowhere").assert_user_error("run not found")
    run_cli(*child_args(), "--init-from", parent, "--resume").assert_user_error(
        "--init-from starts a new run; --resume continues one"
    )
    into_parent = child_args(f"train.out_dir={json.dumps(str(parent))}")
    run_cli(*into_parent, "--init-from", parent).assert_user_error("already holds a trained run")
