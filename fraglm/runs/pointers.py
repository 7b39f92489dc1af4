"""``latest.json`` and ``best.json``: which checkpoint of a run is the latest and the best.

A pointer is ``{"dir": "step-NNNNNNN", "step": N, ...}``, replaced atomically, so a kill
at any moment leaves it naming a complete checkpoint; reading one that is anything else
is a one-line error naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fraglm.errors import FraglmError
from fraglm.runs.layout import STEP_DIR, pointer_file
from fraglm.storage.atomic import write_text_atomic


def read_pointer(run_dir: Path, name: str) -> dict[str, Any] | None:
    """The record of ``NAME.json``; None when the file does not exist, a one-line error when
    it is anything but ``{"dir": "step-NNNNNNN", "step": N, ...}``."""
    path = run_dir / pointer_file(name)
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


def write_pointer(run_dir: Path, name: str, record: dict[str, Any]) -> None:
    """Point ``NAME.json`` at ``record["dir"]`` (atomically)."""
    write_text_atomic(run_dir / pointer_file(name), json.dumps(record) + "\n")


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
