"""Training-curve plots from metrics.jsonl."""

import json
import math
import sys

import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # matplotlib brings pillow


def _run_dir(tmp_path, name, slope):
    run = tmp_path / name
    run.mkdir()
    lines = []
    for step in range(1, 41):
        tokens = step * 512
        lines.append({"step": step, "tokens": tokens, "train_loss": 6 - slope * math.log(step),
                      "lr": 1e-3 * min(1, step / 10)})  # fmt: skip
        if step % 10 == 0:
            val = 6.1 - slope * math.log(step)
            lines.append({"step": step, "tokens": tokens, "val_loss": val, "val_bpb": val / 3})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def test_plot_of_two_runs_is_a_real_png(tmp_path, run_cli):
    a, b = _run_dir(tmp_path, "a", 0.5), _run_dir(tmp_path, "b", 0.7)
    out = tmp_path / "curves.png"
    result = run_cli("plot", "--run", a, "--run", b, "--out", out)
    assert result.exit_code == 0, result.stderr
    image = Image.open(out)
    assert image.format == "PNG"
    assert image.width >= 2000 and image.height >= 300  # four panels side by side
    colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 50  # lines, text, markers: not a blank canvas
    assert out.stat().st_size > 20_000


def test_run_without_metrics_is_an_error(tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    result = run_cli("plot", "--run", tmp_path / "empty", "--out", tmp_path / "x.png")
    result.assert_user_error("has no metrics")
    assert not (tmp_path / "x.png").exists()


def test_missing_viz_extra_gives_an_install_hint(tmp_path, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    result = run_cli("plot", "--run", _run_dir(tmp_path, "a", 0.5), "--out", tmp_path / "c.png")
    result.assert_user_error('pip install -e ".[viz]"')
