"""`fraglm attention`: heatmaps drawn from the model's own attention weights."""

from pathlib import Path

import pytest
import torch

from fraglm.config import load_config
from fraglm.runs.loading import load_run
from fraglm.tools.inspect_attention import prompt_attention
from fraglm.training.trainer import train

pytest.importorskip("matplotlib")
from PIL import Image  # matplotlib brings pillow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("attn")
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        [
            f"data.path={ROOT / 'data/sample_health_qa.jsonl'}",
            f"data.tokenized_dir={tmp / 'tokens'}",
            f"train.out_dir={tmp / 'run'}",
            "train.max_steps=10",
            "logging.progress=false",
        ],
    )
    return train(cfg).run_dir


def test_weights_are_causal_distributions(run_dir):
    run = load_run(run_dir, device="cpu")
    labels, weights = prompt_attention(run, "<|Q|>I have a headache and a fever<|A|>")
    n_layers, n_heads = run.cfg.model.n_layers, run.cfg.model.n_heads
    assert weights.shape == (n_layers, n_heads, len(labels), len(labels))
    assert labels[0] == "<|Q|>" and labels[-1] == "<|A|>"
    torch.testing.assert_close(weights.sum(-1), torch.ones(n_layers, n_heads, len(labels)))
    assert weights.triu(1).abs().max() == 0  # no query looks at a later token


def test_heatmap_and_grid_are_real_images(run_dir, run_cli, tmp_path):
    single, grid = tmp_path / "one.png", tmp_path / "grid.png"
    assert (
        run_cli("attention", "I have a headache", "--run", run_dir, "--out", single).exit_code == 0
    )
    result = run_cli(
        "attention", "I have a headache", "--run", run_dir, "--layer", "all", "--head", "all",
        "--out", grid,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    one, many = Image.open(single), Image.open(grid)
    assert one.format == many.format == "PNG"
    assert many.width > 2 * one.width and many.height > one.height  # 4 heads x 2 layers
    assert len(one.convert("RGB").getcolors(maxcolors=1 << 16) or range(1000)) > 50


def test_bad_layer_and_head(run_dir, run_cli, tmp_path):
    out = tmp_path / "x.png"
    run_cli("attention", "hi", "--run", run_dir, "--layer", "9", "--out", out).assert_user_error(
        "--layer 9 does not exist"
    )
    run_cli("attention", "hi", "--run", run_dir, "--head", "x", "--out", out).assert_user_error(
        "--head must be a number or 'all'"
    )
    assert not out.exists()
