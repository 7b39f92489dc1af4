"""Run directories and atomic checkpoints.

Layout of ``train.out_dir``::

    config.yaml  tokenizer.json  metrics.jsonl
    step-000200/model.safetensors  step-000200/state.pt
    latest.json  best.json          pointers: {"dir": "step-000200", "step": 200, ...}

A checkpoint directory is written under a temporary name and renamed when complete; the
pointer files are replaced with ``os.replace``. A kill at any moment therefore leaves the
previous pointer naming a complete checkpoint. Weights are safetensors; the training state
(optimizer, scaler, RNG, step) is a torch file read with ``weights_only=True``, so loading
a checkpoint never runs pickled code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from fraglm.config import Config, load_config
from fraglm.errors import FraglmError, first_line

CONFIG_FILE, TOKENIZER_FILE, METRICS_FILE = "config.yaml", "tokenizer.json", "metrics.jsonl"
WEIGHTS_FILE, STATE_FILE = "model.safetensors", "state.pt"
POINTERS = ("latest", "best")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_run_files(run_dir: Path, cfg: Config, tokenizer_path: Path) -> None:
    """The resolved config and the tokenizer, so the run directory stands on its own."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_FILE, cfg.to_yaml())
    write_text_atomic(run_dir / TOKENIZER_FILE, tokenizer_path.read_text(encoding="utf-8"))


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    state: dict[str, Any],
    *,
    step: int,
    pointers: tuple[str, ...] = ("latest",),
    info: dict[str, Any] | None = None,
) -> Path:
    """Write weights and training state for ``step`` and point ``pointers`` at them."""
    try:
        return _save(run_dir, model, state, step=step, pointers=pointers, info=info)
    except OSError as exc:
        raise FraglmError(
            f"could not write a checkpoint to {run_dir}: {exc.strerror or exc}; "
            "the previous checkpoint is intact"
        ) from None


def _save(
    run_dir: Path,
    model: torch.nn.Module,
    state: dict[str, Any],
    *,
    step: int,
    pointers: tuple[str, ...],
    info: dict[str, Any] | None,
) -> Path:
    name = f"step-{step:07d}"
    final = run_dir / name
    if not final.is_dir():  # a complete directory of the same step is never rewritten
        tmp = run_dir / f".{name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / WEIGHTS_FILE))
        torch.save(state, tmp / STATE_FILE)
        tmp.rename(final)
    record = {"dir": name, "step": step, **(info or {})}
    for pointer in pointers:
        write_text_atomic(run_dir / f"{pointer}.json", json.dumps(record) + "\n")
    _remove_unreferenced(run_dir)
    return final


def _remove_unreferenced(run_dir: Path) -> None:
    keep = {p["dir"] for name in POINTERS if (p := read_pointer(run_dir, name)) is not None}
    for path in run_dir.glob("step-*"):
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for path in run_dir.glob(".step-*.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def read_pointer(run_dir: Path, name: str) -> dict[str, Any] | None:
    try:
        record = json.loads((run_dir / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "dir" in record else None


def has_checkpoint(run_dir: Path) -> bool:
    return read_pointer(run_dir, "latest") is not None


def checkpoint_dir(run_dir: Path, which: str = "latest") -> Path:
    """Directory of the ``latest`` or ``best`` checkpoint (best falls back to latest)."""
    record = read_pointer(run_dir, which) or read_pointer(run_dir, "latest")
    if record is None:
        raise FraglmError(f"no checkpoint in {run_dir} (train a model first with `fraglm train`)")
    path = run_dir / record["dir"]
    if not path.is_dir():
        raise FraglmError(f"checkpoint {path} named by {run_dir}/{which}.json is missing")
    return path


def load_weights(model: torch.nn.Module, ckpt_dir: Path) -> None:
    path = ckpt_dir / WEIGHTS_FILE
    if not path.is_file():
        raise FraglmError(f"checkpoint weights missing: {path}")
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


def load_state(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / STATE_FILE
    if not path.is_file():
        raise FraglmError(f"checkpoint state missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FraglmError(
            f"checkpoint state {path} is corrupt or unsafe: {first_line(exc)}"
        ) from None


def load_run_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FraglmError(f"{run_dir} is not a fraglm run directory (no {CONFIG_FILE})")
    return load_config(path)
