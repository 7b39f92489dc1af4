"""The ``fraglm`` command line: parse arguments, load the config, call one function."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from tqdm.auto import tqdm

from fraglm.config import Config, SampleConfig, from_dict, load_config, reference_markdown
from fraglm.errors import FraglmError, describe_exception, read_text_file

app = typer.Typer(
    help="Train a small language model end to end with FragmentStream attention.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
DEBUG_ENV = "FRAGLM_DEBUG"
LOG_ALL_RANKS_ENV = "FRAGLM_LOG_ALL_RANKS"
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
    from fraglm.data.shards import tokenize as run_tokenize

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
    init_from: Annotated[
        str | None,
        typer.Option(
            "--init-from",
            help="Start a new run from this run's best weights and tokenizer (same model "
            "shape); sets train.init_from.",
        ),
    ] = None,
    resume_from: Annotated[
        str | None,
        typer.Option(
            "--resume-from",
            help="Continue from this checkpoint (e.g. step-0000300) instead of the latest; "
            "later checkpoints of the run are dropped.",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Start over in a train.out_dir that holds a run."),
    ] = False,
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
    cfg = _load(config, overrides)
    if _own_process and resolve_device(cfg.train.device).type == "cpu":
        from fraglm.training.allocator import keep_freed_memory

        keep_freed_memory()  # process-wide: only in the fraglm command's own process
    result = run_train(
        cfg, resume=resume, max_new_steps=steps, resume_from=resume_from, overwrite=overwrite
    )
    best = f", best val loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    if math.isnan(result.final_train_loss) and result.stopped_early:
        typer.echo(
            f"nothing to do: the run stopped early at step {result.steps} "
            "(raise train.early_stopping_patience, or set it to 0, to train on)"
        )
    elif math.isnan(result.final_train_loss):
        typer.echo(f"nothing to do: the run is already at step {result.steps} (train.max_steps)")
    else:
        typer.echo(
            f"trained to step {result.steps}: train loss {result.final_train_loss:.4f}{best}"
        )
    typer.echo(f"run directory: {result.run_dir}")


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


def _sample_help(name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(SampleConfig) if f.name == name)


Temperature = Annotated[float | None, typer.Option(help=_sample_help("temperature"))]
TopK = Annotated[int | None, typer.Option(help=_sample_help("top_k"))]
TopP = Annotated[float | None, typer.Option(help=_sample_help("top_p"))]
RepetitionPenalty = Annotated[float | None, typer.Option(help=_sample_help("repetition_penalty"))]
MaxNewTokens = Annotated[int | None, typer.Option(help=_sample_help("max_new_tokens"))]
Seed = Annotated[int | None, typer.Option(help=_sample_help("seed"))]
Stop = Annotated[str | None, typer.Option(help=_sample_help("stop"))]
Raw = Annotated[bool, typer.Option("--raw", help="Use the prompt as is, without the Q&A template.")]


def _sampling(run_cfg: Config, **given: object) -> SampleConfig:
    """The run's sample settings with the command-line values on top, validated."""
    merged = {
        **dataclasses.asdict(run_cfg.sample),
        **{k: v for k, v in given.items() if v is not None},
    }
    return from_dict({"sample": merged}).sample


def _checkpoint_choice(which: str) -> str:
    if which not in ("best", "latest"):
        raise FraglmError(f"--checkpoint must be best or latest, not {which!r}")
    return which


def _sampler(run: str | None, checkpoint: str, device: str, **sampling: object) -> tuple:
    """The run, a generator with its sampling settings (run's config + command line), the
    settings and a seeded RNG: what generate and chat share."""
    from fraglm.inference.generate import Generator, make_rng, stop_ids_for
    from fraglm.runs.loading import load_run

    loaded = load_run(run, which=_checkpoint_choice(checkpoint), device=device)
    params = _sampling(loaded.cfg, **sampling)
    generator = Generator(loaded.model, params, stop_ids_for(loaded.tokenizer, params.stop))
    return loaded, generator, params, make_rng(params.seed)


