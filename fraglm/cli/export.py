"""``fraglm export``: a trained run as a Hugging Face directory or a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fraglm.cli.options import CheckpointOption, RunOption, checkpoint_choice
from fraglm.errors import FraglmError


def export(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory (hf) or .gguf file (gguf) to write.")
    ],
    run: RunOption = None,
    format_: Annotated[
        str,
        typer.Option(
            "--format", help="Export format: hf (Hugging Face Llama) or gguf (llama.cpp, Ollama)."
        ),
    ] = "hf",
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="GGUF weight type: f32 (default), f16 or q8_0."),
    ] = None,
    checkpoint: CheckpointOption = "best",
) -> None:
    """Write a trained run as a Hugging Face model directory or a GGUF file."""
    if format_ == "gguf":
        from fraglm.export.gguf import export_gguf

        path = export_gguf(run, out, which=checkpoint_choice(checkpoint), dtype=dtype or "f32")
        typer.echo(f"exported to {path} (llama.cpp: llama-cli -m {path}; Ollama: see README)")
        return
    from fraglm.export.hf import export_hf

    if format_ != "hf":
        raise FraglmError(f"--format must be hf or gguf, not {format_!r}")
    if dtype is not None:
        raise FraglmError("--dtype applies to --format gguf (hf export writes float32)")
    path = export_hf(run, out, which=checkpoint_choice(checkpoint))
    typer.echo(f"exported to {path} (AutoModelForCausalLM / AutoTokenizer.from_pretrained)")
