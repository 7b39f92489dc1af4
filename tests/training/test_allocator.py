"""glibc malloc keeps freed blocks for reuse, only in the process of `fraglm train` on CPU."""

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from fraglm.cli.options import session
from fraglm.config import load_config
from fraglm.data.shards import tokenize
from fraglm.training import allocator
from fraglm.training.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "configs" / "tiny.yaml"
SAMPLE = [f"data.path={json.dumps(str(REPO_ROOT / 'data' / 'sample_health_qa.jsonl'))}"]
glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not glibc, reason="glibc only")
def test_glibc_accepts_the_settings():
    # in a process of its own: the setting is process-wide, and not for the test runner's
    code = "from fraglm.training.allocator import keep_freed_memory as k; assert k() and k()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_elsewhere_nothing_changes(monkeypatch):
    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    assert not allocator.keep_freed_memory()


@pytest.fixture
def calls(monkeypatch) -> list[bool]:
    recorded: list[bool] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: recorded.append(True))
    return recorded


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    """The sample corpus tokenized once for the module's tiny runs."""
    out = tmp_path_factory.mktemp("allocator") / "tokenized"
    tokenize(
        load_config(TINY, [f"data.tokenized_dir={json.dumps(str(out))}", *SAMPLE]), progress=False
    )
    return out


def _overrides(tokenized: Path, tmp_path: Path) -> list[str]:
    return [
        *SAMPLE,
        f"data.tokenized_dir={json.dumps(str(tokenized))}",
        f"train.out_dir={json.dumps(str(tmp_path / 'run'))}",
        "train.max_steps=1",
        "logging.progress=false",
    ]


@pytest.mark.parametrize("own_process", [True, False], ids=["fraglm command", "in-process"])
def test_only_the_commands_own_process_is_tuned(
    tokenized, tmp_path, run_cli, calls, monkeypatch, own_process
):
    monkeypatch.setattr(session, "own_process", own_process)
    args = [arg for item in _overrides(tokenized, tmp_path) for arg in ("--set", item)]
    result = run_cli("train", "-c", TINY, *args)
    assert result.exit_code == 0, result.stderr
    assert calls == ([True] if own_process else [])


def test_a_trainer_used_as_a_library_leaves_malloc_alone(tokenized, tmp_path, calls):
    cfg = load_config(TINY, _overrides(tokenized, tmp_path))
    Trainer(cfg).run()
    assert calls == []
