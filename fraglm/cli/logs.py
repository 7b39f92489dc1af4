"""Where the ``fraglm.*`` loggers speak when fraglm runs as a command: set by the command,
never by library code (a library user's process keeps its own logging)."""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

LOG_ALL_RANKS_ENV = "FRAGLM_LOG_ALL_RANKS"


class _StatusLines(logging.Handler):
    """fraglm's status lines, plain: information on stdout, warnings on stderr (so a note
    never mixes into text that ``fraglm generate`` streams to stdout). Through
    ``tqdm.write``, so a progress bar on screen is not broken up, and to the streams of the
    moment (which tests and callers may replace)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        try:
            tqdm.write(self.format(record), file=stream)
        except Exception:
            self.handleError(record)


def _on_rank_zero(record: logging.LogRecord) -> bool:
    return os.environ.get("RANK", "0") == "0"  # RANK: set by torchrun for every rank


_status_lines = _StatusLines()


def configure_logging() -> None:
    """The ``fraglm.*`` loggers speak at INFO (warnings on stderr); under torchrun only
    rank 0 does, unless ``FRAGLM_LOG_ALL_RANKS=1``. Idempotent: one handler, however
    often a process runs a command."""
    logger = logging.getLogger("fraglm")
    logger.setLevel(logging.INFO)
    _status_lines.filters.clear()
    if os.environ.get(LOG_ALL_RANKS_ENV, "") in ("", "0"):
        _status_lines.addFilter(_on_rank_zero)
    if _status_lines not in logger.handlers:
        logger.addHandler(_status_lines)
