"""One writer per run directory: a second one is told who holds it; stale locks are taken."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from fraglm.errors import FraglmError
from fraglm.storage import locks

HOLD = """
import sys, time
from fraglm.storage import locks
lock = locks.lock_run(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_told_who_holds_the_directory(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FraglmError) as error:
            locks.lock_run(run_dir)
        message = str(error.value)
        assert message.startswith(f"run directory {run_dir} is in use by another fraglm process")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "\n" not in message
    finally:
        holder.kill()
        holder.wait(timeout=30)
    locks.lock_run(run_dir).release()  # the kernel dropped the dead holder's lock


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    first = locks.lock_run(tmp_path)
    with pytest.raises(FraglmError, match=f"pid {os.getpid()}"):
        locks.lock_run(tmp_path)
    first.release()
    with locks.lock_run(tmp_path) as second:
        assert json.loads((tmp_path / locks.LOCK_FILE).read_text())["pid"] == os.getpid()
        assert second.stale is None
    assert not (tmp_path / locks.LOCK_FILE).exists()  # a clean release leaves nothing


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    record = {"pid": pid, "host": socket.gethostname(), "command": "fraglm train",
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    (tmp_path / locks.LOCK_FILE).write_text(json.dumps(record))
    lock = locks.lock_run(tmp_path)
    assert lock.stale.startswith(f"pid {pid} on host {socket.gethostname()}, `fraglm train`")
    lock.release()
