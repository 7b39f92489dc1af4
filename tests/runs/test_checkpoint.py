"""Atomic checkpoints that verify themselves, strict pointers, and safe loading."""

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fraglm.errors import FraglmError
from fraglm.runs import checkpoint as ckpt
from fraglm.runs import layout, pointers, resume, verify


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    model[1].weight = model[0].weight  # tied, as in the modern architecture
    return model


def _state(step: int, model: nn.Module | None = None) -> dict:
    """A training state as the trainer writes it (an AdamW state of ``model`` after a step)."""
    model = model or _model(0)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.tensor([1, 2])).sum().backward()
    optimizer.step()
    return {
        "optimizer": optimizer.state_dict(),
        "scaler": {},
        "rng": {"cpu": torch.get_rng_state()},
        "step": step,
        "best_val": 1.5,
    }


def test_round_trip_of_weights_and_state(tmp_path):
    model = _model(0)
    ckpt.save_checkpoint(tmp_path, model, _state(5), step=5, pointers=("latest", "best"))
    loaded = _model(1)
    path = pointers.checkpoint_dir(tmp_path, "best")
    verify.load_weights(loaded, path)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert verify.verify_checkpoint(path).state["step"] == 5


def test_old_checkpoints_are_removed_but_best_is_kept(tmp_path):
    ckpt.save_checkpoint(tmp_path, _model(0), _state(1), step=1, pointers=("latest", "best"))
    ckpt.save_checkpoint(tmp_path, _model(0), _state(2), step=2)
    ckpt.save_checkpoint(tmp_path, _model(0), _state(3), step=3)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000001", "step-0000003"]
    assert pointers.checkpoint_dir(tmp_path, "best").name == "step-0000001"
    assert pointers.checkpoint_dir(tmp_path, "latest").name == "step-0000003"


def test_a_failed_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _model(0), _state(1), step=1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, _model(1), _state(2), step=2)
    monkeypatch.undo()
    path = pointers.checkpoint_dir(tmp_path, "latest")
    assert path.name == "step-0000001"
    verify.load_weights(_model(2), path)
    assert verify.verify_checkpoint(path).state["step"] == 1
    # the next successful save cleans up the half-written directory
    ckpt.save_checkpoint(tmp_path, _model(0), _state(3), step=3)
    assert not list(tmp_path.glob(".step-*"))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_state_never_runs_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt.save_checkpoint(tmp_path, _model(0), _state(1), step=1)
    path = pointers.checkpoint_dir(tmp_path)
    torch.save({"step": 1, "payload": _Exploit()}, path / layout.STATE_FILE)
    ckpt.write_manifest(path, 1)  # even with a matching checksum
    with pytest.raises(FraglmError, match="corrupt or unsafe"):
        verify.verify_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_corrupt_weights_are_a_clear_error(tmp_path):
    ckpt.save_checkpoint(tmp_path, _model(0), _state(1), step=1)
    path = pointers.checkpoint_dir(tmp_path)
    (path / layout.WEIGHTS_FILE).write_bytes(b"\x00" * 20)
    ckpt.write_manifest(path, 1)
    with pytest.raises(FraglmError, match="corrupt"):
        verify.load_weights(_model(0), path)


def test_weights_of_another_shape_are_a_clear_error(tmp_path):
    ckpt.save_checkpoint(tmp_path, _model(0), _state(1), step=1)
    other = nn.Sequential(nn.Embedding(12, 4), nn.Linear(4, 12))
    with pytest.raises(FraglmError, match="corrupt or incompatible"):
        verify.load_weights(other, pointers.checkpoint_dir(tmp_path))


def test_missing_checkpoint_and_dangling_pointer(tmp_path):
    with pytest.raises(FraglmError, match="no checkpoint"):
        pointers.checkpoint_dir(tmp_path)
    (tmp_path / "latest.json").write_text(json.dumps({"dir": "step-0000009", "step": 9}))
    with pytest.raises(FraglmError, match="missing"):
        pointers.checkpoint_dir(tmp_path)


