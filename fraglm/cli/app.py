"""The ``fraglm`` executable: the commands, global options, and one line for every error."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from fraglm.cli import export, inference, tools, training
from fraglm.cli.logs import configure_logging
from fraglm.cli.options import session
from fraglm.errors import FraglmError, describe_exception

DEBUG_ENV = "FRAGLM_DEBUG"

app = typer.Typer(
    help="Train a small language model end to end with FragmentStream attention.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

app.command()(training.tokenize)
app.command()(training.train)
app.command()(inference.generate)
app.command()(inference.chat)
app.command("eval")(training.eval_)
app.command()(export.export)
app.command()(inference.serve)
app.command()(tools.plot)
app.command("attention")(tools.attention_map)
config_app.command("show")(tools.config_show)
config_app.command("reference")(tools.config_reference)


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help=f"Show the traceback of an unexpected error (or {DEBUG_ENV}=1)."
        ),
    ] = False,
) -> None:
    if debug:
        session.debug = True
    configure_logging()


def command() -> None:
    """The ``fraglm`` executable and ``python -m fraglm``: :func:`main` in a process of
    its own, which ``fraglm train`` may tune for itself (see :mod:`fraglm.training.allocator`)."""
    session.own_process = True
    main()


def main() -> None:
    """Entry point: every error becomes one line on stderr and exit code 2.

    A ``FraglmError`` is a problem the user can fix and says so; any other exception that
    escapes a command is a fault fraglm did not foresee, reported in the same one line (its
    type and message) unless debugging (``--debug`` or ``FRAGLM_DEBUG=1``), where it
    propagates with its traceback, as the tests want it.
    """
    session.debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        app()
    except FraglmError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if session.debug:
            raise
        _fail(f"{describe_exception(exc)} (run with --debug for the traceback)")


def _fail(message: str) -> None:
    typer.echo(f"error: {' '.join(message.splitlines())}", err=True)
    sys.exit(2)
