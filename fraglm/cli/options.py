"""Options shared by several commands, and the state of the command being run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from fraglm.config import Config, SampleConfig, load_config
from fraglm.errors import FraglmError


@dataclasses.dataclass
class Session:
    """``debug``: show the traceback of an unforeseen error (``--debug``);
    ``own_process``: this process is the ``fraglm`` command's own, which ``fraglm train``
    may tune for itself (see :mod:`fraglm.training.allocator`)."""

    debug: bool = False
    own_process: bool = False


session = Session()

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
RunOption = Annotated[
    str | None,
    typer.Option(
        "--run", "-r", help="Run directory or name under checkpoints/ (default: most recent)."
    ),
]
CheckpointOption = Annotated[
    str, typer.Option("--checkpoint", help="Which checkpoint: best (lowest val loss) or latest.")
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
Raw = Annotated[bool, typer.Option("--raw", help="Use the prompt as is, without the Q&A template.")]


def sample_help(name: str) -> str:
    """The help text of a ``sample.*`` key: the config dataclass is its one source."""
    return next(f.metadata["help"] for f in dataclasses.fields(SampleConfig) if f.name == name)


def load(config: Path | None, overrides: list[str] | None) -> Config:
    return load_config(config, overrides or [])


def checkpoint_choice(which: str) -> str:
    if which not in ("best", "latest"):
        raise FraglmError(f"--checkpoint must be best or latest, not {which!r}")
    return which
