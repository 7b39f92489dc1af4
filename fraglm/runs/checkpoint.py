"""Run directories and checkpoints that verify themselves.

Layout of ``train.out_dir``::

    config.yaml  tokenizer.json  metrics.jsonl  .lock
    step-0000200/model.safetensors  step-0000200/state.pt  step-0000200/manifest.json
    latest.json  best.json          pointers: {"dir": "step-0000200", "step": 200, ...}

A checkpoint directory is written under a temporary name: weights and state are written
and fsynced, then ``manifest.json`` records the size and SHA-256 of each, then the
directory is renamed into place and the run directory fsynced. Pointer files are replaced
atomically (``fraglm.storage.atomic``). A kill or a full disk at any moment therefore leaves the
previous pointer naming a complete checkpoint.

Loading verifies: a file whose bytes differ from its manifest, non-finite weights, a
training state of the wrong type or shape, or a pointer that is not what it must be is a
one-line ``FraglmError`` naming the file. Weights are safetensors; the training state
(optimizer, scaler, RNG, step) is a torch file read with ``weights_only=True``, so loading
a checkpoint never runs pickled code.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model

from fraglm.config import Config, load_config
from fraglm.data.tokenizer import TOKENIZER_FILE
from fraglm.errors import FraglmError, first_line
from fraglm.storage.atomic import TEMP_MARK, fsync_dir, write_bytes_atomic, write_text_atomic

CONFIG_FILE, METRICS_FILE = "config.yaml", "metrics.jsonl"
WEIGHTS_FILE, STATE_FILE, MANIFEST_FILE = "model.safetensors", "state.pt", "manifest.json"
CHECKPOINT_FILES = (WEIGHTS_FILE, STATE_FILE)
POINTERS = ("latest", "best")
STEP_DIR = re.compile(r"step-(\d{7,})")
MANIFEST_FORMAT = 1
# what a run directory holds besides its checkpoints: a directory with any of these holds a run
RUN_FILES = (CONFIG_FILE, TOKENIZER_FILE, METRICS_FILE, "latest.json", "best.json", "wandb_id.txt")


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def write_run_files(run_dir: Path, cfg: Config, tokenizer_path: Path) -> None:
    """The resolved config and the tokenizer, so the run directory stands on its own."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_FILE, cfg.to_yaml())
    write_bytes_atomic(run_dir / TOKENIZER_FILE, tokenizer_path.read_bytes())


