"""``fraglm generate``, ``fraglm chat`` and ``fraglm serve``: a trained run answering."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from fraglm.cli.options import (
    CheckpointOption,
    DeviceOption,
    Raw,
    RunOption,
    checkpoint_choice,
    sample_help,
)
from fraglm.config import Config, SampleConfig, from_dict
from fraglm.errors import FraglmError, read_text_file

Temperature = Annotated[float | None, typer.Option(help=sample_help("temperature"))]
TopK = Annotated[int | None, typer.Option(help=sample_help("top_k"))]
TopP = Annotated[float | None, typer.Option(help=sample_help("top_p"))]
RepetitionPenalty = Annotated[float | None, typer.Option(help=sample_help("repetition_penalty"))]
MaxNewTokens = Annotated[int | None, typer.Option(help=sample_help("max_new_tokens"))]
Seed = Annotated[int | None, typer.Option(help=sample_help("seed"))]
Stop = Annotated[str | None, typer.Option(help=sample_help("stop"))]


def _sampling(run_cfg: Config, **given: object) -> SampleConfig:
    """The run's sample settings with the command-line values on top, validated."""
    merged = {
        **dataclasses.asdict(run_cfg.sample),
        **{k: v for k, v in given.items() if v is not None},
    }
    return from_dict({"sample": merged}).sample


def _sampler(run: str | None, checkpoint: str, device: str, **sampling: object) -> tuple:
    """The run, a generator with its sampling settings (run's config + command line), the
    settings and a seeded RNG: what generate and chat share."""
    from fraglm.inference.generate import Generator, make_rng, stop_ids_for
    from fraglm.runs.loading import load_run

    loaded = load_run(run, which=checkpoint_choice(checkpoint), device=device)
    params = _sampling(loaded.cfg, **sampling)
    generator = Generator(loaded.model, params, stop_ids_for(loaded.tokenizer, params.stop))
    return loaded, generator, params, make_rng(params.seed)


def generate(
    prompt: Annotated[str | None, typer.Argument(help="The question to answer.")] = None,
    run: RunOption = None,
    checkpoint: CheckpointOption = "best",
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    repetition_penalty: RepetitionPenalty = None,
    max_new_tokens: MaxNewTokens = None,
    seed: Seed = None,
    stop: Stop = None,
    num_samples: Annotated[int, typer.Option(min=1, help="Answers to sample per prompt.")] = 1,
    prompts_file: Annotated[
        Path | None, typer.Option(help="One prompt a line; writes JSON lines to stdout.")
    ] = None,
    raw: Raw = False,
    device: DeviceOption = "auto",
) -> None:
    """Answer PROMPT with a trained model, streaming the text as it is produced."""
    from fraglm.inference.generate import prompt_text, stream_text

    if (prompt is None) == (prompts_file is None):
        raise FraglmError("give either a PROMPT or --prompts-file")
    prompts = [prompt] if prompt is not None else _read_prompts(prompts_file)
    for text in prompts:
        prompt_text(text, raw=raw)
    loaded, generator, params, rng = _sampler(
        run, checkpoint, device, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed,
        stop=stop,
    )  # fmt: skip
    for text in prompts:
        for index in range(num_samples):
            pieces = stream_text(
                generator, loaded.tokenizer, prompt_text(text, raw=raw), rng, stop=params.stop
            )
            if prompts_file is None:
                if num_samples > 1:
                    typer.echo(f"--- sample {index + 1}")
                for piece in pieces:
                    typer.echo(piece, nl=False)
                typer.echo()
            else:
                answer = "".join(pieces)
                typer.echo(
                    json.dumps(
                        {"prompt": text, "sample": index, "answer": answer}, ensure_ascii=False
                    )
                )


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise FraglmError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in read_text_file(path, "prompts file").splitlines()]
    prompts = [line for line in prompts if line]
    if not prompts:
        raise FraglmError(f"prompts file {path} has no prompts")
    return prompts


def chat(
    run: RunOption = None,
    checkpoint: CheckpointOption = "best",
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    repetition_penalty: RepetitionPenalty = None,
    max_new_tokens: MaxNewTokens = None,
    seed: Seed = None,
    stop: Stop = None,
    raw: Raw = False,
    device: DeviceOption = "auto",
) -> None:
    """Ask questions one line at a time; an empty line is skipped, Ctrl-D or Ctrl-C ends."""
    from fraglm.inference.generate import prompt_text, stream_text

    loaded, generator, params, rng = _sampler(
        run, checkpoint, device, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed,
        stop=stop,
    )  # fmt: skip
    interactive = sys.stdin.isatty()
    typer.echo(f"fraglm chat: {loaded.run_dir} (step {loaded.step}); Ctrl-D to quit", err=True)
    try:
        while True:
            if interactive:
                typer.echo("> ", nl=False, err=True)
            line = sys.stdin.readline()
            if not line:
                break
            if not line.strip():
                continue
            for piece in stream_text(
                generator,
                loaded.tokenizer,
                prompt_text(line.strip(), raw=raw),
                rng,
                stop=params.stop,
            ):
                typer.echo(piece, nl=False)
            typer.echo()
    except KeyboardInterrupt:
        typer.echo()


def serve(
    run: RunOption = None,
    checkpoint: CheckpointOption = "best",
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every interface; no auth).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    device: DeviceOption = "auto",
) -> None:
    """Serve a trained run: OpenAI-compatible API at /v1 and a chat page at / (serve extra)."""
    try:
        from fraglm.inference.serve.app import serve as run_server
    except ImportError:
        raise FraglmError('serve needs fastapi and uvicorn: pip install -e ".[serve]"') from None
    run_server(run, which=checkpoint_choice(checkpoint), host=host, port=port, device=device)
