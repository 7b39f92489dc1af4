"""What a run starts from, the checks that a resumed run is still the run it was, and the
training state a checkpoint holds besides the weights.

A resumed run may change its schedule, not the model, the corpus or the tokenizer it was
built on; and it restores the optimizer, the scaler and every random number generator, so
it continues bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from fraglm.config import Config
from fraglm.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from fraglm.errors import FraglmError
from fraglm.runs.init_from import parent_run
from fraglm.runs.layout import STATE_FILE, load_run_config
from fraglm.runs.verify import Checkpoint, check_optimizer_state
from fraglm.training.early_stopping import BestValidation
from fraglm.training.optim import optimizer_parts

_NEW_RUN = "restore it, or train a new run with another train.out_dir"


@dataclass(frozen=True)
class StartPoint:
    """``checkpoint``: the checkpoint a resumed run continues from (read and verified once);
    ``parent``: the run whose weights a new run starts from (``train.init_from``);
    ``tokenizer``: the tokenizer the corpus must be encoded with (the parent's), None to
    train one."""

    checkpoint: Checkpoint | None
    parent: Path | None
    tokenizer: Tokenizer | None

    @property
    def state(self) -> dict[str, Any] | None:
        """The resumed checkpoint's training state (None for a new run)."""
        return None if self.checkpoint is None else self.checkpoint.state


def start_point(cfg: Config, run_dir: Path, resumed: Checkpoint | None) -> StartPoint:
    """Read what the run in ``run_dir`` starts from, refusing a resume whose model or
    tokenizer settings changed."""
    saved = load_run_config(run_dir) if resumed is not None else None
    parent = None if resumed is not None else parent_run(cfg)
    # a run started from another keeps the parent's tokenizer (a copy is in its run dir),
    # also when it is resumed without --init-from
    tokenizer = None
    if parent is not None:
        tokenizer = load_tokenizer(parent / TOKENIZER_FILE)
    elif saved is not None and saved.train.init_from is not None:
        tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    if saved is not None:
        check_compatible(saved, cfg)
    return StartPoint(resumed, parent, tokenizer)


def check_compatible(saved: Config, cfg: Config) -> None:
    """A resumed run may change the schedule, not the model or the data it was built on."""
    for section in ("model", "tokenizer"):
        old, new = getattr(saved, section).__dict__, getattr(cfg, section).__dict__
        for key, value in old.items():
            if new[key] != value:
                raise FraglmError(
                    f"cannot resume: {section}.{key} is {value!r} in the checkpoint but "
                    f"{new[key]!r} in the config"
                )


def check_same_corpus(run_dir: Path, saved: str | None, fingerprint: str, cfg: Config) -> None:
    """Refuse, before anything is tokenized again, a corpus or data setting changed since
    the run began (``saved``: the checkpoint's corpus fingerprint, None in checkpoints of
    older versions): tokenizing would train another tokenizer under the old weights."""
    if saved is not None and saved != fingerprint:
        raise FraglmError(
            f"cannot resume: the corpus {cfg.data.path} or a data.* setting changed since "
            f"{run_dir} was trained; {_NEW_RUN}"
        )


def check_same_tokenizer(run_dir: Path, data_dir: Path) -> None:
    run_tokenizer, data_tokenizer = run_dir / TOKENIZER_FILE, data_dir / TOKENIZER_FILE
    if not run_tokenizer.is_file() or run_tokenizer.read_bytes() != data_tokenizer.read_bytes():
        raise FraglmError(
            f"cannot resume: {data_tokenizer} is not the tokenizer {run_dir} was trained with "
            f"({run_tokenizer}); {_NEW_RUN}"
        )


def training_state(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    step: int,
    best: BestValidation,
    corpus_fingerprint: str | None,
) -> dict[str, Any]:
    """What a checkpoint holds besides the weights: the rest of what shapes the loss curve."""
    return {
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _rng_state(device),
        "step": step,
        "best_val": best.loss,
        "corpus_fingerprint": corpus_fingerprint,
        "best_step": best.step,
        "evals_since_best": best.evals_since,
    }


def restore_training_state(
    checkpoint: Checkpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
) -> tuple[int, BestValidation]:
    """Load ``checkpoint`` (read and verified already) into a freshly built model,
    optimizer and scaler, and the RNGs; the step and best validation to continue from."""
    ckpt_dir, state = checkpoint.path, checkpoint.state
    checkpoint.load_weights_into(model)
    for part, saved in optimizer_parts(optimizer, state["optimizer"], ckpt_dir):
        check_optimizer_state(saved, part, ckpt_dir / STATE_FILE)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], device)
        best = BestValidation(
            state.get("best_val"), state.get("best_step"), int(state.get("evals_since_best", 0))
        )
        return int(state["step"]), best
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise FraglmError(f"checkpoint state in {ckpt_dir} is incompatible: {exc}") from None


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])
