"""The ``fraglm`` command line: parse arguments, load the config, call one function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fraglm.config import Config, load_config, reference_markdown
from fraglm.errors import FraglmError

app = typer.Typer(
    help="Train a small language model end to end with FragmentStream attention.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (default: built-in defaults)."),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a config key, e.g. --set train.lr=1e-3 (repeatable; "
        "`fraglm config reference` lists every key).",
    ),
]


def _load(config: Path | None, overrides: list[str] | None) -> Config:
    return load_config(config, overrides or [])


@app.command()
def tokenize(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Train the BPE tokenizer on the corpus and write the token shards."""
    from fraglm.data import tokenize as run_tokenize

    cfg = _load(config, set_)
    summary = run_tokenize(cfg, progress=cfg.logging.progress)
    typer.echo(f"tokenized {cfg.data.path} -> {cfg.data.tokenized_dir}")
    typer.echo(summary.describe())


@app.command()
def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue the run in train.out_dir from its latest checkpoint."
        ),
    ] = False,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            min=1,
            help="Stop after this many steps in this run (checkpointed; continue with --resume).",
        ),
    ] = None,
) -> None:
    """Train the model (tokenizing first when the token shards are missing or stale)."""
    from fraglm.train import train as run_train

    result = run_train(_load(config, set_), resume=resume, max_new_steps=steps)
    best = f", best val loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    typer.echo(f"trained to step {result.steps}: train loss {result.final_train_loss:.4f}{best}")
    typer.echo(f"run directory: {result.run_dir}")


@config_app.command("show")
def config_show(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    typer.echo(_load(config, set_).to_yaml(), nl=False)


@config_app.command("reference")
def config_reference() -> None:
    """Print every config key with its type, default and meaning (Markdown)."""
    typer.echo(reference_markdown())


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except FraglmError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
