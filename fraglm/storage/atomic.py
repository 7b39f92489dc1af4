"""Writing files so that a failure never leaves a half-written one behind.

Every file fraglm writes goes through here. A whole file is written to a temporary file in
the same directory, flushed and fsynced, then renamed over the target (a rename within one
directory is atomic), and the directory is fsynced so the rename itself survives a power
cut. When anything fails (a full disk, a file-size limit, a kill) the temporary file is
removed and the target keeps its previous content. Appended lines (``metrics.jsonl``) are
cut back to the last complete line when an append fails.

An ``OSError`` becomes a one-line ``FraglmError`` naming the file and the system's reason
("could not write run/model.safetensors: No space left on device").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fraglm.errors import FraglmError

TEMP_MARK = ".tmp-"


def temp_name(path: Path) -> Path:
    """The temporary sibling a write of ``path`` goes through: ``.NAME.tmp-PID``."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def write_error(path: Path, exc: OSError) -> FraglmError:
    return FraglmError(f"could not write {path}: {exc.strerror or exc}")


def fsync_dir(path: Path) -> None:
    """Make the renames inside ``path`` durable. Best effort: some file systems (and
    platforms without directory file descriptors) refuse to fsync a directory, and the
    data itself is already on disk by then."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """``with atomic_write(path) as fh: fh.write(...)``: ``path`` changes only if the block
    and the flush to disk succeed."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with tmp.open("wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_write(path) as fh:
        fh.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


class AppendFile:
    """A file that grows by whole records: a failed append is cut back off, so the lines
    written before it stay intact and the next append starts on a fresh line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def append(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        try:
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise write_error(self.path, exc) from None
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise write_error(self.path, exc) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
