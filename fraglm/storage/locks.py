"""One writer per directory: an exclusive ``fcntl.flock`` on a lock file.

The lock file holds the owner's pid, host, command and start time, so a second writer
is told who holds the directory. The kernel drops a flock when its process dies, so a
lock left by a killed run is stale by construction: the next writer takes it over (and
says whose it was). A clean release deletes the file; a writer that locked a file just
deleted that way sees that its path no longer names it and counts the lock as taken.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fraglm.errors import FraglmError

LOCK_FILE = ".lock"


def _holder_text(holder: dict[str, Any]) -> str:
    pid, host = holder.get("pid"), holder.get("host")
    text = f"pid {pid} on host {host}"
    if holder.get("command"):
        text += f", `{holder['command']}`"
    if holder.get("since"):
        text += f" since {holder['since']}"
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        text += "; that process has exited, but a process it started still holds the lock"
    return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


class DirectoryLock:
    """``with DirectoryLock(lock_path, what): ...`` or ``acquire()`` / ``release()``."""

    def __init__(self, lock_path: Path, what: str) -> None:
        self.path = Path(lock_path)
        self.what = what
        self.stale: str | None = None  # the holder of a lock its process never released
        self._fd = -1

    def acquire(self) -> DirectoryLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise FraglmError(f"could not lock {self.what}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FraglmError(
                f"{self.what} is in use by another fraglm process ({_holder_text(holder)}); "
                "wait for it to finish, or use another directory"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise FraglmError(f"could not lock {self.what}: {exc.strerror or exc}") from None
        if not _names(self.path, fd):  # its holder released and deleted it meanwhile
            os.close(fd)
            return self.acquire()
        previous = _read_holder(fd)
        self.stale = _holder_text(previous) if previous else None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(["fraglm", *sys.argv[1:2]]),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with contextlib.suppress(OSError):  # the lock holds without the note of its owner
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = -1

    def __enter__(self) -> DirectoryLock:
        return self if self._fd >= 0 else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file open as ``fd``."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def lock_run(run_dir: Path) -> DirectoryLock:
    """Take the run directory ``run_dir`` (created if missing) for this process."""
    return DirectoryLock(Path(run_dir) / LOCK_FILE, f"run directory {run_dir}").acquire()


def lock_sibling(path: Path, what: str) -> DirectoryLock:
    """Lock ``path`` through ``.NAME.lock`` beside it, for a directory that is replaced
    as a whole (the token shards), where a lock file inside would be replaced with it."""
    path = Path(path)
    return DirectoryLock(path.with_name(f".{path.name}.lock"), f"{what} {path}").acquire()
