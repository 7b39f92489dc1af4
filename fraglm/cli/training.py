"""``fraglm tokenize``, ``fraglm train`` and ``fraglm eval``."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Annotated

import typer

from fraglm.cli.options import (
    CheckpointOption,
    ConfigOption,
    DeviceOption,
    RunOption,
    SetOption,
    checkpoint_choice,
    load,
    session,
)
from fraglm.errors import FraglmError

if TYPE_CHECKING:
    from fraglm.training.trainer import TrainResult


def tokenize(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Train the BPE tokenizer on the corpus and write the token shards."""
    from fraglm.data.shards import tokenize as run_tokenize

    cfg = load(config, set_)
    summary = run_tokenize(cfg, progress=cfg.logging.progress)
    typer.echo(f"tokenized {cfg.data.path} -> {cfg.data.tokenized_dir}")
    typer.echo(summary.describe())


Resume = Annotated[
    bool,
    typer.Option("--resume", help="Continue the run in train.out_dir from its latest checkpoint."),
]
Steps = Annotated[
    int | None,
    typer.Option(
        "--steps",
        min=1,
        help="Stop after this many steps in this run (checkpointed; continue with --resume).",
    ),
]
InitFrom = Annotated[
    str | None,
    typer.Option(
        "--init-from",
        help="Start a new run from this run's best weights and tokenizer (same model "
        "shape); sets train.init_from.",
    ),
]
ResumeFrom = Annotated[
    str | None,
    typer.Option(
        "--resume-from",
        help="Continue from this checkpoint (e.g. step-0000300) instead of the latest; "
        "later checkpoints of the run are dropped.",
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Start over in a train.out_dir that holds a run.")
]


def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: Resume = False,
    steps: Steps = None,
    init_from: InitFrom = None,
    resume_from: ResumeFrom = None,
    overwrite: Overwrite = False,
) -> None:
    """Train the model (tokenizing first when the token shards are missing or stale)."""
    from fraglm.device import resolve_device
    from fraglm.training.trainer import train as run_train

    if init_from is not None and (resume or resume_from is not None):
        raise FraglmError("--init-from starts a new run; --resume continues one: give one")
    overrides = [
        *(set_ or []),
        *([f"train.init_from={json.dumps(init_from)}"] if init_from else []),
    ]
    cfg = load(config, overrides)
    if session.own_process and resolve_device(cfg.train.device).type == "cpu":
        from fraglm.training.allocator import keep_freed_memory

        keep_freed_memory()  # process-wide: only in the fraglm command's own process
    result = run_train(
        cfg, resume=resume, max_new_steps=steps, resume_from=resume_from, overwrite=overwrite
    )
    typer.echo(_outcome(result))
    typer.echo(f"run directory: {result.run_dir}")


def _outcome(result: TrainResult) -> str:
    if math.isnan(result.final_train_loss) and result.stopped_early:
        return (
            f"nothing to do: the run stopped early at step {result.steps} "
            "(raise train.early_stopping_patience, or set it to 0, to train on)"
        )
    if math.isnan(result.final_train_loss):
        return f"nothing to do: the run is already at step {result.steps} (train.max_steps)"
    best = f", best val loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    return f"trained to step {result.steps}: train loss {result.final_train_loss:.4f}{best}"


def eval_(
    run: RunOption = None,
    data: Annotated[
        str | None,
        typer.Option(help="Corpus file to evaluate on (default: the run's validation split)."),
    ] = None,
    checkpoint: CheckpointOption = "best",
    device: DeviceOption = "auto",
) -> None:
    """Validation loss, perplexity, bits per byte and token count of a trained run."""
    from fraglm.training.run_evaluation import evaluate_run

    result = evaluate_run(run, data=data, which=checkpoint_choice(checkpoint), device=device)
    typer.echo(
        f"{result.source}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f}, "
        f"{result.bits_per_byte:.4f} bits per byte, {result.tokens:,} tokens"
    )
