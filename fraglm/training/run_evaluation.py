"""``fraglm eval``: the validation loss and bits per byte of a trained run, on its own
validation split or on another corpus file."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fraglm.data.batches import make_sampler
from fraglm.data.corpus import load_records, make_documents
from fraglm.data.shards import load_tokens, read_meta
from fraglm.data.tokenizer import TOKENIZER_FILE, special_ids, token_byte_lengths
from fraglm.device import plan_device
from fraglm.errors import FraglmError
from fraglm.runs.loading import LoadedRun, load_run
from fraglm.training.evaluation import EvalWindows


@dataclass
class EvalResult:
    loss: float
    tokens: int
    source: str
    bits_per_byte: float

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


def evaluate_run(
    run: str | Path | None, *, data: str | None = None, which: str = "best", device: str = "auto"
) -> EvalResult:
    """Validation loss and bits per byte of a run: on its own validation split (the same
    windows the trainer evaluates), or on every window of another corpus file encoded with
    the run's tokenizer."""
    loaded = load_run(run, which=which, device=device)
    cfg, context = loaded.cfg, loaded.cfg.model.context_length
    ids = special_ids(loaded.tokenizer)
    if data is None:
        tokens = load_tokens(cfg.data.tokenized_dir, "val")
        _check_split_belongs_to(loaded)
        source = f"{cfg.data.tokenized_dir}/val.bin"
    else:
        documents = make_documents(
            load_records(replace(cfg.data, path=data, max_records=None)), cfg.data
        )
        encoded = loaded.tokenizer.encode_batch(documents)
        tokens = np.fromiter((i for e in encoded for i in e.ids), dtype=np.int64)
        source = data
    if len(tokens) < context + 2:
        raise FraglmError(
            f"{source} has {len(tokens)} tokens; evaluation needs at least {context + 2}"
        )
    sampler, token_bytes = make_sampler(tokens, cfg, ids), token_byte_lengths(loaded.tokenizer)
    if data is None:
        windows = EvalWindows.of(sampler, cfg.train, token_bytes)
    else:
        starts = np.arange(0, sampler.max_start + 1, context)
        micro_batch = cfg.train.batch_size // cfg.train.grad_accum
        windows = EvalWindows(sampler, starts, micro_batch, token_bytes)
    precision = plan_device(loaded.device, cfg.train, cfg.model).precision
    loss = windows.loss(loaded.model, precision, loaded.device)
    tokens_counted = sampler.counted_targets(windows.starts)
    return EvalResult(loss, tokens_counted, source, windows.bits_per_byte(loss))


def _check_split_belongs_to(loaded: LoadedRun) -> None:
    """The validation split in ``data.tokenized_dir`` must still be the one the run was
    trained with: tokenizing again into that directory (another vocabulary, corpus or
    split) would give a meaningless loss, or token ids past the model's vocabulary."""
    data = loaded.cfg.data
    root = Path(data.tokenized_dir)
    meta = read_meta(root) or {}
    same_split = (meta.get("split_seed"), meta.get("val_fraction")) == (
        data.split_seed,
        data.val_fraction,
    )
    if not same_split or _text(root / TOKENIZER_FILE) != _text(loaded.run_dir / TOKENIZER_FILE):
        raise FraglmError(
            f"{root} has been tokenized again since run {loaded.run_dir} was trained; "
            "its validation split is gone (evaluate on a corpus file with --data)"
        )


def _text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None
