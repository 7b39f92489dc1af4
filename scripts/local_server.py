"""``fraglm serve`` in a child process on 127.0.0.1, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# the folder that holds the fraglm package, so the child imports this very fraglm
PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def server_process(
    run: Path,
    *,
    env: dict[str, str] | None = None,
    output: IO[str] | None = None,
    start_timeout_s: float = 120,
) -> Iterator[str]:
    """Start ``fraglm serve --run RUN`` on a free port and yield its base URL once
    ``/health`` answers; the process is terminated (killed if it lingers) on exit."""
    port = free_port()
    command = [sys.executable, "-m", "fraglm", "serve", "--run", str(run), "--port", str(port)]
    child_env = {**os.environ, "PYTHONPATH": str(PACKAGE_PARENT), **(env or {})}
    sink = output if output is not None else subprocess.DEVNULL
    proc = subprocess.Popen(command, env=child_env, stdout=sink, stderr=sink)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"fraglm serve exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"fraglm serve did not answer within {start_timeout_s:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
