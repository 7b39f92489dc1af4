"""The layout of a run directory (``train.out_dir``): the names of its files, its
checkpoint directories, and the config and tokenizer that make it stand on its own::

    config.yaml  tokenizer.json  metrics.jsonl  .lock
    step-0000200/model.safetensors  step-0000200/state.pt  step-0000200/manifest.json
    latest.json  best.json          pointers: {"dir": "step-0000200", "step": 200, ...}
"""

from __future__ import annotations

import re
from pathlib import Path

from fraglm.config import Config, load_config
from fraglm.data.tokenizer import TOKENIZER_FILE
from fraglm.errors import FraglmError
from fraglm.storage.atomic import write_bytes_atomic, write_text_atomic

CONFIG_FILE, METRICS_FILE = "config.yaml", "metrics.jsonl"
WEIGHTS_FILE, STATE_FILE, MANIFEST_FILE = "model.safetensors", "state.pt", "manifest.json"
CHECKPOINT_FILES = (WEIGHTS_FILE, STATE_FILE)
POINTERS = ("latest", "best")
STEP_DIR = re.compile(r"step-(\d{7,})")
# what a run directory holds besides its checkpoints: a directory with any of these holds a run
RUN_FILES = (CONFIG_FILE, TOKENIZER_FILE, METRICS_FILE, "latest.json", "best.json", "wandb_id.txt")


def pointer_file(name: str) -> str:
    """``latest`` -> ``latest.json``."""
    return f"{name}.json"


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def step_of(ckpt_dir: Path) -> int:
    """The step of a checkpoint directory named ``step-NNNNNNN``."""
    return int(ckpt_dir.name.removeprefix("step-"))


def step_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, newest first."""
    found = [p for p in run_dir.glob("step-*") if STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=step_of, reverse=True)


def run_contents(run_dir: Path) -> list[str]:
    """The names of what makes ``run_dir`` a run (empty when it holds none)."""
    if not run_dir.is_dir():
        return []
    names = [name for name in RUN_FILES if (run_dir / name).exists()]
    return names + [p.name for p in step_dirs(run_dir)]


def write_run_files(run_dir: Path, cfg: Config, tokenizer_path: Path) -> None:
    """The resolved config and the tokenizer, so the run directory stands on its own."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_FILE, cfg.to_yaml())
    write_bytes_atomic(run_dir / TOKENIZER_FILE, tokenizer_path.read_bytes())


def load_run_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FraglmError(f"{run_dir} is not a fraglm run directory (no {CONFIG_FILE})")
    return load_config(path)
