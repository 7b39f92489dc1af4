"""Loss on held-out text: the trainer's periodic evaluation and ``fraglm eval``."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fraglm.data.batches import Batch, WindowSampler, make_sampler
from fraglm.data.corpus import TOKENIZER_FILE, load_records, load_tokens, make_documents, read_meta
from fraglm.data.tokenizer import special_ids, token_byte_lengths
from fraglm.device import Precision, plan_device
from fraglm.errors import FraglmError
from fraglm.nn.loss import TokenLoss
from fraglm.nn.model import Transformer
from fraglm.runs.loading import LoadedRun, load_run


def token_loss_sum(objective: torch.nn.Module, batch: Batch, precision: Precision) -> torch.Tensor:
    """Summed cross-entropy over the batch's counted target tokens (fp32), through
    ``objective``: a :class:`~fraglm.nn.loss.TokenLoss`, or the trainer's wrapping of one."""
    with precision.context(batch.inputs.device):
        return objective(
            batch.inputs, batch.targets, doc_ids=batch.doc_ids, positions=batch.positions
        )


@torch.no_grad()
def evaluate(
    model: Transformer,
    sampler: WindowSampler,
    starts: np.ndarray,
    *,
    batch_size: int,
    precision: Precision,
    device: torch.device,
) -> tuple[float, int]:
    """Mean loss per counted token over the windows at ``starts``, and the token count."""
    was_training = model.training
    model.eval()
    objective = TokenLoss(model)
    sums, count = [], 0
    for chunk in np.array_split(starts, max(1, math.ceil(len(starts) / batch_size))):
        sums.append(token_loss_sum(objective, sampler.batch(chunk, device), precision))
        count += sampler.counted_targets(chunk)  # counted on the host, from the windows
    model.train(was_training)
    total = float(torch.stack(sums).sum()) if sums else 0.0  # the one host sync, at the end
    return total / max(count, 1), count


def bits_per_byte(mean_loss: float, tokens: int, n_bytes: int) -> float:
    """Summed nats over the targets / (ln 2 x the UTF-8 bytes of the text they decode to).

    Unlike loss per token, it does not depend on the tokenizer: models with different
    vocabularies (or other projects' models) compare on the same text.
    """
    return mean_loss * tokens / (math.log(2) * max(n_bytes, 1))


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
    micro_batch = cfg.train.batch_size // cfg.train.grad_accum
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
    sampler = make_sampler(tokens, cfg, ids)
    if data is None:
        starts = sampler.eval_starts(cfg.train.eval_batches * micro_batch)
    else:
        starts = np.arange(0, sampler.max_start + 1, context)
    precision = plan_device(loaded.device, cfg.train, cfg.model).precision
    loss, count = evaluate(
        loaded.model,
        sampler,
        starts,
        batch_size=micro_batch,
        precision=precision,
        device=loaded.device,
    )
    n_bytes = sampler.counted_target_bytes(starts, token_byte_lengths(loaded.tokenizer))
    return EvalResult(loss, count, source, bits_per_byte(loss, count, n_bytes))


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
