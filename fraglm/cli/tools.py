"""``fraglm plot``, ``fraglm attention`` and ``fraglm config``: looking at runs and settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fraglm.cli.options import ConfigOption, Raw, RunOption, SetOption, load
from fraglm.config import reference_markdown


def plot(
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path(
        "curves.png"
    ),
    run: Annotated[
        list[str] | None,
        typer.Option("--run", "-r", help="Run to plot (repeatable; default: most recent)."),
    ] = None,
) -> None:
    """Plot loss, perplexity and learning rate against tokens seen (needs the viz extra)."""
    from fraglm.tools.plot import plot_runs

    typer.echo(f"wrote {plot_runs(run or [None], out)}")


def attention_map(
    text: Annotated[str, typer.Argument(help="Prompt whose attention to draw.")],
    run: RunOption = None,
    layer: Annotated[str, typer.Option(help="Layer index, or 'all' for a grid.")] = "0",
    head: Annotated[str, typer.Option(help="Head index, or 'all' for a grid.")] = "0",
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path(
        "attention.png"
    ),
    raw: Raw = False,
) -> None:
    """Draw attention weights over the prompt's tokens (needs the viz extra)."""
    from fraglm.tools.inspect_attention import draw_attention

    typer.echo(f"wrote {draw_attention(run, text, layer=layer, head=head, out=out, raw=raw)}")


def config_show(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    typer.echo(load(config, set_).to_yaml(), nl=False)


def config_reference() -> None:
    """Print every config key with its type, default and meaning (Markdown)."""
    typer.echo(reference_markdown())