def test_a_full_disk_is_a_one_line_error_and_keeps_the_previous(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _model(0), _state(1), step=1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", disk_full)
    with pytest.raises(FraglmError) as error:
        ckpt.save_checkpoint(tmp_path, _model(1), _state(2), step=2)
    assert str(error.value) == (
        f"could not save checkpoint step-0000002 (could not write "
        f"{tmp_path}/.step-0000002.tmp-{os.getpid()}/model.safetensors: No space left on device); "
        "the previous checkpoint (step-0000001) is intact"
    )
    monkeypatch.undo()
    assert pointers.checkpoint_dir(tmp_path, "latest").name == "step-0000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-0000001"]


# checkpoints verify themselves


def _saved(tmp_path, step: int = 1):
    model = _model(0)
    ckpt.save_checkpoint(tmp_path, model, _state(step, model), step=step)
    return pointers.checkpoint_dir(tmp_path)


def test_a_checkpoint_records_the_sha256_of_each_file(tmp_path):
    path = _saved(tmp_path)
    manifest = json.loads((path / layout.MANIFEST_FILE).read_text())
    assert manifest["step"] == 1 and set(manifest["files"]) == set(layout.CHECKPOINT_FILES)
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    verify.verify_checkpoint(path)


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", layout.CHECKPOINT_FILES)
@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: _flip(p, -7), "its SHA-256 differs"),
        (lambda p: _flip(p, 200), "its SHA-256 differs"),
        (lambda p: p.write_bytes(p.read_bytes()[:-50]), "truncated or overwritten"),
        (lambda p: p.write_bytes(b""), "truncated or overwritten"),
        (lambda p: p.unlink(), "checkpoint file missing"),
    ],
    ids=["flip-end", "flip-inside", "truncated", "emptied", "deleted"],
)
def test_damaged_bytes_are_caught_before_loading(tmp_path, name, damage, expected):
    path = _saved(tmp_path)
    damage(path / name)
    load = verify.load_weights if name == layout.WEIGHTS_FILE else None
    with pytest.raises(FraglmError, match=expected) as error:
        load(_model(0), path) if load else verify.verify_checkpoint(path).state
    assert str(path / name) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (None, "has no manifest.json"),
        ("{not json", "manifest .* is unreadable"),
        ("[]", "does not list model.safetensors, state.pt"),
        ('{"files": {"model.safetensors": {}, "state.pt": {}}}', "entry of .* is malformed"),
    ],
)
def test_a_missing_or_broken_manifest(tmp_path, manifest, expected):
    path = _saved(tmp_path)
    if manifest is None:
        (path / layout.MANIFEST_FILE).unlink()
    else:
        (path / layout.MANIFEST_FILE).write_text(manifest)
    with pytest.raises(FraglmError, match=expected):
        verify.load_weights(_model(0), path)


def test_non_finite_weights_are_refused_even_with_a_matching_checksum(tmp_path):
    path = _saved(tmp_path)
    model = _model(0)
    with torch.no_grad():
        model[0].weight[3, 1] = float("nan")
    (path / layout.WEIGHTS_FILE).write_bytes(ckpt.weights_bytes(model))
    ckpt.write_manifest(path, 1)
    with pytest.raises(FraglmError, match=r"holds non-finite weights \(NaN or inf\) in 0.weight"):
        verify.load_weights(_model(0), path)


WRONG_STATES = {
    "list": (lambda s: [s], "not a mapping"),
    "step-string": (lambda s: {**s, "step": "1"}, "'step' is not 1"),
    "step-of-another": (lambda s: {**s, "step": 7}, "'step' is not 1"),
    "rng-list": (lambda s: {**s, "rng": {"cpu": [1, 2]}}, "'rng.cpu' is no RNG state"),
    "no-optimizer": (lambda s: {k: v for k, v in s.items() if k != "optimizer"}, "'optimizer'"),
    "optimizer-list": (lambda s: {**s, "optimizer": {"state": {}, "param_groups": 3}}, "optim"),
    "best-nan": (lambda s: {**s, "best_val": float("nan")}, "'best_val' is not a finite"),
}