def _weights_bytes(model: torch.nn.Module) -> bytes:
    """The model's tensors as safetensors bytes; a tensor shared under several names (tied
    embeddings) is stored once, with the other names in the metadata, as ``save_model``
    does, so ``load_model`` restores the tie."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return safetensors.torch.save(tensors, metadata=aliases or None)


def _state_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    state: dict[str, Any],
    *,
    step: int,
    pointers: tuple[str, ...] = ("latest",),
    info: dict[str, Any] | None = None,
) -> Path:
    """Write weights and training state for ``step`` and point ``pointers`` at them.

    A failure (a full disk, a file-size limit) removes what this save wrote and raises a
    one-line error; the previous checkpoint and pointers are untouched.
    """
    name = step_name(step)
    final = run_dir / name
    if not (final.is_dir() and _verifies(final)):  # a good directory of a step is kept
        tmp = run_dir / f".{name}{TEMP_MARK}{os.getpid()}"
        try:
            _write_checkpoint(tmp, model, state, step)
            if final.exists():  # a damaged one of the same step
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(run_dir)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, FraglmError | OSError):
                reason = str(exc) if isinstance(exc, FraglmError) else exc.strerror or str(exc)
                raise FraglmError(
                    f"could not save checkpoint {name} ({reason}); {_previous(run_dir)} is intact"
                ) from None
            raise
    record = {"dir": name, "step": step, **(info or {})}
    for pointer in pointers:
        write_text_atomic(run_dir / f"{pointer}.json", json.dumps(record) + "\n")
    _remove_unreferenced(run_dir)
    return final


def _previous(run_dir: Path) -> str:
    record = read_pointer(run_dir, "latest")
    return f"the previous checkpoint ({record['dir']})" if record else "the run directory"


def _write_checkpoint(tmp: Path, model: torch.nn.Module, state: dict[str, Any], step: int) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_bytes_atomic(tmp / WEIGHTS_FILE, _weights_bytes(model))
    write_bytes_atomic(tmp / STATE_FILE, _state_bytes(state))
    write_manifest(tmp, step)


def write_manifest(ckpt_dir: Path, step: int) -> None:
    """Record the size and SHA-256 of the checkpoint's files, once they are on disk."""
    files = {
        name: {"size": (ckpt_dir / name).stat().st_size, "sha256": _sha256(ckpt_dir / name)}
        for name in CHECKPOINT_FILES
    }
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    write_text_atomic(ckpt_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


def _remove_unreferenced(run_dir: Path) -> None:
    keep = {p["dir"] for name in POINTERS if (p := read_pointer(run_dir, name)) is not None}
    for path in run_dir.glob("step-*"):
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Remove what interrupted saves left behind (``.step-N.tmp-PID``, ``.latest.json.tmp-PID``
    and the like); call with the run directory locked. Returns the names removed."""
    removed = []
    for path in run_dir.glob(f".*{TEMP_MARK}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return sorted(removed)


# pointers


def read_pointer(run_dir: Path, name: str) -> dict[str, Any] | None:
    """The record of ``NAME.json``; None when the file does not exist, a one-line error when
    it is anything but ``{"dir": "step-NNNNNNN", "step": N, ...}``."""
    path = run_dir / f"{name}.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad_pointer(path, getattr(exc, "strerror", None) or "not UTF-8 text") from None
    try:
        record = json.loads(text)
    except ValueError:
        raise _bad_pointer(path, "not valid JSON") from None
    if not isinstance(record, dict):
        raise _bad_pointer(path, f"a JSON {type(record).__name__}, not an object")
    directory, step = record.get("dir"), record.get("step")
    match = STEP_DIR.fullmatch(directory) if isinstance(directory, str) else None
    if match is None:
        raise _bad_pointer(path, "its 'dir' is not a step-NNNNNNN directory name")
    if not isinstance(step, int) or isinstance(step, bool) or step != int(match.group(1)):
        raise _bad_pointer(path, f"its 'step' does not match its 'dir' {directory}")
    return record


def _bad_pointer(path: Path, what: str) -> FraglmError:
    return FraglmError(f"checkpoint pointer {path} is broken: {what}")


def has_checkpoint(run_dir: Path) -> bool:
    return read_pointer(run_dir, "latest") is not None


def checkpoint_dir(run_dir: Path, which: str = "latest") -> Path:
    """Directory of the ``latest`` or ``best`` checkpoint (best falls back to latest)."""
    record = read_pointer(run_dir, which)
    if record is None and which != "latest":
        which, record = "latest", read_pointer(run_dir, "latest")
    if record is None:
        raise FraglmError(f"no checkpoint in {run_dir} (train a model first with `fraglm train`)")
    path = run_dir / record["dir"]
    if not path.is_dir():
        raise FraglmError(f"checkpoint {path} named by {run_dir / which}.json is missing")
    return path


def step_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, newest first."""
    found = [p for p in run_dir.glob("step-*") if STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")), reverse=True)


def run_contents(run_dir: Path) -> list[str]:
    """The names of what makes ``run_dir`` a run (empty when it holds none)."""
    if not run_dir.is_dir():
        return []
    names = [name for name in RUN_FILES if (run_dir / name).exists()]
    return names + [p.name for p in step_dirs(run_dir)]


def clear_run(run_dir: Path) -> None:
    """Remove a run's files (``--overwrite``): pointers first, so an interrupted clear
    never leaves a pointer to a removed checkpoint."""
    for name in ("latest.json", "best.json", *RUN_FILES):
        (run_dir / name).unlink(missing_ok=True)
    for path in step_dirs(run_dir):
        shutil.rmtree(path)


# verification


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(ckpt_dir: Path) -> dict[str, dict[str, Any]]:
    """The ``files`` of a checkpoint's manifest: ``{name: {"size": n, "sha256": hex}}``."""
    path = ckpt_dir / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FraglmError(
            f"checkpoint {ckpt_dir} has no {MANIFEST_FILE} (an interrupted save, or written "
            "before fraglm checksummed its checkpoints)"
        ) from None
    except (OSError, ValueError) as exc:
        raise FraglmError(f"checkpoint manifest {path} is unreadable: {first_line(exc)}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or set(files) != set(CHECKPOINT_FILES):
        raise FraglmError(f"checkpoint manifest {path} does not list {', '.join(CHECKPOINT_FILES)}")
    for name, entry in files.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            raise FraglmError(f"checkpoint manifest {path}: the entry of {name} is malformed")
    return files


def verify_file(ckpt_dir: Path, name: str) -> Path:
    """``ckpt_dir/name`` after checking its size and SHA-256 against the manifest."""
    entry = read_manifest(ckpt_dir)[name]
    path = ckpt_dir / name
    if not path.is_file():
        raise FraglmError(f"checkpoint file missing: {path}")
    size = path.stat().st_size
    if size != entry["size"]:
        raise FraglmError(
            f"checkpoint file {path} is damaged: {size:,} bytes, its manifest says "
            f"{entry['size']:,} (truncated or overwritten)"
        )
    if _sha256(path) != entry["sha256"]:
        raise FraglmError(
            f"checkpoint file {path} is damaged: its SHA-256 differs from the one in "
            f"{MANIFEST_FILE} (the bytes changed after it was saved)"
        )
    return path


def verify_checkpoint(ckpt_dir: Path) -> None:
    """Every file of the checkpoint matches its manifest, the weights are finite and the
    state has the types it must have (raises a one-line error)."""
    if not ckpt_dir.is_dir():
        raise FraglmError(f"checkpoint {ckpt_dir} is missing")
    path = verify_file(ckpt_dir, WEIGHTS_FILE)
    try:
        tensors = safetensors.torch.load_file(path)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise FraglmError(f"checkpoint {path} is corrupt: {first_line(exc)}") from None
    _check_finite(tensors, path)
    load_state(ckpt_dir)


def _check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not tensor.isfinite().all():
            raise FraglmError(f"checkpoint {path} holds non-finite weights (NaN or inf) in {name}")


def _verifies(ckpt_dir: Path) -> bool:
    try:
        verify_checkpoint(ckpt_dir)
    except FraglmError:
        return False
    return True


def newest_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint directory whose files match their manifest."""
    return next((path for path in step_dirs(run_dir) if _verifies(path)), None)


# loading


def load_weights(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Verified, finite weights of the checkpoint into ``model``."""
    path = verify_file(ckpt_dir, WEIGHTS_FILE)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise FraglmError(
            f"checkpoint {path} is corrupt or incompatible: {first_line(exc)}"
        ) from None
    if missing or unexpected:
        raise FraglmError(
            f"checkpoint {path} does not fit this model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    _check_finite(model.state_dict(), path)


def load_state(ckpt_dir: Path) -> dict[str, Any]:
    """The verified training state of the checkpoint, checked for the types it must have."""
    path = verify_file(ckpt_dir, STATE_FILE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FraglmError(
            f"checkpoint state {path} is corrupt or unsafe: {first_line(exc)}"
        ) from None
    _check_state(state, path, int(ckpt_dir.name.removeprefix("step-")))
    return state


def _check_state(state: Any, path: Path, step: int) -> None:
    def expect(ok: bool, what: str) -> None:
        if not ok:
            raise FraglmError(f"checkpoint state {path} is malformed: {what}")

    expect(isinstance(state, dict), "not a mapping")
    for key in ("optimizer", "scaler", "rng"):
        expect(isinstance(state.get(key), dict), f"'{key}' is not a mapping")
    rng = state["rng"].get("cpu")
    expect(isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8, "'rng.cpu' is no RNG state")
    expect(
        isinstance(state.get("step"), int)
        and not isinstance(state["step"], bool)
        and state["step"] == step,
        f"'step' is not {step}",
    )
    best = state.get("best_val")
    expect(
        best is None
        or (isinstance(best, float | int) and not isinstance(best, bool) and math.isfinite(best)),
        "'best_val' is not a finite number",
    )
    # one optimizer's state, or several (train.optimizer=muon: Muon and AdamW)
    parts = state["optimizer"].get("optimizers", [state["optimizer"]])
    expect(
        isinstance(parts, list)
        and all(
            isinstance(part, dict)
            and isinstance(part.get("state"), dict)
            and isinstance(part.get("param_groups"), list)
            and all(
                isinstance(g, dict) and isinstance(g.get("params"), list)
                for g in part["param_groups"]
            )
            for part in parts
        ),
        "'optimizer' is not an optimizer state",
    )


def check_optimizer_state(
    saved: dict[str, Any], optimizer: torch.optim.Optimizer, path: Path
) -> None:
    """The saved optimizer state fits ``optimizer``'s parameters, tensor by tensor, and is
    finite (torch checks only the number of parameters, and a wrong shape would fail at
    the first step)."""
    current = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(ids) != len(current):
        raise FraglmError(
            f"checkpoint state {path} does not fit this model: optimizer state for "
            f"{len(ids)} parameters, the model has {len(current)}"
        )
    for index, param in zip(ids, current, strict=True):
        entry = saved["state"].get(index, {})
        if not isinstance(entry, dict):
            raise FraglmError(f"checkpoint state {path} is malformed: optimizer entry {index}")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                raise FraglmError(f"checkpoint state {path} is malformed: optimizer '{key}'")
            if value.dim() and value.shape != param.shape:
                raise FraglmError(
                    f"checkpoint state {path} does not fit this model: optimizer '{key}' of "
                    f"shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}"
                )
            if value.is_floating_point() and not value.isfinite().all():
                raise FraglmError(f"checkpoint state {path} holds non-finite optimizer '{key}'")


# opening a run directory for training


def open_run_dir(
    run_dir: Path, *, resume: bool, resume_from: str | None, overwrite: bool, writable: bool
) -> Path | None:
    """Ready ``run_dir`` for ``fraglm train`` (call it holding the run lock when
    ``writable``): remove stale temporaries, refuse to start over an existing run unless
    ``overwrite``, and return the verified checkpoint to resume from (None for a new run).
    Nothing is written when this raises."""
    if writable and run_dir.is_dir():
        removed = remove_stale_temporaries(run_dir)
        if removed:
            print(f"note: removed {', '.join(removed)} left in {run_dir} by an interrupted save")
    if resume or resume_from is not None:
        if overwrite:
            raise FraglmError("--overwrite starts a new run; it does not go with --resume")
        path = resume_target(run_dir, resume_from)
        if writable and resume_from is not None:
            _adopt(run_dir, path)
        return path
    found = run_contents(run_dir)
    if found and not overwrite:
        raise FraglmError(
            f"{run_dir} already holds a trained run ({', '.join(found[:4])}); continue it "
            "with --resume, choose another train.out_dir, or start over with --overwrite"
        )
    if found and writable:
        clear_run(run_dir)
    return None


def _checkpoint_name(text: str) -> str:
    """``step-0000300``, ``step-300`` or ``300`` -> ``step-0000300``."""
    digits = text.strip().removeprefix("step-")
    if not digits.isdigit() or len(digits) > 12:
        raise FraglmError(f"--resume-from must name a checkpoint like step-0000300, not {text!r}")
    return step_name(int(digits))


def resume_target(run_dir: Path, resume_from: str | None = None) -> Path:
    """The checkpoint a resumed run starts from: ``resume_from`` or the one ``latest.json``
    names, verified. When the latest fails, the error names the newest one that verifies."""
    if not run_dir.is_dir():
        raise FraglmError(f"cannot resume: no checkpoint in {run_dir}")
    if resume_from is not None:
        path = run_dir / _checkpoint_name(resume_from)
        if not path.is_dir():
            names = ", ".join(p.name for p in step_dirs(run_dir)) or "none"
            raise FraglmError(f"cannot resume: no {path.name} in {run_dir} (it holds: {names})")
        verify_checkpoint(path)
        return path
    try:
        record = read_pointer(run_dir, "latest")
        if record is None:
            raise FraglmError(f"cannot resume: no checkpoint in {run_dir}")
        path = run_dir / record["dir"]
        verify_checkpoint(path)
        read_pointer(run_dir, "best")  # checked now: the next save reads it
    except FraglmError as exc:
        good = newest_good_checkpoint(run_dir)
        if good is None:
            raise
        raise FraglmError(
            f"{exc}; {good.name} is the newest checkpoint that verifies: continue from it "
            f"with --resume-from {good.name}"
        ) from None
    return path


def _adopt(run_dir: Path, chosen: Path) -> None:
    """Make ``chosen`` the run's latest checkpoint: newer checkpoints belong to the
    abandoned continuation and go, and so does a best pointer that is not usable."""
    step = int(chosen.name.removeprefix("step-"))
    write_text_atomic(
        run_dir / "latest.json", json.dumps({"dir": chosen.name, "step": step}) + "\n"
    )
    try:
        best = read_pointer(run_dir, "best")
        usable = best is not None and best["step"] <= step and _verifies(run_dir / best["dir"])
    except FraglmError:
        usable = False
    if not usable:
        (run_dir / "best.json").unlink(missing_ok=True)
    for path in step_dirs(run_dir):
        if int(path.name.removeprefix("step-")) > step:
            shutil.rmtree(path)
    print(f"resuming from {chosen} (step {step})")


def load_run_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FraglmError(f"{run_dir} is not a fraglm run directory (no {CONFIG_FILE})")
    return load_config(path)
