"""Atomic checkpoints and safe loading."""

import json
import os

import pytest
import torch
from torch import nn

from fraglm import checkpoint as ckpt
from fraglm.errors import FraglmError


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    model[1].weight = model[0].weight  # tied, as in the modern architecture
    return model


def _state(step: int) -> dict:
    return {"step": step, "rng": {"cpu": torch.get_rng_state()}, "best_val": 1.5}


def test_round_trip_of_weights_and_state(tmp_path):
    model = _model(0)
    ckpt.save_checkpoint(tmp_path, model, _state(5), step=5, pointers=("latest", "best"))
    loaded = _model(1)
    path = ckpt.checkpoint_dir(tmp_path, "best")
    ckpt.load_weights(loaded, path)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert ckpt.load_state(path)["step"] == 5


def test_old_checkpoints_are_removed_but_best_is_kept(tmp_path):
    ckpt.save_checkpoint(tmp_path, _model(0), _state(1), step=1, pointers=("latest", "best"))
    ckpt.save_checkpoint(tmp_path, _model(0), _state(2), step=2)
    ckpt.save_checkpoint(tmp_path, _model(0), _state(3), step=3)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000001", "step-0000003"]
    assert ckpt.checkpoint_dir(tmp_path, "best").name == "step-0000001"
    assert ckpt.checkpoint_dir(tmp_path, "latest").name == "step-0000003"


def test_a_failed_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _model(0), _state(1), step=1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, _model(1), _state(2), step=2)
    monkeypatch.undo()
    path = ckpt.checkpoint_dir(tmp_path, "latest")
    assert path.name == "step-0000001"
    ckpt.load_weights(_model(2), path)
    assert ckpt.load_state(path)["step"] == 1
    # the next successful save cleans up the half-written directory
    ckpt.save_checkpoint(tmp_path, _model(0), _state(3), step=3)
    assert not list(tmp_path.glob(".step-*"))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_state_never_runs_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt.save_checkpoint(tmp_path, _model(0), _state(1), step=1)
    path = ckpt.checkpoint_dir(tmp_path)
    torch.save({"step": 1, "payload": _Exploit()}, path / ckpt.STATE_FILE)
    with pytest.raises(FraglmError, match="corrupt or unsafe"):
        ckpt.load_state(path)
    assert not (tmp_path / "pwned").exists()


def test_corrupt_weights_are_a_clear_error(tmp_path):
    ckpt.save_checkpoint(tmp_path, _model(0), _state(1), step=1)
    path = ckpt.checkpoint_dir(tmp_path)
    (path / ckpt.WEIGHTS_FILE).write_bytes(b"\x00" * 20)
    with pytest.raises(FraglmError, match="corrupt"):
        ckpt.load_weights(_model(0), path)


def test_weights_of_another_shape_are_a_clear_error(tmp_path):
    ckpt.save_checkpoint(tmp_path, _model(0), _state(1), step=1)
    other = nn.Sequential(nn.Embedding(12, 4), nn.Linear(4, 12))
    with pytest.raises(FraglmError, match="corrupt or incompatible"):
        ckpt.load_weights(other, ckpt.checkpoint_dir(tmp_path))


def test_missing_checkpoint_and_dangling_pointer(tmp_path):
    with pytest.raises(FraglmError, match="no checkpoint"):
        ckpt.checkpoint_dir(tmp_path)
    (tmp_path / "latest.json").write_text(json.dumps({"dir": "step-0000009", "step": 9}))
    with pytest.raises(FraglmError, match="missing"):
        ckpt.checkpoint_dir(tmp_path)


def test_a_full_disk_is_a_one_line_error_and_keeps_the_previous(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _model(0), _state(1), step=1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(FraglmError, match="No space left on device; the previous checkpoint"):
        ckpt.save_checkpoint(tmp_path, _model(1), _state(2), step=2)
    assert ckpt.checkpoint_dir(tmp_path, "latest").name == "step-0000001"