@pytest.mark.parametrize(("change", "expected"), WRONG_STATES.values(), ids=WRONG_STATES.keys())
def test_a_state_of_the_wrong_type_is_a_clear_error(tmp_path, change, expected):
    path = _saved(tmp_path)
    torch.save(change(_state(1)), path / layout.STATE_FILE)
    ckpt.write_manifest(path, 1)
    with pytest.raises(FraglmError, match=expected):
        verify.verify_checkpoint(path)


def test_optimizer_state_of_the_wrong_shape_or_non_finite(tmp_path):
    model = _model(0)
    optimizer = torch.optim.AdamW(model.parameters())
    good = _state(1)["optimizer"]
    verify.check_optimizer_state(good, optimizer, tmp_path / "state.pt")
    wrong = {**good, "state": {0: {**good["state"][0], "exp_avg": torch.zeros(3)}}}
    with pytest.raises(FraglmError, match=r"exp_avg' of shape \(3,\) for a parameter of shape"):
        verify.check_optimizer_state(wrong, optimizer, tmp_path / "state.pt")
    nan = {**good, "state": {0: {**good["state"][0], "exp_avg_sq": torch.full((10, 4), 1e400)}}}
    with pytest.raises(FraglmError, match="non-finite optimizer 'exp_avg_sq'"):
        verify.check_optimizer_state(nan, optimizer, tmp_path / "state.pt")


# pointers

BAD_POINTERS = {
    "garbled": ('{"dir": "step-00', "not valid JSON"),
    "number": ("7", "a JSON int, not an object"),
    "list": ('["step-0000001"]', "a JSON list, not an object"),
    "no-dir": ('{"step": 1}', "its 'dir' is not a step-NNNNNNN"),
    "escape": ('{"dir": "../../etc", "step": 1}', "its 'dir' is not a step-NNNNNNN"),
    "step-mismatch": ('{"dir": "step-0000001", "step": 2}', "its 'step' does not match"),
    "step-bool": ('{"dir": "step-0000001", "step": true}', "its 'step' does not match"),
}


@pytest.mark.parametrize("which", layout.POINTERS)
@pytest.mark.parametrize(("text", "expected"), BAD_POINTERS.values(), ids=BAD_POINTERS.keys())
def test_a_pointer_that_is_not_what_it_must_be(tmp_path, which, text, expected):
    _saved(tmp_path)
    (tmp_path / f"{which}.json").write_text(text)
    with pytest.raises(FraglmError, match=f"pointer .*{which}.json is broken: {expected}"):
        pointers.checkpoint_dir(tmp_path, which)


def test_a_non_utf8_pointer(tmp_path):
    (tmp_path / "latest.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(FraglmError, match=r"latest\.json is broken: not UTF-8"):
        pointers.read_pointer(tmp_path, "latest")


# opening a run directory for training


def test_stale_temporaries_are_removed_at_the_next_start(tmp_path, caplog):
    _saved(tmp_path)
    (tmp_path / ".step-0000002.tmp-4242").mkdir()
    (tmp_path / ".step-0000002.tmp-4242" / layout.WEIGHTS_FILE).write_bytes(b"half")
    (tmp_path / ".latest.json.tmp-4242").write_text('{"dir": ')
    (tmp_path / ".metrics.jsonl.tmp-99").write_text("")
    with caplog.at_level(logging.INFO, logger="fraglm.runs.resume"):
        resumed = resume.open_run_dir(
            tmp_path, resume=True, resume_from=None, overwrite=False, writable=True
        )
    assert resumed.path.name == "step-0000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-0000001"]
    assert ".step-0000002.tmp-4242" in caplog.text


