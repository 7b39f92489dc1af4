"""The training loop: ``fraglm train``.

Deterministic by construction: initialisation from ``train.seed``, batches from
``(train.seed, step)``, and every piece of state that changes the loss curve (weights,
optimizer, scaler, RNG, step) in the checkpoint, so ``--resume`` continues bit-identically.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fraglm.config import Config
from fraglm.data.batches import Batch
from fraglm.data.tokenizer import TOKENIZER_FILE
from fraglm.device import plan_device, resolve_device
from fraglm.errors import FraglmError
from fraglm.parallel.context import local_attention
from fraglm.parallel.distributed import (
    DistEnv,
    all_reduce_sum,
    any_rank,
    from_main,
    setup,
    teardown,
)
from fraglm.parallel.zigzag import zigzag_share
from fraglm.runs.checkpoint import save_checkpoint
from fraglm.runs.layout import write_run_files
from fraglm.runs.pointers import checkpoint_dir
from fraglm.runs.resume import open_run_dir
from fraglm.storage import locks
from fraglm.training.build import build_data, build_model, build_tracker
from fraglm.training.early_stopping import BestValidation
from fraglm.training.evaluation import token_loss_sum
from fraglm.training.interrupt import deferred_interrupt
from fraglm.training.loss_scale import SkippedStepGuard
from fraglm.training.optim import build_optimizer
from fraglm.training.resume import restore_training_state, start_point, training_state
from fraglm.training.schedule import lr_at
from fraglm.training.tracking import Throughput

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_train_loss: float
    best_val_loss: float | None
    parameters: int
    stopped_early: bool = False


class Trainer:
    """The loop (``train_step``, ``evaluate``, ``save``, ``run``) over components that
    :mod:`fraglm.training.build` (data, model and objective, tracker),
    :mod:`~fraglm.training.resume` and :mod:`~fraglm.training.optim` build."""

    def __init__(
        self,
        cfg: Config,
        *,
        resume: bool = False,
        resume_from: str | None = None,
        overwrite: bool = False,
        env: DistEnv | None = None,
    ) -> None:
        """``resume``: continue from the latest checkpoint; ``resume_from``: from this one
        (``step-N``); ``overwrite``: start over in a directory that holds a run. The main
        rank holds the run directory's lock until ``run`` ends (or ``close``)."""
        self.env = env or DistEnv()
        self._lock = locks.lock_run(Path(cfg.train.out_dir)) if self.env.is_main else None
        try:
            self._setup(cfg, resume=resume, resume_from=resume_from, overwrite=overwrite)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory (``run`` does this when it ends)."""
        if self._lock is not None:
            self._lock.release()

    def _setup(
        self, cfg: Config, *, resume: bool, resume_from: str | None, overwrite: bool
    ) -> None:
        self.cfg = cfg
        tcfg = cfg.train
        self.run_dir = Path(tcfg.out_dir)
        resumed = open_run_dir(
            self.run_dir,
            resume=resume,
            resume_from=resume_from,
            overwrite=overwrite,
            writable=self.env.is_main,
        )
        start = start_point(cfg, self.run_dir, resumed)
        data = build_data(cfg, self.env, start, self.run_dir)
        self.train_sampler, self.validation = data.train_sampler, data.validation
        self.vocab_size, self.corpus_fingerprint = data.vocab_size, data.corpus_fingerprint
        self.device = resolve_device(tcfg.device)
        if self.env.enabled and self.device.type == "cuda":  # cuda:N too: a GPU per rank
            self.device = torch.device("cuda", self.env.local_rank)
        self.plan = plan_device(self.device, tcfg, cfg.model)
        self.model, self.forward_model = build_model(
            cfg, self.plan, self.vocab_size, self.device, self.env, start.parent
        )
        self.optimizer = build_optimizer(self.model, tcfg, self.plan.muon_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.plan.precision.use_scaler)
        self.step = 0
        self.best = BestValidation()
        if start.checkpoint is not None:
            self.step, self.best = restore_training_state(
                start.checkpoint, self.model, self.optimizer, self.scaler, self.device
            )
        elif self.env.is_main:
            write_run_files(self.run_dir, cfg, Path(cfg.data.tokenized_dir) / TOKENIZER_FILE)
        self._skip_guard = SkippedStepGuard(self.scaler, tcfg.max_skipped_steps)
        resume_step = self.step if start.state is not None else None
        self.tracker = build_tracker(cfg, self.env, self.run_dir, resume_step)

    def save(self, *, best: bool = False) -> None:
        """Checkpoint (rank 0 writes: all ranks hold the same weights and optimizer state).

        Every rank calls it: a failure to write stops them all, where the others would
        otherwise wait for rank 0 in the next collective until its timeout.
        """
        # A finite loss does not mean finite weights after the step (inf gradients, a huge
        # lr); never let such weights replace the last good checkpoint. Every rank checks
        # its identical copy, so all ranks stop together.
        if not torch.stack([p.isfinite().all() for p in self.model.parameters()]).all():
            raise FraglmError(
                f"weights became non-finite at step {self.step}; the last good checkpoint in "
                f"{self.run_dir} is kept (try a lower train.lr)"
            )
        error = None
        if self.env.is_main:
            pointers = ("latest", "best") if best else ("latest",)
            info = {"val_loss": self.best.loss} if best else {}
            try:
                save_checkpoint(
                    self.run_dir,
                    self.model,
                    training_state(
                        self.optimizer,
                        self.scaler,
                        self.device,
                        self.step,
                        self.best,
                        self.corpus_fingerprint,
                    ),
                    step=self.step,
                    pointers=pointers,
                    info=info,
                )
            except Exception as exc:  # re-raised below, once every rank knows
                error = exc
        if any_rank(error is not None, self.env, self.device):
            raise error or FraglmError(
                f"rank 0 could not write a checkpoint at step {self.step}; every rank stops"
            )

    def _my_batches(self, starts: np.ndarray) -> list[Batch]:
        """This rank's micro-batches of the global batch: a data-parallel slice of the
        windows, and with context parallelism this rank's zigzag share of each."""
        env, tcfg = self.env, self.cfg.train
        mine = np.array_split(starts, env.dp_size)[env.dp_rank]
        batches = [
            self.train_sampler.batch(s, self.device) for s in np.array_split(mine, tcfg.grad_accum)
        ]
        if env.context_parallel > 1:
            batches = [zigzag_share(b, env.cp_rank, env.context_parallel) for b in batches]
        return batches

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns its mean token loss.

        Every rank scales its summed token loss by world size / tokens counted in the
        whole global batch, so DDP's gradient average is the gradient of the global mean.
        """
        tcfg = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, tcfg)
        starts = self.train_sampler.step_starts(tcfg.seed, self.step, tcfg.batch_size)
        counted = max(self.train_sampler.counted_targets(starts), 1)
        micro_batches = self._my_batches(starts)
        loss_sums = []
        for index, batch in enumerate(micro_batches):
            sync = not self.env.enabled or index == len(micro_batches) - 1
            with contextlib.nullcontext() if sync else self.forward_model.no_sync():
                loss_sum = token_loss_sum(self.forward_model, batch, self.plan.precision)
                self.scaler.scale(loss_sum * (self.env.world / counted)).backward()
            loss_sums.append(loss_sum.detach())
        # one host sync per step, after every micro-batch is queued
        local = float(torch.stack(loss_sums).sum())
        self._check_skipped_steps()
        total = all_reduce_sum(local, self.env, self.device) / counted
        if not math.isfinite(total) and not self.scaler.is_enabled():
            raise FraglmError(
                f"loss became non-finite at step {self.step}; the last good checkpoint in "
                f"{self.run_dir} is kept (try a lower train.lr)"
            )
        if tcfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def _check_skipped_steps(self) -> None:
        self._skip_guard.check(self.step, self.run_dir)

    def evaluate(self) -> float | None:
        """Validation loss on the fixed windows (rank 0 only, on the unwrapped model)."""
        if self.validation is None or not self.env.is_main:
            return None
        with local_attention(self.model):  # whole sequences on this rank alone, no ring
            return self.validation.loss(self.model, self.plan.precision, self.device)

    def run(self, *, max_new_steps: int | None = None) -> TrainResult:
        """Train to ``train.max_steps`` (or ``max_new_steps`` more).

        Ctrl-C finishes the current step, saves a checkpoint and raises KeyboardInterrupt.
        """
        tcfg = self.cfg.train
        end = tcfg.max_steps
        if max_new_steps is not None:
            end = min(end, self.step + max_new_steps)
        bar = tqdm(
            total=tcfg.max_steps,
            initial=self.step,
            disable=not self.cfg.logging.progress or not self.env.is_main,
            desc="train",
        )
        loss, stopped_early = float("nan"), self._patience_exhausted()
        if stopped_early:
            end = self.step  # resuming a run that stopped early: nothing left to do
        try:
            with self.plan.matmul_precision():
                loss, stopped_now = self._train_until(end, bar)
            stopped_early = stopped_early or stopped_now
        finally:
            bar.close()
            if self.tracker is not None:
                self.tracker.close()
            self.close()
        return TrainResult(
            self.run_dir,
            self.step,
            loss,
            self.best.loss,
            self.model.num_parameters(),
            stopped_early,
        )

    def _train_until(self, end: int, bar: tqdm) -> tuple[float, bool]:
        """Steps up to ``end``: the last train loss, and whether early stopping ended them."""
        loss = float("nan")
        self._throughput = Throughput(
            self.step, self.cfg.train.batch_size * self.cfg.model.context_length
        )
        with deferred_interrupt() as interrupted:
            while self.step < end:
                # every rank must agree, or the ranks would wait on each other forever
                if any_rank(interrupted(), self.env, self.device):
                    self.save()
                    log.info(
                        "interrupted at step %d: checkpoint saved; continue with --resume",
                        self.step,
                    )
                    raise KeyboardInterrupt
                loss = self.train_step()
                self._after_step(loss, end, bar)
                if self._evaluated_now() and any_rank(
                    self._patience_exhausted(), self.env, self.device
                ):
                    self.save()  # the latest checkpoint remembers that the run stopped
                    self._report_early_stop()
                    return loss, True
        return loss, False

    def _evaluated_now(self) -> bool:
        return (
            self.step % self.cfg.train.eval_interval == 0 or self.step == self.cfg.train.max_steps
        )

    def _patience_exhausted(self) -> bool:
        return self.best.patience_exhausted(self.cfg.train.early_stopping_patience)

    def _report_early_stop(self) -> None:
        log.info(
            "early stopping at step %d: validation loss has not improved for %d evaluations; "
            "best %.4f at step %d, kept in %s",
            self.step,
            self.best.evals_since,
            self.best.loss,
            self.best.step,
            checkpoint_dir(self.run_dir, "best"),
        )

    def _log(self, record: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.log(record)

    def _after_step(self, loss: float, end: int, bar: tqdm) -> None:
        """Log, evaluate and checkpoint on their intervals."""
        step = self.step
        tokens = step * self.cfg.train.batch_size * self.cfg.model.context_length
        bar.update(1)
        if step % self.cfg.logging.log_interval == 0 or step == end:
            tokens_per_s = self._throughput.since_last(step)
            lr = lr_at(step - 1, self.cfg.train)
            self._log(
                {
                    "step": step,
                    "tokens": tokens,
                    "train_loss": loss,
                    "lr": lr,
                    "tokens_per_s": round(tokens_per_s, 1),
                }
            )
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        is_best = self._evaluated_now() and self._validate(tokens)
        if is_best or step % self.cfg.train.save_interval == 0 or step == end:
            self.save(best=is_best)

    def _validate(self, tokens: int) -> bool:
        """Evaluate, log and keep count for early stopping; True for a new best loss."""
        # rank 0 evaluates; every rank takes its result, so all agree on is_best
        val = from_main(self.evaluate(), self.env, self.device)
        if val is None:
            return False
        step, bpb, ppl = self.step, self.validation.bits_per_byte(val), math.exp(min(val, 50.0))
        self._log({"step": step, "tokens": tokens, "val_loss": val, "val_ppl": ppl, "val_bpb": bpb})
        log.info("step %d: val loss %.4f, perplexity %.2f, %.4f bits per byte", step, val, ppl, bpb)
        return self.best.record(val, step)


def train(
    cfg: Config,
    *,
    resume: bool = False,
    max_new_steps: int | None = None,
    resume_from: str | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train in this process, or as one rank of a torchrun job (see fraglm.parallel.distributed)."""
    env = setup(cfg)
    try:
        trainer = Trainer(cfg, resume=resume, resume_from=resume_from, overwrite=overwrite, env=env)
        parallel = ""
        if env.enabled:
            parallel = f", {env.dp_size} data-parallel x {env.context_parallel} context-parallel"
        log.info(
            "model: %s parameters (%s, %s attention)%s; on %s",
            f"{trainer.model.num_parameters():,}",
            cfg.model.arch,
            cfg.model.attention,
            parallel,
            trainer.plan.describe(),
        )
        return trainer.run(max_new_steps=max_new_steps)
    finally:
        teardown(env)
