"""Writing checkpoints that verify themselves.

A checkpoint directory is written under a temporary name: weights and state are written
and fsynced, then ``manifest.json`` records the size and SHA-256 of each, then the
directory is renamed into place and the run directory fsynced. Pointer files are replaced
atomically (``fraglm.storage.atomic``). A kill or a full disk at any moment therefore leaves the
previous pointer naming a complete checkpoint. Reading one back is
:mod:`fraglm.runs.verify`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from fraglm.errors import FraglmError
from fraglm.runs.layout import (
    CHECKPOINT_FILES,
    MANIFEST_FILE,
    POINTERS,
    STATE_FILE,
    WEIGHTS_FILE,
    step_name,
)
from fraglm.runs.pointers import read_pointer, write_pointer
from fraglm.runs.verify import verifies
from fraglm.storage.atomic import TEMP_MARK, fsync_dir, write_bytes_atomic, write_text_atomic

MANIFEST_FORMAT = 1


def weights_bytes(model: torch.nn.Module) -> bytes:
    """The model's tensors as safetensors bytes; a tensor shared under several names (tied
    embeddings) is stored once, with the other names in the metadata, as ``save_model``
    does, so loading restores the tie."""
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
    if not (final.is_dir() and verifies(final)):  # a good directory of a step is kept
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
    for pointer in pointers:
        write_pointer(run_dir, pointer, {"dir": name, "step": step, **(info or {})})
    _remove_unreferenced(run_dir)
    return final


def _previous(run_dir: Path) -> str:
    record = read_pointer(run_dir, "latest")
    return f"the previous checkpoint ({record['dir']})" if record else "the run directory"


def _write_checkpoint(tmp: Path, model: torch.nn.Module, state: dict[str, Any], step: int) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_bytes_atomic(tmp / WEIGHTS_FILE, weights_bytes(model))
    write_bytes_atomic(tmp / STATE_FILE, _state_bytes(state))
    write_manifest(tmp, step)


def write_manifest(ckpt_dir: Path, step: int) -> None:
    """Record the size and SHA-256 of the checkpoint's files, as they are on disk."""
    files = {}
    for name in CHECKPOINT_FILES:
        data = (ckpt_dir / name).read_bytes()
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
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