@pytest.mark.parametrize("present", ["config.yaml", "metrics.jsonl", "step-0000003", "best.json"])
def test_a_run_is_detected_by_any_of_its_files(tmp_path, present):
    (tmp_path / present).mkdir() if present.startswith("step-") else (tmp_path / present).touch()
    with pytest.raises(
        FraglmError,
        match=rf"already holds a trained run \({present}\).*--resume.*another train.out_dir.*"
        "--overwrite",
    ):
        resume.open_run_dir(
            tmp_path, resume=False, resume_from=None, overwrite=False, writable=True
        )
    assert (tmp_path / present).exists()
    resume.open_run_dir(tmp_path, resume=False, resume_from=None, overwrite=True, writable=True)
    assert not (tmp_path / present).exists()


def test_resume_names_the_newest_checkpoint_that_verifies(tmp_path):
    model = _model(0)
    ckpt.save_checkpoint(tmp_path, model, _state(1, model), step=1, pointers=("latest", "best"))
    ckpt.save_checkpoint(tmp_path, model, _state(2, model), step=2)
    _flip(tmp_path / "step-0000002" / layout.WEIGHTS_FILE, 100)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(FraglmError, match=r"SHA-256 differs.*--resume-from step-0000001$"):
        resume.open_run_dir(tmp_path, resume=True, resume_from=None, overwrite=False, writable=True)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # untouched

    resumed = resume.open_run_dir(
        tmp_path, resume=True, resume_from="step-0000001", overwrite=False, writable=True
    )
    assert resumed.path.name == "step-0000001"
    assert pointers.read_pointer(tmp_path, "latest")["dir"] == "step-0000001"
    assert pointers.read_pointer(tmp_path, "best")["dir"] == "step-0000001"
    assert not (tmp_path / "step-0000002").exists()  # the abandoned continuation


def test_resume_from_a_checkpoint_that_is_not_there(tmp_path):
    _saved(tmp_path)
    with pytest.raises(FraglmError, match=r"no step-0000005 in .* \(it holds: step-0000001\)"):
        resume.resume_target(tmp_path, "5")
    with pytest.raises(FraglmError, match="must name a checkpoint like step-0000300"):
        resume.resume_target(tmp_path, "../x")


def test_resume_with_a_broken_pointer_names_it(tmp_path):
    _saved(tmp_path)
    (tmp_path / "latest.json").write_text("[1]")
    with pytest.raises(FraglmError, match=r"latest\.json is broken.*--resume-from step-0000001"):
        resume.resume_target(tmp_path)
    (tmp_path / "latest.json").unlink()
    with pytest.raises(FraglmError, match=r"no checkpoint in .*--resume-from step-0000001"):
        resume.resume_target(tmp_path)


@pytest.mark.parametrize("resume_from", [None, "step-0000001"])
def test_resuming_reads_and_hashes_each_checkpoint_file_once(tmp_path, monkeypatch, resume_from):
    model = _model(0)
    ckpt.save_checkpoint(tmp_path, model, _state(1, model), step=1, pointers=("latest", "best"))
    reads, hashed = [], []
    read_bytes, sha256 = Path.read_bytes, hashlib.sha256
    monkeypatch.setattr(Path, "read_bytes", lambda p: reads.append(p.name) or read_bytes(p))
    monkeypatch.setattr(
        hashlib, "sha256", lambda data=b"": hashed.append(len(data)) or sha256(data)
    )
    resumed = resume.open_run_dir(
        tmp_path, resume=True, resume_from=resume_from, overwrite=False, writable=True
    )
    loaded = _model(1)
    resumed.load_weights_into(loaded)
    assert sorted(reads) == sorted(layout.CHECKPOINT_FILES)
    assert len(hashed) == len(layout.CHECKPOINT_FILES)
    assert resumed.state["step"] == 1
    assert torch.equal(loaded[0].weight, model[0].weight)
