"""The training loop: ``fraglm train``.

Deterministic by construction: initialisation from ``train.seed``, batches from
``(train.seed, step)``, and every piece of state that changes the loss curve (weights,
optimizer, scaler, RNG, step) in the checkpoint, so ``--resume`` continues bit-identically.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from fraglm.config import Config, TrainConfig
from fraglm.data.batches import Batch, make_sampler
from fraglm.data.corpus import (
    TOKENIZER_FILE,
    corpus_fingerprint,
    ensure_tokenized,
    load_run_tokenizer,
    load_tokens,
    read_meta,
)
from fraglm.data.tokenizer import load_tokenizer, special_ids, token_byte_lengths, vocab_size
from fraglm.device import plan_device, resolve_device
from fraglm.errors import FraglmError
from fraglm.nn.loss import TokenLoss
from fraglm.nn.model import Transformer
from fraglm.parallel.context import apply_context_parallel, local_attention
from fraglm.parallel.distributed import (
    DistEnv,
    all_reduce_sum,
    any_rank,
    from_main,
    setup,
    teardown,
    wait_for_main,
)
from fraglm.parallel.zigzag import zigzag_share
from fraglm.runs import checkpoint as ckpt
from fraglm.runs.init_from import parent_run
from fraglm.storage import locks
from fraglm.training.evaluation import bits_per_byte, evaluate, token_loss_sum
from fraglm.training.optim import build_optimizer, optimizer_parts
from fraglm.training.tracking import Tracker


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_train_loss: float
    best_val_loss: float | None
    parameters: int
    stopped_early: bool = False


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then down to ``lr * min_lr_ratio`` at ``max_steps``: a cosine,
    or (``wsd``) constant until the last ``decay_fraction`` of the steps, then linear."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, round(cfg.max_steps * (1 - cfg.decay_fraction)))
        progress = (step - decay_start) / max(cfg.max_steps - decay_start, 1)
        return cfg.lr - (cfg.lr - floor) * min(max(progress, 0.0), 1.0)
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def _check_compatible(saved: Config, cfg: Config) -> None:
    """A resumed run may change the schedule, not the model or the data it was built on."""
    for section in ("model", "tokenizer"):
        old, new = getattr(saved, section).__dict__, getattr(cfg, section).__dict__
        for key, value in old.items():
            if new[key] != value:
                raise FraglmError(
                    f"cannot resume: {section}.{key} is {value!r} in the checkpoint but "
                    f"{new[key]!r} in the config"
                )


_NEW_RUN = "restore it, or train a new run with another train.out_dir"


def _check_same_corpus(
    run_dir: Path, state: dict[str, Any], cfg: Config, tokenizer: Tokenizer | None
) -> None:
    """Refuse, before anything is tokenized again, a corpus or data setting changed since
    the run began: tokenizing would train another tokenizer under the old weights."""
    saved = state.get("corpus_fingerprint")  # absent in checkpoints of older versions
    if saved is not None and saved != corpus_fingerprint(cfg, tokenizer=tokenizer):
        raise FraglmError(
            f"cannot resume: the corpus {cfg.data.path} or a data.* setting changed since "
            f"{run_dir} was trained; {_NEW_RUN}"
        )


def _check_same_tokenizer(run_dir: Path, data_dir: Path) -> None:
    run_tokenizer, data_tokenizer = run_dir / TOKENIZER_FILE, data_dir / TOKENIZER_FILE
    if not run_tokenizer.is_file() or run_tokenizer.read_bytes() != data_tokenizer.read_bytes():
        raise FraglmError(
            f"cannot resume: {data_tokenizer} is not the tokenizer {run_dir} was trained with "
            f"({run_tokenizer}); {_NEW_RUN}"
        )


class Trainer:
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
        self.resume_dir = ckpt.open_run_dir(
            self.run_dir,
            resume=resume,
            resume_from=resume_from,
            overwrite=overwrite,
            writable=self.env.is_main,
        )
        resume = self.resume_dir is not None
        saved = ckpt.load_run_config(self.run_dir) if resume else None
        parent = None if resume else parent_run(cfg)
        # a run started from another keeps the parent's tokenizer (a copy is in its run dir),
        # also when it is resumed without --init-from
        given = None
        if parent is not None:
            given = load_tokenizer(parent / TOKENIZER_FILE)
        elif saved is not None and saved.train.init_from is not None:
            given = load_tokenizer(self.run_dir / TOKENIZER_FILE)
        resumed_state = None
        if saved is not None:
            _check_compatible(saved, cfg)
            resumed_state = ckpt.load_state(self.resume_dir)
            _check_same_corpus(self.run_dir, resumed_state, cfg, given)

        if self.env.is_main:
            summary = ensure_tokenized(cfg, progress=cfg.logging.progress, tokenizer=given)
            if summary is not None:
                print(f"tokenized {cfg.data.path}: {summary.describe()}")
        wait_for_main(self.env)
        data_dir = Path(cfg.data.tokenized_dir)
        if resume:
            _check_same_tokenizer(self.run_dir, data_dir)
        self.corpus_fingerprint = (read_meta(data_dir) or {}).get("fingerprint")
        tokenizer = load_run_tokenizer(data_dir)
        ids = special_ids(tokenizer)
        self.vocab_size = vocab_size(tokenizer)
        self.token_bytes = token_byte_lengths(tokenizer)
        self.device = resolve_device(tcfg.device)
        self.plan = plan_device(self.device, tcfg, cfg.model)

        context = cfg.model.context_length
        train_tokens, val_tokens = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")
        if len(train_tokens) < context + 2:
            raise FraglmError(
                f"training split has {len(train_tokens)} tokens; model.context_length = {context} "
                "needs more (use a larger corpus or a shorter context)"
            )

        self.train_sampler = make_sampler(train_tokens, cfg, ids)
        self.val_sampler = (
            make_sampler(val_tokens, cfg, ids) if len(val_tokens) >= context + 2 else None
        )
        if self.val_sampler is None:
            print(f"note: validation split too short for context {context}; no evaluation")

        torch.manual_seed(tcfg.seed)
        # the plan's attention kernels; the run's config keeps model.fragment_impl as given
        model_cfg = replace(cfg.model, fragment_impl=self.plan.attention)
        self.model = Transformer(model_cfg, self.vocab_size).to(self.device)
        if parent is not None:
            start = ckpt.checkpoint_dir(parent, "best")
            ckpt.load_weights(self.model, start)
            if self.env.is_main:
                print(f"initialised from {start}")
        if self.env.cp_group is not None:
            apply_context_parallel(self.model, self.env.cp_group)
        # the training objective, as the module that DDP and torch.compile wrap
        self.forward_model: torch.nn.Module = TokenLoss(self.model)
        if self.env.enabled:
            device_ids = [self.env.local_rank] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.forward_model, device_ids=device_ids)
        if self.plan.compile:
            self.forward_model = torch.compile(self.forward_model)
        elif tcfg.compile:
            print(
                f"note: torch.compile is not used on {self.device.type} here (CUDA needs "
                "capability 7.0+); training uncompiled"
            )
        self.optimizer = build_optimizer(self.model, tcfg, self.plan.muon_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.plan.precision.use_scaler)
        self.step = 0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.evals_since_best = 0  # for train.early_stopping_patience
        if resumed_state is not None:
            self._load_latest(resumed_state)
        elif self.env.is_main:
            ckpt.write_run_files(self.run_dir, cfg, data_dir / TOKENIZER_FILE)
        self._skipped_in_a_row, self._last_scale = 0, self.scaler.get_scale()
        self.tracker = (
            Tracker(self.run_dir, cfg, resume_step=self.step if resume else None)
            if self.env.is_main
            else None
        )

    def _load_latest(self, state: dict[str, Any]) -> None:
        path = self.resume_dir
        ckpt.load_weights(self.model, path)
        for optimizer, saved in optimizer_parts(self.optimizer, state["optimizer"], path):
            ckpt.check_optimizer_state(saved, optimizer, path / ckpt.STATE_FILE)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"], self.device)
            self.step = int(state["step"])
            self.best_val = state.get("best_val")
            self.best_step = state.get("best_step")
            self.evals_since_best = int(state.get("evals_since_best", 0))
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise FraglmError(f"checkpoint state in {path} is incompatible: {exc}") from None

    def _state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(self.device),
            "step": self.step,
            "best_val": self.best_val,
            "corpus_fingerprint": self.corpus_fingerprint,
            "best_step": self.best_step,
            "evals_since_best": self.evals_since_best,
        }

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
            info = {"val_loss": self.best_val} if best else {}
            try:
                ckpt.save_checkpoint(
                    self.run_dir,
                    self.model,
                    self._state(),
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
        """With fp16's gradient scaler, stop a run whose steps are all being skipped.

        The scaler skips a step with non-finite gradients and halves its scale; a model
        that overflows at every scale would skip steps forever. Called where the device
        has just caught up (the loss read), so reading the scale, which the previous
        step's update set, waits for nothing; a drop means that step was skipped.
        """
        if not self.scaler.is_enabled():
            return
        scale = self.scaler.get_scale()
        self._skipped_in_a_row = self._skipped_in_a_row + 1 if scale < self._last_scale else 0
        self._last_scale = scale
        limit = self.cfg.train.max_skipped_steps
        if self._skipped_in_a_row >= limit:
            raise FraglmError(
                f"the last {limit} steps were skipped for non-finite fp16 gradients (loss "
                f"scale now {scale:g}); stopped at step {self.step}, the last good checkpoint "
                f"in {self.run_dir} is kept (try train.precision=fp32 or bf16, a lower "
                "train.lr, or a larger train.max_skipped_steps)"
            )

    def _val_starts(self) -> np.ndarray:
        tcfg = self.cfg.train
        return self.val_sampler.eval_starts(
            tcfg.eval_batches * (tcfg.batch_size // tcfg.grad_accum)
        )

    def evaluate(self) -> float | None:
        """Validation loss on the fixed windows (rank 0 only, on the unwrapped model)."""
        if self.val_sampler is None or not self.env.is_main:
            return None
        tcfg = self.cfg.train
        with local_attention(self.model):  # whole sequences on this rank alone, no ring
            loss, _ = evaluate(
                self.model,
                self.val_sampler,
                self._val_starts(),
                batch_size=tcfg.batch_size // tcfg.grad_accum,
                precision=self.plan.precision,
                device=self.device,
            )
        return loss

    def val_bits_per_byte(self, loss: float) -> float:
        """Bits per byte of validation loss ``loss`` (the windows, so their token and byte
        counts, are the same at every evaluation)."""
        starts = self._val_starts()
        n_bytes = self.val_sampler.counted_target_bytes(starts, self.token_bytes)
        return bits_per_byte(loss, self.val_sampler.counted_targets(starts), n_bytes)

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
        loss = float("nan")
        stopped_early = self._patience_exhausted()
        if stopped_early:
            end = self.step  # resuming a run that stopped early: nothing left to do
        try:
            with (
                self.plan.matmul_precision(),
                _deferred_interrupt() as interrupted,
            ):
                self._meter = (time.perf_counter(), self.step)
                stopped = False
                while self.step < end:
                    # every rank must agree, or the ranks would wait on each other forever
                    stopped = any_rank(interrupted(), self.env, self.device)
                    if stopped:
                        break
                    loss = self.train_step()
                    self._after_step(loss, end, bar)
                    if self._evaluated_now() and any_rank(
                        self._patience_exhausted(), self.env, self.device
                    ):
                        stopped_early = True
                        self.save()  # the latest checkpoint remembers that the run stopped
                        self._report_early_stop(bar)
                        break
                if stopped:
                    self.save()
                    bar.write(
                        f"interrupted at step {self.step}: checkpoint saved; continue with --resume"
                    )
                    raise KeyboardInterrupt
        finally:
            bar.close()
            if self.tracker is not None:
                self.tracker.close()
            self.close()
        return TrainResult(
            self.run_dir,
            self.step,
            loss,
            self.best_val,
            self.model.num_parameters(),
            stopped_early,
        )

    def _evaluated_now(self) -> bool:
        return (
            self.step % self.cfg.train.eval_interval == 0 or self.step == self.cfg.train.max_steps
        )

    def _patience_exhausted(self) -> bool:
        """True on rank 0 once train.early_stopping_patience evaluations have not improved."""
        patience = self.cfg.train.early_stopping_patience
        return patience > 0 and self.evals_since_best >= patience

    def _report_early_stop(self, bar: tqdm) -> None:
        if not self.env.is_main:
            return
        best = ckpt.checkpoint_dir(self.run_dir, "best")
        bar.write(
            f"early stopping at step {self.step}: validation loss has not improved for "
            f"{self.evals_since_best} evaluations; best {self.best_val:.4f} at step "
            f"{self.best_step}, kept in {best}"
        )

    def _log(self, record: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.log(record)

    def _after_step(self, loss: float, end: int, bar: tqdm) -> None:
        """Log, evaluate and checkpoint on their intervals."""
        tcfg, step = self.cfg.train, self.step
        tokens = step * tcfg.batch_size * self.cfg.model.context_length
        bar.update(1)
        if step % self.cfg.logging.log_interval == 0 or step == end:
            now = time.perf_counter()
            since, since_step = self._meter
            tokens_per_s = (step - since_step) * tcfg.batch_size * self.cfg.model.context_length
            tokens_per_s /= max(now - since, 1e-9)
            self._meter = (now, step)
            lr = lr_at(step - 1, tcfg)
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
        is_best = False
        if self._evaluated_now():
            # rank 0 evaluates; every rank takes its result, so all agree on is_best
            val = from_main(self.evaluate(), self.env, self.device)
            if val is not None:
                bpb = self.val_bits_per_byte(val)
                ppl = math.exp(min(val, 50.0))
                self._log(
                    {
                        "step": step,
                        "tokens": tokens,
                        "val_loss": val,
                        "val_ppl": ppl,
                        "val_bpb": bpb,
                    }
                )
                if self.env.is_main:
                    bar.write(
                        f"step {step}: val loss {val:.4f}, perplexity {ppl:.2f}, "
                        f"{bpb:.4f} bits per byte"
                    )
                if self.best_val is None or val < self.best_val:
                    self.best_val, self.best_step, is_best = val, step, True
                    self.evals_since_best = 0
                else:
                    self.evals_since_best += 1
        if is_best or step % tcfg.save_interval == 0 or step == end:
            self.save(best=is_best)


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a flag checked between steps; a second one stops at once."""
    pressed = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal pressed
        if pressed:
            raise KeyboardInterrupt
        pressed = True

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: pressed
    finally:
        signal.signal(signal.SIGINT, previous)


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
        if env.is_main:
            parallel = ""
            if env.enabled:
                parallel = (
                    f", {env.dp_size} data-parallel x {env.context_parallel} context-parallel"
                )
            print(
                f"model: {trainer.model.num_parameters():,} parameters ({cfg.model.arch}, "
                f"{cfg.model.attention} attention){parallel}; on {trainer.plan.describe()}"
            )
        return trainer.run(max_new_steps=max_new_steps)
    finally:
        teardown(env)
