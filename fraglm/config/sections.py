"""The config's sections as dataclasses: the single source of truth for YAML keys, defaults,
validation bounds and help text.

A config is one YAML file with the sections below. Every field carries its help text
and constraints in ``field(metadata=...)``; loading, ``--set`` overrides, ``fraglm config
show`` and the README's config reference are all derived from these dataclasses
(:mod:`fraglm.config.parsing`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

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
