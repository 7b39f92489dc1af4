"""Reading a checkpoint and verifying it, in one pass over each file.

Each file's bytes are read once, checked against the size and SHA-256 in the manifest,
and parsed from those same bytes: a file whose bytes differ from its manifest,
non-finite weights, or a training state of the wrong type or shape is a one-line
``FraglmError`` naming the file. Weights are safetensors; the training state (optimizer,
scaler, RNG, step) is a torch file read with ``weights_only=True``, so loading a
checkpoint never runs pickled code.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from fraglm.errors import FraglmError, first_line
from fraglm.runs.layout import (
    CHECKPOINT_FILES,
    MANIFEST_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    step_dirs,
    step_of,
)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read and verified: its files matched the manifest, its weights are
    finite and its training state has the types it must have."""

    path: Path
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]

    def load_weights_into(self, model: torch.nn.Module) -> None:
        _assign_weights(model, self.weights, self.path / WEIGHTS_FILE)


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


def _read_verified(ckpt_dir: Path, name: str, manifest: dict[str, dict[str, Any]]) -> bytes:
    """The bytes of ``ckpt_dir/name``, read once and checked against ``manifest``."""
    entry, path = manifest[name], ckpt_dir / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FraglmError(f"checkpoint file missing: {path}") from None
    except OSError as exc:
        raise FraglmError(f"checkpoint file {path} is unreadable: {exc.strerror}") from None
    if len(data) != entry["size"]:
        raise FraglmError(
            f"checkpoint file {path} is damaged: {len(data):,} bytes, its manifest says "
            f"{entry['size']:,} (truncated or overwritten)"
        )
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise FraglmError(
            f"checkpoint file {path} is damaged: its SHA-256 differs from the one in "
            f"{MANIFEST_FILE} (the bytes changed after it was saved)"
        )
    return data


def _read_weights(ckpt_dir: Path, manifest: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The checkpoint's verified, finite tensors by name, tied names included."""
    path = ckpt_dir / WEIGHTS_FILE
    data = _read_verified(ckpt_dir, WEIGHTS_FILE, manifest)
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, RuntimeError, ValueError) as exc:
        raise FraglmError(f"checkpoint {path} is corrupt: {first_line(exc)}") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not tensor.isfinite().all():
            raise FraglmError(f"checkpoint {path} holds non-finite weights (NaN or inf) in {name}")
    return tensors | {alias: tensors[name] for alias, name in _tied_names(data, tensors).items()}


def _tied_names(data: bytes, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """A tensor shared under several names (tied embeddings) is stored once; its other
    names are in the file's metadata, ``{other: stored}`` (as safetensors' ``save_model``
    writes it). The header is the 8-byte little-endian length and then JSON."""
    size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    return {alias: name for alias, name in metadata.items() if name in tensors}


def _assign_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise FraglmError(
            f"checkpoint {path} is corrupt or incompatible: {first_line(exc)}"
        ) from None
    if missing or unexpected:
        raise FraglmError(
            f"checkpoint {path} does not fit this model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


def load_weights(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Verified, finite weights of the checkpoint into ``model``."""
    tensors = _read_weights(ckpt_dir, read_manifest(ckpt_dir))
    _assign_weights(model, tensors, ckpt_dir / WEIGHTS_FILE)


def _read_state(ckpt_dir: Path, manifest: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The verified training state of the checkpoint, checked for the types it must have."""
    path = ckpt_dir / STATE_FILE
    data = _read_verified(ckpt_dir, STATE_FILE, manifest)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FraglmError(
            f"checkpoint state {path} is corrupt or unsafe: {first_line(exc)}"
        ) from None
    _check_state(state, path, step_of(ckpt_dir))
    return state


def verify_checkpoint(ckpt_dir: Path) -> Checkpoint:
    """The checkpoint, every file of it matching its manifest, read once (raises a
    one-line error)."""
    if not ckpt_dir.is_dir():
        raise FraglmError(f"checkpoint {ckpt_dir} is missing")
    manifest = read_manifest(ckpt_dir)
    weights = _read_weights(ckpt_dir, manifest)
    return Checkpoint(ckpt_dir, weights, _read_state(ckpt_dir, manifest))


def verifies(ckpt_dir: Path) -> bool:
    try:
        verify_checkpoint(ckpt_dir)
    except FraglmError:
        return False
    return True


def newest_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint directory whose files match their manifest."""
    return next((path for path in step_dirs(run_dir) if verifies(path)), None)


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
