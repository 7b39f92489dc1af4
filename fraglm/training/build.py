"""The trainer's components, one build function each (as in torchtitan's trainer): the
data (token shards and samplers) and the metrics tracker. The optimizer is
:func:`fraglm.training.optim.build_optimizer`; what a run starts from is
:func:`fraglm.training.resume.start_point`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fraglm.config import Config
from fraglm.data.batches import WindowSampler, make_sampler
from fraglm.data.corpus import corpus_fingerprint
from fraglm.data.shards import ensure_tokenized, load_run_tokenizer, load_tokens, read_meta
from fraglm.data.tokenizer import special_ids, token_byte_lengths, vocab_size
from fraglm.errors import FraglmError
from fraglm.parallel.distributed import DistEnv, wait_for_main
from fraglm.training.evaluation import EvalWindows
from fraglm.training.resume import StartPoint, check_same_corpus, check_same_tokenizer
from fraglm.training.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainData:
    """The training windows' sampler, the validation windows (None when the validation
    split is shorter than one window), and what the trainer needs of the tokenizer."""

    train_sampler: WindowSampler
    validation: EvalWindows | None
    vocab_size: int
    corpus_fingerprint: str | None  # of the shards, saved in checkpoints


def build_data(cfg: Config, env: DistEnv, start: StartPoint, run_dir: Path) -> TrainData:
    """Tokenize the corpus where its shards are missing or stale (rank 0; the other ranks
    wait), check that a resumed run finds the tokenizer it was trained with, and sample."""
    _ensure_tokenized(cfg, env, start, run_dir)
    data_dir = Path(cfg.data.tokenized_dir)
    if start.state is not None:
        check_same_tokenizer(run_dir, data_dir)
    tokenizer = load_run_tokenizer(data_dir)
    ids = special_ids(tokenizer)
    context = cfg.model.context_length
    train_tokens, val_tokens = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")
    if len(train_tokens) < context + 2:
        raise FraglmError(
            f"training split has {len(train_tokens)} tokens; model.context_length = {context} "
            "needs more (use a larger corpus or a shorter context)"
        )
    validation = None
    if len(val_tokens) >= context + 2:
        sampler = make_sampler(val_tokens, cfg, ids)
        validation = EvalWindows.of(sampler, cfg.train, token_byte_lengths(tokenizer))
    else:
        log.warning("note: validation split too short for context %d; no evaluation", context)
    return TrainData(
        train_sampler=make_sampler(train_tokens, cfg, ids),
        validation=validation,
        vocab_size=vocab_size(tokenizer),
        corpus_fingerprint=(read_meta(data_dir) or {}).get("fingerprint"),
    )


def _ensure_tokenized(cfg: Config, env: DistEnv, start: StartPoint, run_dir: Path) -> None:
    """A resumed run refuses a changed corpus before anything is tokenized again. The
    corpus is hashed once: the fingerprint that check computes is the one rank 0 compares
    with the shards' (``ensure_tokenized`` hashes it itself only when not given one)."""
    saved = start.state.get("corpus_fingerprint") if start.state is not None else None
    fingerprint = None
    if saved is not None:  # absent in checkpoints of older versions
        fingerprint = corpus_fingerprint(cfg, tokenizer=start.tokenizer)
        check_same_corpus(run_dir, saved, fingerprint, cfg)
    if env.is_main:
        summary = ensure_tokenized(
            cfg, progress=cfg.logging.progress, tokenizer=start.tokenizer, fingerprint=fingerprint
        )
        if summary is not None:
            log.info("tokenized %s: %s", cfg.data.path, summary.describe())
    wait_for_main(env)


def build_tracker(
    cfg: Config, env: DistEnv, run_dir: Path, resume_step: int | None
) -> Tracker | None:
    """The metrics tracker, on rank 0 only (``resume_step``: the step a resumed run is at)."""
    return Tracker(run_dir, cfg, resume_step=resume_step) if env.is_main else None
