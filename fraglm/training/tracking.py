"""Where training metrics go: ``metrics.jsonl`` in the run directory, and wandb when enabled."""

from __future__ import annotations

import json
import math
import secrets
import time
from pathlib import Path
from typing import Any

from fraglm.config import Config
from fraglm.errors import FraglmError, first_line
from fraglm.runs.layout import METRICS_FILE
from fraglm.storage.atomic import AppendFile, write_text_atomic

WANDB_ID_FILE = "wandb_id.txt"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a line cut short by a crash mid-write is skipped."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class Tracker:
    """Appends one JSON line per record; mirrors records to wandb when configured.

    On resume, records past the resumed step (written by the interrupted run after its
    last checkpoint) are dropped, so the file reads like one uninterrupted run.
    """

    def __init__(self, run_dir: Path, cfg: Config, *, resume_step: int | None = None) -> None:
        self.path = run_dir / METRICS_FILE
        if resume_step is None:
            write_text_atomic(self.path, "")
        else:
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = AppendFile(self.path)  # a failed append never damages earlier lines
        self._wandb = _start_wandb(run_dir, cfg, resume=resume_step is not None)

    def log(self, record: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self._file.append(json.dumps(clean) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir: Path, cfg: Config, *, resume: bool) -> Any:
    log = cfg.logging
    if not log.wandb or log.wandb_mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        raise FraglmError(
            "logging.wandb is on but wandb is not installed (pip install wandb)"
        ) from None
    id_file = run_dir / WANDB_ID_FILE
    # our own id: wandb.util.generate_id is gone from recent wandb releases
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(4)
    write_text_atomic(id_file, run_id)
    try:
        return wandb.init(
            project=log.wandb_project,
            name=log.wandb_run_name or run_dir.name,
            id=run_id,
            resume="allow",
            config=cfg.to_dict(),
            mode=log.wandb_mode,
            dir=str(run_dir),
        )
    except Exception as exc:
        raise FraglmError(
            f"wandb could not start ({first_line(exc)}); "
            "use logging.wandb_mode=offline or logging.wandb=false"
        ) from None


class Throughput:
    """Tokens per second between readings (steps of ``tokens_per_step`` tokens)."""

    def __init__(self, step: int, tokens_per_step: int) -> None:
        self._tokens_per_step = tokens_per_step
        self._last = (time.perf_counter(), step)

    def since_last(self, step: int) -> float:
        """The rate since the previous reading (or the start), now at ``step``."""
        now = time.perf_counter()
        since, since_step = self._last
        self._last = (now, step)
        return (step - since_step) * self._tokens_per_step / max(now - since, 1e-9)
