"""torch.distributed set-up for ``torchrun``: data parallelism and context parallelism.

Ranks are laid out as ``rank = dp_rank * context_parallel + cp_rank``: each group of
``context_parallel`` consecutive ranks shares one set of sequences (ring attention inside
the group), and the groups split the global batch between them. Without ``torchrun``
(no ``WORLD_SIZE`` in the environment) everything is a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fraglm.config import Config
from fraglm.errors import FraglmError

# How long the other ranks wait for rank 0 to tokenize the corpus. It has a group of its
# own, so the training collectives keep the default timeout; a rank 0 that fails instead
# ends the wait at once (torchrun stops every rank when one exits with an error).
TOKENIZE_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    context_parallel: int = 1
    cp_group: dist.ProcessGroup | None = None
    wait_group: dist.ProcessGroup | None = None  # CPU group with TOKENIZE_TIMEOUT

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.world // self.context_parallel

    @property
    def dp_rank(self) -> int:
        return self.rank // self.context_parallel

    @property
    def cp_rank(self) -> int:
        return self.rank % self.context_parallel


def setup(cfg: Config) -> DistEnv:
    """Join the process group that torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp = cfg.train.context_parallel
    micro = cfg.train.grad_accum
    if world % cp:
        raise FraglmError(
            f"train.context_parallel = {cp} must divide the number of processes ({world}); "
            "launch with torchrun --nproc_per_node=N"
        )
    if cp > 1 and cfg.model.context_length % (2 * cp):
        raise FraglmError(
            f"model.context_length = {cfg.model.context_length} must be divisible by "
            f"2 * train.context_parallel = {2 * cp}"
        )
    dp = world // cp
    if cfg.train.batch_size % (dp * micro):
        raise FraglmError(
            f"train.batch_size = {cfg.train.batch_size} must be divisible by data-parallel "
            f"ranks x grad_accum = {dp} x {micro}"
        )
    if world == 1:
        return DistEnv()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend_for(cfg.train.device, cuda_available=torch.cuda.is_available())
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    wait_group = dist.new_group(backend="gloo", timeout=TOKENIZE_TIMEOUT)
    cp_group = None
    if cp > 1:
        for first in range(0, world, cp):  # every rank creates every group, in order
            group = dist.new_group(list(range(first, first + cp)))
            if first <= rank < first + cp:
                cp_group = group
    return DistEnv(rank, world, local_rank, cp, cp_group, wait_group)


def backend_for(device: str, *, cuda_available: bool) -> str:
    """The process group's backend for ``train.device``, chosen by the device's type:
    NCCL on CUDA (``cuda``, ``cuda:N``, or ``auto`` where a GPU is present), gloo
    otherwise (an unavailable CUDA device is refused later, by ``resolve_device``)."""
    device_type = device.split(":", 1)[0]
    uses_cuda = device_type == "cuda" or (device_type == "auto" and cuda_available)
    return "nccl" if uses_cuda and cuda_available else "gloo"


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: float, env: DistEnv, device: torch.device) -> float:
    if not env.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor)


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a Ctrl-C seen by one)."""
    return all_reduce_sum(float(flag), env, device) > 0


def from_main(value: float | None, env: DistEnv, device: torch.device) -> float | None:
    """Rank 0's ``value`` (None stays None) on every rank, so all ranks decide alike."""
    if not env.enabled:
        return value
    given = value is not None
    tensor = torch.tensor([given, value if given else 0.0], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    given, value = tensor.tolist()
    return value if given else None


def wait_for_main(env: DistEnv) -> None:
    """Every rank waits here until rank 0 arrives (up to :data:`TOKENIZE_TIMEOUT`)."""
    if env.enabled:
        dist.barrier(group=env.wait_group)
