"""The trainer's components, one build function each (as in torchtitan's trainer): the
data (token shards and samplers), the model with its training objective wrapped for data
parallelism and compilation, and the metrics tracker. The optimizer is
:func:`fraglm.training.optim.build_optimizer`; what a run starts from is
:func:`fraglm.training.resume.start_point`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from fraglm.config import Config
from fraglm.data.batches import WindowSampler, make_sampler
from fraglm.data.corpus import corpus_fingerprint
from fraglm.data.shards import ensure_tokenized, load_run_tokenizer, load_tokens, read_meta
from fraglm.data.tokenizer import special_ids, token_byte_lengths, vocab_size
from fraglm.device import DevicePlan
from fraglm.errors import FraglmError
from fraglm.nn.loss import TokenLoss
from fraglm.nn.model import Transformer
from fraglm.parallel.context import apply_context_parallel
from fraglm.parallel.distributed import DistEnv, wait_for_main
from fraglm.runs.pointers import checkpoint_dir
from fraglm.runs.verify import load_weights
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


def build_model(
    cfg: Config,
    plan: DevicePlan,
    vocab_size: int,
    device: torch.device,
    env: DistEnv,
    parent: Path | None,
) -> tuple[Transformer, torch.nn.Module]:
    """The model (from ``parent``'s best weights with ``train.init_from``; context
    parallelism applied from outside) and the training objective the loop calls: a
    :class:`~fraglm.nn.loss.TokenLoss`, wrapped in DDP and compiled where the plan says."""
    torch.manual_seed(cfg.train.seed)
    # the plan's attention kernels; the run's config keeps model.fragment_impl as given
    model = Transformer(replace(cfg.model, fragment_impl=plan.attention), vocab_size).to(device)
    if parent is not None:
        start = checkpoint_dir(parent, "best")
        load_weights(model, start)
        log.info("initialised from %s", start)
    if env.cp_group is not None:
        apply_context_parallel(model, env.cp_group)
    objective: torch.nn.Module = TokenLoss(model)
    if env.enabled:
        device_ids = [env.local_rank] if device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=device_ids)
    if plan.compile:
        objective = torch.compile(objective)
    elif cfg.train.compile:
        log.warning(
            "note: torch.compile is not used on %s here (CUDA needs capability 7.0+); "
            "training uncompiled",
            device.type,
        )
    return model, objective