@app.command()
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


@app.command()
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


@app.command("eval")
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

    result = evaluate_run(run, data=data, which=_checkpoint_choice(checkpoint), device=device)
    typer.echo(
        f"{result.source}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f}, "
        f"{result.bits_per_byte:.4f} bits per byte, {result.tokens:,} tokens"
    )


@app.command()
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

        path = export_gguf(run, out, which=_checkpoint_choice(checkpoint), dtype=dtype or "f32")
        typer.echo(f"exported to {path} (llama.cpp: llama-cli -m {path}; Ollama: see README)")
        return
    from fraglm.export.hf import export_hf

    if format_ != "hf":
        raise FraglmError(f"--format must be hf or gguf, not {format_!r}")
    if dtype is not None:
        raise FraglmError("--dtype applies to --format gguf (hf export writes float32)")
    path = export_hf(run, out, which=_checkpoint_choice(checkpoint))
    typer.echo(f"exported to {path} (AutoModelForCausalLM / AutoTokenizer.from_pretrained)")


@app.command()
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
    run_server(run, which=_checkpoint_choice(checkpoint), host=host, port=port, device=device)


@app.command()
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


@app.command("attention")
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


@config_app.command("show")
def config_show(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    typer.echo(_load(config, set_).to_yaml(), nl=False)


@config_app.command("reference")
def config_reference() -> None:
    """Print every config key with its type, default and meaning (Markdown)."""
    typer.echo(reference_markdown())


_session = {"debug": False}  # set by --debug for the command being run


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
        _session["debug"] = True
    _configure_logging()


class _StatusLines(logging.Handler):
    """fraglm's status lines, plain: information on stdout, warnings on stderr (so a note
    never mixes into text that ``fraglm generate`` streams to stdout). Through
    ``tqdm.write``, so a progress bar on screen is not broken up, and to the streams of the
    moment (which tests and callers may replace)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        try:
            tqdm.write(self.format(record), file=stream)
        except Exception:
            self.handleError(record)


def _on_rank_zero(record: logging.LogRecord) -> bool:
    return os.environ.get("RANK", "0") == "0"  # RANK: set by torchrun for every rank


_status_lines = _StatusLines()


def _configure_logging() -> None:
    """The ``fraglm.*`` loggers speak at INFO (warnings on stderr); under torchrun only rank 0 does,
    unless ``FRAGLM_LOG_ALL_RANKS=1``. Set here, in the command, never by library code."""
    logger = logging.getLogger("fraglm")
    logger.setLevel(logging.INFO)
    _status_lines.filters.clear()
    if os.environ.get(LOG_ALL_RANKS_ENV, "") in ("", "0"):
        _status_lines.addFilter(_on_rank_zero)
    if _status_lines not in logger.handlers:
        logger.addHandler(_status_lines)


_own_process = False  # set by command(): this process is the fraglm command's own


def command() -> None:
    """The ``fraglm`` executable and ``python -m fraglm``: :func:`main` in a process of
    its own, which ``fraglm train`` may tune for itself (see :mod:`fraglm.training.allocator`)."""
    global _own_process
    _own_process = True
    main()


def main() -> None:
    """Entry point: every error becomes one line on stderr and exit code 2.

    A ``FraglmError`` is a problem the user can fix and says so; any other exception that
    escapes a command is a fault fraglm did not foresee, reported in the same one line (its
    type and message) unless debugging (``--debug`` or ``FRAGLM_DEBUG=1``), where it
    propagates with its traceback, as the tests want it.
    """
    _session["debug"] = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        app()
    except FraglmError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if _session["debug"]:
            raise
        _fail(f"{describe_exception(exc)} (run with --debug for the traceback)")


def _fail(message: str) -> None:
    typer.echo(f"error: {' '.join(message.splitlines())}", err=True)
    sys.exit(2)
