"""Ring attention across N CPU processes (gloo): per-rank peak memory and step time.

Each rank holds T/N tokens of one sequence (zigzag order) and runs ring attention forward
and backward over the group. Memory per rank should fall about as 1/N::

    python scripts/bench_ring.py --length 16384 --ranks 1 2 4
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from benchmarking import machine, median_seconds, peak_mib

from fraglm.parallel.ring import ring_attention


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        local = args.length // world
        gen = torch.Generator().manual_seed(rank)
        shape = (args.batch, args.heads, local, args.dim)
        q, k, v = (torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
        grad = torch.randn(shape, generator=gen)

        def step() -> None:
            out = ring_attention(q, k, v, fragment_size=args.fragment)
            out.backward(grad)
            q.grad = k.grad = v.grad = None

        step()  # warm-up
        dist.barrier()
        seconds = median_seconds(step, torch.device("cpu"), args.repeats)
        dist.barrier()
        memory = peak_mib(step, torch.device("cpu"))
        queue.put((rank, seconds, memory))
    finally:
        dist.destroy_process_group()


def run(world: int, args: argparse.Namespace) -> tuple[float, float]:
    """Slowest rank's median step time and largest per-rank peak memory."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=3600) for _ in range(world)]
    for p in procs:
        p.join()
    return max(r[1] for r in results), max(r[2] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384, help="sequence length T")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--fragment", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="CPU threads shared by ranks"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# ring attention, T={args.length}, B={args.batch}, H={args.heads}, D={args.dim}, "
          f"fragment {args.fragment}, fp32, causal; {machine(torch.device('cpu'))}\n")  # fmt: skip
    print("| ranks N | tokens per rank | fwd+bwd step (s) | peak attention memory per rank (MiB) |")
    print("|---|---|---|---|")
    base = None
    for world in args.ranks:
        seconds, memory = run(world, args)
        base = base or memory
        print(
            f"| {world} | {args.length // world} | {seconds:.2f} | {memory:.1f} "
            f"({memory / base:.2f}x of N={args.ranks[0]}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
