"""Finding and loading a trained run directory (for generate, chat, eval and friends)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from fraglm.config import Config
from fraglm.data.tokenizer import TOKENIZER_FILE, load_tokenizer, vocab_size
from fraglm.device import resolve_device
from fraglm.errors import FraglmError
from fraglm.nn.model import Transformer
from fraglm.runs.layout import load_run_config, step_of
from fraglm.runs.pointers import checkpoint_dir
from fraglm.runs.verify import load_weights

DEFAULT_ROOT = Path("checkpoints")


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: Config
    model: Transformer
    tokenizer: Tokenizer
    device: torch.device
    step: int


def find_run(run: str | Path | None, root: Path = DEFAULT_ROOT) -> Path:
    """The named run directory, or the most recently trained run under ``root``."""
    if run is not None:
        path = Path(run)
        if not path.is_dir() and (root / path).is_dir():
            path = root / path
        if not path.is_dir():
            raise FraglmError(f"run not found: {run}")
        return path
    runs = [p.parent for p in root.glob("*/latest.json")]
    if not runs:
        raise FraglmError(f"no trained run found under {root}/ (train one with `fraglm train`)")
    return max(runs, key=lambda p: (p / "latest.json").stat().st_mtime)


def load_run(run: str | Path | None, *, which: str = "best", device: str = "auto") -> LoadedRun:
    """Config, tokenizer and weights of a run, ready for inference (eval mode)."""
    run_dir = find_run(run)
    cfg = load_run_config(run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    path = checkpoint_dir(run_dir, which)
    model = Transformer(cfg.model, vocab_size(tokenizer))
    load_weights(model, path)
    target = resolve_device(device)
    model.to(target).eval()
    step = step_of(path)
    return LoadedRun(run_dir, cfg, model, tokenizer, target, step)
