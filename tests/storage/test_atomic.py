"""Atomic writes: a failed write leaves the previous file, no temporary, and one line."""

import errno
import os
import subprocess
import sys

import pytest

from fraglm.errors import FraglmError
from fraglm.storage import atomic


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic.write_text_atomic(path, "old")
    atomic.write_text_atomic(path, "new ünïcode")
    assert path.read_text(encoding="utf-8") == "new ünïcode"
    assert os.listdir(tmp_path) == ["a.txt"]


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_a_failed_write_keeps_the_old_content_and_says_why(tmp_path, monkeypatch, where):
    path = tmp_path / "a.txt"
    atomic.write_text_atomic(path, "old")
    monkeypatch.setattr(atomic.os, where, _no_space)
    with pytest.raises(FraglmError) as error:
        atomic.write_text_atomic(path, "new")
    monkeypatch.undo()
    assert str(error.value) == f"could not write {path}: No space left on device"
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_an_interrupted_write_removes_its_temporary(tmp_path):
    path = tmp_path / "a.bin"
    with pytest.raises(KeyboardInterrupt), atomic.atomic_write(path) as fh:
        fh.write(b"half")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_a_write_into_a_missing_directory(tmp_path):
    with pytest.raises(FraglmError, match=r"could not write .*: No such file or directory"):
        atomic.write_text_atomic(tmp_path / "nope" / "a.txt", "x")


def test_a_failed_append_leaves_the_earlier_lines_whole(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    log = atomic.AppendFile(path)
    log.append('{"step": 1}\n')
    real_write = os.write

    def short_then_full(fd, data):
        real_write(fd, bytes(data[:3]))  # part of the line reaches the file, then the disk is full
        _no_space()

    monkeypatch.setattr(atomic.os, "write", short_then_full)
    with pytest.raises(FraglmError, match=r"log\.jsonl: No space left on device"):
        log.append('{"step": 2}\n')
    monkeypatch.undo()
    log.append('{"step": 3}\n')
    log.close()
    assert path.read_text() == '{"step": 1}\n{"step": 3}\n'


LIMITED_WRITE = """
import resource, sys
from fraglm.storage import atomic
from fraglm.errors import FraglmError
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
log = atomic.AppendFile(sys.argv[2])
for text in ("x" * 600 + "\\n", "y" * 600 + "\\n"):
    try:
        log.append(text)
    except FraglmError as exc:
        print(exc)
try:
    atomic.write_text_atomic(sys.argv[1], "z" * 5000)
except FraglmError as exc:
    print(exc)
"""


def test_a_file_size_limit_in_a_real_process(tmp_path):
    target, log = tmp_path / "big.txt", tmp_path / "log.txt"
    target.write_text("previous")
    result = subprocess.run(
        [sys.executable, "-c", LIMITED_WRITE, str(target), str(log)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"could not write {log}: File too large",
        f"could not write {target}: File too large",
    ]
    assert target.read_text() == "previous" and log.read_text() == "x" * 600 + "\n"
    assert sorted(os.listdir(tmp_path)) == ["big.txt", "log.txt"]
