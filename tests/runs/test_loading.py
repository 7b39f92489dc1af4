"""Finding and loading a run directory: --run NAME or the most recent, best or latest."""

import json
import os
from pathlib import Path

import pytest
import torch

from fraglm.config import TokenizerConfig, load_config
from fraglm.data.tokenizer import load_tokenizer, train_tokenizer, vocab_size
from fraglm.errors import FraglmError
from fraglm.nn.model import Transformer
from fraglm.runs import checkpoint as ckpt
from fraglm.runs import layout
from fraglm.runs.loading import find_run, load_run

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, qa_documents) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer(qa_documents, TokenizerConfig(vocab_size=300), progress=False).save(str(path))
    return path


def make_run(run: Path, tokenizer_file: Path, *, best: int = 1, latest: int = 2) -> Path:
    """A run directory with untrained weights (seeded by the step) at steps ``best`` and
    ``latest``, pointed to by best.json and latest.json."""
    cfg = load_config(
        REPO_ROOT / "configs" / "tiny.yaml", [f"train.out_dir={json.dumps(str(run))}"]
    )
    layout.write_run_files(run, cfg, tokenizer_file)
    n_vocab = vocab_size(load_tokenizer(tokenizer_file))
    for step in sorted({best, latest}):
        torch.manual_seed(step)
        pointers = ("latest", "best") if step == best else ("latest",)
        model = Transformer(cfg.model, n_vocab)
        ckpt.save_checkpoint(run, model, {"step": step}, step=step, pointers=pointers)
    return run


def test_the_most_recent_run_is_the_default(tmp_path, tokenizer_file):
    root = tmp_path / "checkpoints"
    old = make_run(root / "old", tokenizer_file)
    new = make_run(root / "new", tokenizer_file)
    os.utime(old / "latest.json", (1_000_000, 1_000_000))
    assert find_run(None, root) == new
    os.utime(new / "latest.json", (900_000, 900_000))
    assert find_run(None, root) == old


def test_a_run_is_named_by_path_or_by_name_under_the_root(tmp_path, tokenizer_file):
    root = tmp_path / "checkpoints"
    run = make_run(root / "tiny", tokenizer_file)
    assert find_run("tiny", root) == root / "tiny"
    assert find_run(str(run), root) == run


def test_missing_runs_are_one_line_errors(tmp_path):
    root = tmp_path / "checkpoints"
    with pytest.raises(FraglmError, match="no trained run found under"):
        find_run(None, root)
    root.mkdir()
    (root / "untrained").mkdir()  # a directory without latest.json is not a run
    with pytest.raises(FraglmError, match="no trained run found under"):
        find_run(None, root)
    with pytest.raises(FraglmError, match="run not found: nope"):
        find_run("nope", root)


def test_best_checkpoint_by_default_latest_on_request(tmp_path, tokenizer_file):
    run = make_run(tmp_path / "run", tokenizer_file, best=1, latest=2)
    best, latest = load_run(run, device="cpu"), load_run(run, which="latest", device="cpu")
    assert (best.step, latest.step) == (1, 2)
    assert not torch.equal(best.model.embed.weight, latest.model.embed.weight)
    assert not best.model.training
    assert best.tokenizer.get_vocab_size() == load_tokenizer(tokenizer_file).get_vocab_size()


def test_a_directory_that_is_not_a_run(tmp_path, tokenizer_file):
    with pytest.raises(FraglmError, match="is not a fraglm run directory"):
        load_run(tmp_path, device="cpu")
    run = make_run(tmp_path / "run", tokenizer_file)
    for pointer in ("latest.json", "best.json"):
        (run / pointer).unlink()
    with pytest.raises(FraglmError, match="no checkpoint in"):
        load_run(run, device="cpu")
