"""Run configuration: the single source of truth for YAML keys, defaults, validation and help.

A config is one YAML file with the sections below. Every field carries its help text
and constraints in ``field(metadata=...)``; loading, ``--set`` overrides, ``fraglm config
show`` and the README's config reference are all derived from these dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fraglm.errors import FraglmError, first_line, read_text_file

SPECIAL_TOKENS = ("<|pad|>", "<|Q|>", "<|A|>", "<|END|>")
PAD, QUESTION, ANSWER, END = SPECIAL_TOKENS
SEED_MAX = 2**64 - 1  # torch.manual_seed takes 64 bits
MIN_TEMPERATURE = 0.01
# Limits on what a config file or an override may hold (keys are flat: section.key = scalar).
MAX_CONFIG_BYTES = 1 << 20
MAX_OVERRIDE_CHARS = 10_000
MAX_YAML_DEPTH = 8
INT_LIMIT = 2**64  # every integer setting fits in 64 bits


def _opt(default: Any, help: str, **constraints: Any) -> Any:
    """A dataclass field with help text and optional ``ge`` / ``le`` / ``gt`` / ``lt`` bounds."""
    return field(default=default, metadata={"help": help, **constraints})


@dataclass
class DataConfig:
    path: str = _opt(
        "data/sample_health_qa.jsonl",
        "Corpus: a local .json/.jsonl/.csv/.parquet/.txt file, or a Hugging Face hub dataset id.",
    )
    split: str = _opt("train", "Split to read from a hub dataset.")
    question_field: str = _opt("question", "Record field holding the question (Q&A corpora).")
    answer_field: str = _opt("answer", "Record field holding the answer (Q&A corpora).")
    text_field: str | None = _opt(
        None, "Record field holding plain text; when set, Q&A fields and template are unused."
    )
    template: str = _opt(
        "<|Q|>{question}<|A|>{answer}<|END|>",
        "How one Q&A record becomes a document; {question} and {answer} are filled in.",
    )
    max_records: int | None = _opt(None, "Use only the first N records (quick experiments).", ge=1)
    val_fraction: float = _opt(0.05, "Fraction of documents held out for validation.", ge=0, lt=1)
    split_seed: int = _opt(
        1234, "Seed of the deterministic train/validation split by document.", ge=0, le=SEED_MAX
    )
    tokenized_dir: str = _opt(
        "data/tokenized/sample",
        "Where `fraglm tokenize` writes tokenizer.json, train.bin, val.bin and meta.json.",
    )
    num_proc: int = _opt(2, "Processes for parallel encoding.", ge=1)


@dataclass
class TokenizerConfig:
    vocab_size: int = _opt(
        8000, "BPE vocabulary size, including 256 byte tokens and the special tokens.", ge=260
    )
    min_frequency: int = _opt(2, "Minimum pair frequency for a BPE merge.", ge=1)


@dataclass
class ModelConfig:
    arch: Literal["modern", "seed"] = _opt(
        "modern",
        "modern: RoPE, RMSNorm, SwiGLU, tied embeddings. seed: the original experiment "
        "(learned positions, LayerNorm, 4x GELU MLP, untied head).",
    )
    n_layers: int = _opt(8, "Transformer blocks.", ge=1)
    d_model: int = _opt(128, "Model width.", ge=8)
    n_heads: int = _opt(8, "Attention (query) heads; must divide d_model.", ge=1)
    n_kv_heads: int | None = _opt(
        None, "Key/value heads for grouped-query attention (default: n_heads).", ge=1
    )
    mlp_hidden: int | None = _opt(
        None,
        "MLP hidden width (default: 4 * d_model; SwiGLU's gate doubles the input projection).",
        ge=1,
    )
    context_length: int = _opt(512, "Maximum sequence length in tokens.", ge=2)
    dropout: float = _opt(0.0, "Dropout on attention output and MLP output.", ge=0, lt=1)
    attention: Literal["fragment", "sdpa", "naive"] = _opt(
        "fragment", "Attention backend: fragment (FragmentStream), sdpa (PyTorch), naive."
    )
    fragment_size: int = _opt(128, "FragmentStream fragment length in tokens.", ge=1)
    fragment_impl: Literal["auto", "triton", "torch"] = _opt(
        "auto",
        "FragmentStream kernels: triton (fused Triton kernels, where the compile check proves "
        "them: CUDA capability 8.0, 8.6, 8.9 or 9.0 with fp16/bf16 autocast and a head dim of "
        "16, 32, ... 128), torch (the tile loop, any device), auto (triton there, else torch).",
    )
    rope_theta: float = _opt(10000.0, "RoPE base (modern arch).", gt=0)
    norm_eps: float = _opt(1e-5, "Normalisation epsilon.", gt=0)
    qk_norm: bool = _opt(
        False,
        "RMSNorm over each query and key head before RoPE (modern arch; one gain shared by "
        "queries and keys). Such runs export as Qwen3 (Llama plus these norms) to HF and GGUF.",
    )
    tie_embeddings: bool = _opt(
        True, "Output head shares the input embedding's weights (modern arch; seed is untied)."
    )
    zero_init_out: bool = _opt(
        False,
        "Initialise each block's output projections (attention out, MLP down) to zero, so "
        "every block starts as the identity.",
    )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or one per query head."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def mlp_hidden_size(self) -> int:
        """MLP hidden width: ``mlp_hidden``, or 4 * d_model."""
        return self.mlp_hidden if self.mlp_hidden is not None else 4 * self.d_model


@dataclass
class TrainConfig:
    out_dir: str = _opt("checkpoints/run", "Run directory: checkpoints, config, metrics.")
    device: Literal["auto", "cpu", "cuda", "mps"] = _opt(
        "auto", "Device; auto picks cuda, mps, cpu."
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = _opt(
        "auto",
        "auto: bf16 on CUDA capability >= 8.0, fp16 autocast + GradScaler below it (P100), "
        "fp32 on CPU and MPS.",
    )
    compile: bool = _opt(
        False, "torch.compile the model (ignored below CUDA capability 7.0 and on MPS)."
    )
    seed: int = _opt(1337, "Seed for initialisation and batch sampling.", ge=0, le=SEED_MAX)
    batch_size: int = _opt(32, "Global batch size in sequences per optimizer step.", ge=1)
    grad_accum: int = _opt(1, "Micro-batches per optimizer step (batch_size must divide).", ge=1)
    max_steps: int = _opt(2000, "Optimizer steps.", ge=1)
    lr: float = _opt(3e-3, "Peak learning rate.", gt=0)
    min_lr_ratio: float = _opt(
        0.1, "Final lr (cosine or wsd floor) as a fraction of the peak lr.", ge=0, le=1
    )
    warmup_steps: int = _opt(100, "Linear warmup steps.", ge=0)
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only).", ge=0)
    optimizer: Literal["adamw", "muon"] = _opt(
        "adamw",
        "adamw: AdamW for every parameter. muon: Muon for the blocks' matrices (lr matched to "
        "AdamW's update size; Newton-Schulz in bf16 on CUDA 8.0+ and CPU, in fp32 below 8.0 "
        "and on MPS), AdamW for embeddings, head and gains.",
    )
    schedule: Literal["cosine", "wsd"] = _opt(
        "cosine",
        "After warmup: cosine decay to the floor, or wsd (warmup-stable-decay: constant lr, "
        "then a linear decay to the floor over the last train.decay_fraction of the steps).",
    )
    decay_fraction: float = _opt(
        0.2, "Fraction of train.max_steps over which wsd decays the lr.", gt=0, le=1
    )
    beta1: float = _opt(0.9, "AdamW beta1.", ge=0, lt=1)
    beta2: float = _opt(0.95, "AdamW beta2.", ge=0, lt=1)
    grad_clip: float = _opt(1.0, "Gradient norm clip (0 disables).", ge=0)
    max_skipped_steps: int = _opt(
        50,
        "fp16 with a gradient scaler: stop after this many consecutive steps skipped for "
        "non-finite gradients.",
        ge=1,
    )
    eval_interval: int = _opt(200, "Steps between validation evaluations.", ge=1)
    eval_batches: int = _opt(20, "Validation batches per evaluation.", ge=1)
    early_stopping_patience: int = _opt(
        0,
        "Stop when this many evaluations in a row have not lowered the best validation loss; "
        "the best checkpoint is kept (0: never stop early).",
        ge=0,
    )
    save_interval: int = _opt(200, "Steps between checkpoints.", ge=1)
    doc_mask: bool = _opt(
        False, "Mask attention across <|END|> document boundaries in packed windows."
    )
    loss_on: Literal["all", "answer"] = _opt(
        "all", "Tokens that count in the loss: all, or only answer tokens (Q&A fine-tuning)."
    )
    init_from: str | None = _opt(
        None,
        "Run directory whose best weights start this run (same model shape); its tokenizer "
        "encodes the corpus. `fraglm train --init-from RUN` sets it.",
    )
    context_parallel: int = _opt(
        1, "Ranks that share one sequence with ring attention (under torchrun).", ge=1
    )


@dataclass
class LoggingConfig:
    log_interval: int = _opt(10, "Steps between metric records.", ge=1)
    progress: bool = _opt(True, "Show a tqdm progress bar.")
    wandb: bool = _opt(False, "Log to Weights & Biases.")
    wandb_project: str = _opt("fraglm", "wandb project.")
    wandb_run_name: str | None = _opt(None, "wandb run name (default: run directory name).")
    wandb_mode: Literal["online", "offline", "disabled"] = _opt(
        "online", "wandb mode; offline needs no network."
    )


@dataclass
class SampleConfig:
    temperature: float = _opt(
        0.8,
        f"Sampling temperature: 0 means greedy, else at least {MIN_TEMPERATURE} (lower ones "
        "overflow the scaled logits).",
        ge=0,
        le=1000,
    )
    top_k: int = _opt(0, "Keep only the k most likely tokens (0 disables).", ge=0)
    top_p: float = _opt(1.0, "Nucleus sampling mass, in (0, 1].", gt=0, le=1)
    repetition_penalty: float = _opt(1.0, "Penalty > 1 discourages repeated tokens.", gt=0)
    max_new_tokens: int = _opt(200, "Maximum tokens to generate.", ge=1)
    seed: int | None = _opt(None, "Sampling seed (default: random).", ge=0, le=SEED_MAX)
    stop: str = _opt(END, "Text that ends generation.")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _closest(name: str, options: list[str], prefix: str = "") -> str:
    """A hint naming the closest valid key, or listing them all when none is close."""
    match = difflib.get_close_matches(str(name), options, n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{prefix}{match[0]}'?"
    return "; valid keys: " + ", ".join(prefix + o for o in options)


def _describe_type(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_optional(tp):
        inner = _non_null(tp)
        return f"{_describe_type(inner)} or null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _non_null(tp: Any) -> Any:
    return next(a for a in typing.get_args(tp) if a is not type(None))


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    if _is_optional(tp):
        if value is None:
            return None
        tp = _non_null(tp)
    if tp is float and isinstance(value, str):
        value = _parse_float(value)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if (
        tp is float
        and number
        and not (abs(value) < INT_LIMIT if isinstance(value, int) else math.isfinite(value))
    ):
        raise FraglmError(f"config key '{key}' = {show(value)}: must be a finite number")
    if tp is int and isinstance(value, int) and not -INT_LIMIT < value < INT_LIMIT:
        raise FraglmError(f"config key '{key}' = {show(value)}: must fit in 64 bits")
    ok = (
        (typing.get_origin(tp) is Literal and value in typing.get_args(tp))
        or (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise FraglmError(f"config key '{key}' = {show(value)}: expected {_describe_type(tp)}")
    return float(value) if tp is float else value


_REPR = reprlib.Repr()  # bounded even for deep or huge values (YAML aliases)
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 80, 80, 40


def shorten(text: str, limit: int = 60) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(value: Any) -> str:
    """A value as it appears in a message: a bounded repr, on one line, shortened."""
    return shorten(_REPR.repr(value))


def _parse_float(text: str) -> float | str:
    """PyYAML reads ``1e-3`` (no dot) as a string; accept it as the number users meant."""
    try:
        return float(text)
    except ValueError:
        return text


def _check_bounds(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if value is None:
        return
    checks = {
        "ge": (lambda b: value >= b, ">="),
        "gt": (lambda b: value > b, ">"),
        "le": (lambda b: value <= b, "<="),
        "lt": (lambda b: value < b, "<"),
    }
    for name, (test, op) in checks.items():
        if name in meta and not test(meta[name]):
            raise FraglmError(f"config key '{key}' = {show(value)}: must be {op} {meta[name]}")


def _build_section(section: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{section}.{shorten(str(name))}"
        if name not in fields:
            raise FraglmError(
                f"unknown config key '{key}'" + _closest(name, list(fields), f"{section}.")
            )
        kwargs[name] = _coerce(key, value, hints[name])
        _check_bounds(key, kwargs[name], fields[name].metadata)
    return cls(**kwargs)


def _check_consistency(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    if m.d_model % m.n_heads:
        raise FraglmError(
            f"config key 'model.n_heads' = {m.n_heads}: must divide model.d_model = {m.d_model}"
        )
    if m.head_dim % 2 and m.arch == "modern":
        raise FraglmError(
            f"config key 'model.n_heads' = {m.n_heads}: head size d_model/n_heads must be even "
            "for RoPE"
        )
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        raise FraglmError(
            f"config key 'model.n_kv_heads' = {m.n_kv_heads}: must divide model.n_heads = "
            f"{m.n_heads}"
        )
    if 0 < cfg.sample.temperature < MIN_TEMPERATURE:
        raise FraglmError(
            f"config key 'sample.temperature' = {cfg.sample.temperature!r}: must be 0 (greedy) "
            f"or at least {MIN_TEMPERATURE}"
        )
    if t.batch_size % t.grad_accum:
        raise FraglmError(
            f"config key 'train.grad_accum' = {t.grad_accum}: must divide train.batch_size = "
            f"{t.batch_size}"
        )
    if cfg.data.text_field is None:
        for placeholder in ("{question}", "{answer}"):
            if placeholder not in cfg.data.template:
                raise FraglmError(
                    f"config key 'data.template' = {show(cfg.data.template)}: must contain "
                    f"{placeholder}"
                )
        try:
            cfg.data.template.format(question="", answer="")
        except (KeyError, IndexError, ValueError, AttributeError):
            raise FraglmError(
                f"config key 'data.template' = {show(cfg.data.template)}: the only placeholders "
                "are {question} and {answer} (write {{ or }} for a literal brace)"
            ) from None


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain data (as read from YAML)."""
    if not isinstance(raw, dict):
        raise FraglmError("config must be a mapping of sections (data, model, train, ...)")
    sections = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise FraglmError(
                f"unknown config section {show(section)}" + _closest(section, list(SECTIONS))
            )
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise FraglmError(f"config section '{section}' must be a mapping of keys to values")
        sections[section] = _build_section(section, values)
    cfg = Config(**sections)
    _check_consistency(cfg)
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to raw config data."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        if len(item) > MAX_OVERRIDE_CHARS:
            raise FraglmError(
                f"override {show(item)} is longer than {MAX_OVERRIDE_CHARS:,} characters"
            )
        dotted, sep, text = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot or not key:
            raise FraglmError(f"override {show(item)} must look like section.key=value")
        value = parse_yaml(text, f"override {show(item)}") if text.strip() else None
        values = merged.get(section)
        if values is None:
            values = merged[section] = {}
        if not isinstance(values, dict):
            raise FraglmError(f"config section '{section}' must be a mapping of keys to values")
        values[key] = value
    return merged


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message spans several lines; keep what is wrong and where."""
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return shorten(problem, 120) + where


def parse_yaml(text: str, what: str) -> Any:
    """YAML as plain data, within limits: nesting deeper than ``MAX_YAML_DEPTH``, a type tag
    its value does not fit (``!!float abc``) and invalid YAML are one-line errors."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # iterative: no recursion
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise FraglmError(f"{what} nests deeper than {MAX_YAML_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FraglmError(f"{what} is not valid YAML: {_yaml_problem(exc)}") from None
    except (
        ValueError,
        TypeError,
        OverflowError,
        RecursionError,
        IndexError,
        KeyError,
        AttributeError,
    ) as exc:
        # PyYAML's constructors raise these for a tagged value they cannot build
        # (``!!float abc``; with nothing after the tag ``!!int`` is an IndexError, ``!!bool``
        # a KeyError, ``!!timestamp`` an AttributeError)
        raise FraglmError(
            f"{what}: a value does not fit its type tag ({shorten(first_line(exc), 80)})"
        ) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FraglmError(f"config file not found: {path}")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise FraglmError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB")
        raw = parse_yaml(read_text_file(path, "config file"), f"config file {path}")
        if raw is None:
            raise FraglmError(
                f"config file {path} is empty; give it at least one section (data, model, "
                "train, ...), or leave out --config for the built-in defaults"
            )
        if not isinstance(raw, dict):
            raise FraglmError(f"config file {path} must be a mapping of sections")
    return from_dict(apply_overrides(raw, overrides or []))


def reference_markdown() -> str:
    """The config reference for the README: every section, key, type, default and help."""
    lines = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        lines += [f"### `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = yaml.safe_dump(f.default, default_flow_style=True).strip()
            default = default.removesuffix("...").strip()
            cells = [
                f"`{f.name}`",
                _describe_type(hints[f.name]),
                f"`{default}`",
                f.metadata["help"],
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)
