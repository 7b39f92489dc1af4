"""Opening a run directory for ``fraglm train``: a new run, a run started over
(``--overwrite``) or a run resumed (``--resume``, ``--resume-from step-N``)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from fraglm.errors import FraglmError
from fraglm.runs.checkpoint import remove_stale_temporaries
from fraglm.runs.layout import RUN_FILES, pointer_file, run_contents, step_dirs, step_name, step_of
from fraglm.runs.pointers import read_pointer, write_pointer
from fraglm.runs.verify import Checkpoint, newest_good_checkpoint, verifies, verify_checkpoint

logger = logging.getLogger(__name__)


def open_run_dir(
    run_dir: Path, *, resume: bool, resume_from: str | None, overwrite: bool, writable: bool
) -> Checkpoint | None:
    """Ready ``run_dir`` for ``fraglm train`` (call it holding the run lock when
    ``writable``): remove stale temporaries, refuse to start over an existing run unless
    ``overwrite``, and return the verified checkpoint to resume from, read once (None for
    a new run). Nothing is written when this raises."""
    if writable and run_dir.is_dir():
        removed = remove_stale_temporaries(run_dir)
        if removed:
            logger.info(
                "note: removed %s left in %s by an interrupted save", ", ".join(removed), run_dir
            )
    if resume or resume_from is not None:
        if overwrite:
            raise FraglmError("--overwrite starts a new run; it does not go with --resume")
        checkpoint = resume_target(run_dir, resume_from)
        if writable and resume_from is not None:
            _adopt(run_dir, checkpoint.path)
        return checkpoint
    found = run_contents(run_dir)
    if found and not overwrite:
        raise FraglmError(
            f"{run_dir} already holds a trained run ({', '.join(found[:4])}); continue it "
            "with --resume, choose another train.out_dir, or start over with --overwrite"
        )
    if found and writable:
        clear_run(run_dir)
    return None


def clear_run(run_dir: Path) -> None:
    """Remove a run's files (``--overwrite``): pointers first, so an interrupted clear
    never leaves a pointer to a removed checkpoint."""
    for name in ("latest.json", "best.json", *RUN_FILES):
        (run_dir / name).unlink(missing_ok=True)
    for path in step_dirs(run_dir):
        shutil.rmtree(path)


def _checkpoint_name(text: str) -> str:
    """``step-0000300``, ``step-300`` or ``300`` -> ``step-0000300``."""
    digits = text.strip().removeprefix("step-")
    if not digits.isdigit() or len(digits) > 12:
        raise FraglmError(f"--resume-from must name a checkpoint like step-0000300, not {text!r}")
    return step_name(int(digits))


def resume_target(run_dir: Path, resume_from: str | None = None) -> Checkpoint:
    """The checkpoint a resumed run starts from: ``resume_from`` or the one ``latest.json``
    names, verified. When the latest fails, the error names the newest one that verifies."""
    if not run_dir.is_dir():
        raise FraglmError(f"cannot resume: no checkpoint in {run_dir}")
    if resume_from is not None:
        path = run_dir / _checkpoint_name(resume_from)
        if not path.is_dir():
            names = ", ".join(p.name for p in step_dirs(run_dir)) or "none"
            raise FraglmError(f"cannot resume: no {path.name} in {run_dir} (it holds: {names})")
        return verify_checkpoint(path)
    try:
        record = read_pointer(run_dir, "latest")
        if record is None:
            raise FraglmError(f"cannot resume: no checkpoint in {run_dir}")
        checkpoint = verify_checkpoint(run_dir / record["dir"])
        read_pointer(run_dir, "best")  # checked now: the next save reads it
    except FraglmError as exc:
        good = newest_good_checkpoint(run_dir)
        if good is None:
            raise
        raise FraglmError(
            f"{exc}; {good.name} is the newest checkpoint that verifies: continue from it "
            f"with --resume-from {good.name}"
        ) from None
    return checkpoint


def _adopt(run_dir: Path, chosen: Path) -> None:
    """Make ``chosen`` the run's latest checkpoint: newer checkpoints belong to the
    abandoned continuation and go, and so does a best pointer that is not usable."""
    step = step_of(chosen)
    write_pointer(run_dir, "latest", {"dir": chosen.name, "step": step})
    try:
        best = read_pointer(run_dir, "best")
        usable = (
            best is not None
            and best["step"] <= step
            and (best["dir"] == chosen.name or verifies(run_dir / best["dir"]))
        )
    except FraglmError:
        usable = False
    if not usable:
        (run_dir / pointer_file("best")).unlink(missing_ok=True)
    for path in step_dirs(run_dir):
        if step_of(path) > step:
            shutil.rmtree(path)
    logger.info("resuming from %s (step %d)", chosen, step)
