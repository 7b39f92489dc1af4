"""Ring attention over 2 and 4 gloo processes equals single-process FragmentStream."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fraglm.attention.fragment import fragment_attention
from fraglm.config import ModelConfig
from fraglm.data.batches import Batch
from fraglm.nn.layers import AttentionKernel
from fraglm.nn.model import Transformer
from fraglm.parallel.context import RingAttentionKernel, apply_context_parallel, local_attention
from fraglm.parallel.ring import ring_attention
from fraglm.parallel.zigzag import zigzag_indices, zigzag_share, zigzag_split

B, H, T, D = 2, 4, 48, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(with_docs: bool, kv_heads: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, dtype=dtype, generator=gen)
    k = torch.randn(B, kv_heads, T, D, dtype=dtype, generator=gen)
    v = torch.randn(B, kv_heads, T, D, dtype=dtype, generator=gen)
    dout = torch.randn(B, H, T, D, dtype=dtype, generator=gen)
    docs = None
    if with_docs:
        docs = torch.cat([torch.zeros(B, 13), torch.ones(B, 20), torch.full((B, T - 33), 2)], 1)
        docs[1, 40:] = -1  # padding: sees nothing, seen by nothing
        docs = docs.long()
    return q, k, v, dout, docs


# (causal, document ids, autocast, key/value heads): grouped queries (2 of 4 heads) and,
# last, one key head per query head, where the block routines' folds are views of their
# inputs; the fourth runs fp32 inside bf16 autocast, as in mixed-precision training, and
# must still match fp32 attention without autocast
CASES = [
    (True, False, False, 2),
    (False, False, False, 2),
    (True, True, False, 2),
    (True, True, True, 2),
    (True, True, False, H),
]


def _dtype_and_tolerance(autocast: bool, impl: str) -> tuple[torch.dtype, float]:
    if impl == "triton":  # the kernels take fp32 at most
        return torch.float32, 1e-5
    return (torch.float32, 1e-5) if autocast else (torch.float64, 1e-10)


def _worker(rank: int, world: int, port: int, queue, impl: str, cases: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for case, (causal, with_docs, autocast, kv_heads) in enumerate(cases):
            dtype = _dtype_and_tolerance(autocast, impl)[0]
            q, k, v, dout, docs = _inputs(with_docs, kv_heads, dtype)
            local = [zigzag_split(t, rank, world, dim=2).requires_grad_() for t in (q, k, v)]
            local_docs = None if docs is None else zigzag_split(docs, rank, world, dim=1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = ring_attention(
                    *local, causal=causal, fragment_size=5, doc_ids=local_docs, impl=impl
                )
                out.backward(zigzag_split(dout, rank, world, dim=2))
            tensors = [out.detach(), *(t.grad for t in local)]
            queue.put((case, rank, [t.numpy().copy() for t in tensors]))
    except Exception as exc:
        queue.put((None, rank, f"{type(exc).__name__}: {exc}"))  # fail fast, with the cause
        raise
    finally:
        dist.destroy_process_group()


def _run(world: int, impl: str = "auto", cases: list = CASES) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    args = [(r, world, port, queue, impl, cases) for r in range(world)]
    procs = [ctx.Process(target=_worker, args=a) for a in args]
    # Triton's interpreter must be chosen before a rank imports triton: the ranks (and only
    # they) inherit the variable from this process's environment while they start.
    interpret = impl == "triton"  # the ranks' tensors are on the CPU
    before = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        for p in procs:
            p.start()
    finally:
        if interpret and before is None:
            del os.environ["TRITON_INTERPRET"]
        elif interpret:
            os.environ["TRITON_INTERPRET"] = before
    results, failure = {}, None
    try:
        for _ in range(world * len(cases)):
            case, rank, payload = queue.get(timeout=180)
            if case is None:
                failure = f"rank {rank} failed: {payload}"
                break
            results[case, rank] = [torch.from_numpy(a) for a in payload]
    finally:
        for p in procs:
            if failure is not None:
                p.terminate()  # the other ranks wait for the failed one forever
            p.join(timeout=60)
    if failure is not None:
        pytest.fail(failure)
    assert all(p.exitcode == 0 for p in procs)
    return results


def _check_against_single_process(results: dict, world: int, impl: str, cases: list) -> None:
    for case, (causal, with_docs, autocast, kv_heads) in enumerate(cases):
        dtype, tolerance = _dtype_and_tolerance(autocast, impl)
        q, k, v, dout, docs = _inputs(with_docs, kv_heads, dtype)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        expected = fragment_attention(
            *full, causal=causal, fragment_size=5, doc_ids=docs, impl="torch"
        )
        expected.backward(dout)
        reference = [expected.detach(), *(t.grad for t in full)]
        for rank in range(world):
            for got, want in zip(results[case, rank], reference, strict=True):
                want_local = zigzag_split(want, rank, world, dim=2)
                torch.testing.assert_close(got, want_local, rtol=0, atol=tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_single_process(world):
    """Outputs and q/k/v gradients, fp64 to 1e-10: causal, non-causal, document-masked,
    grouped and one key head per query head; fp32 under autocast to 1e-5."""
    _check_against_single_process(_run(world), world, "auto", CASES)


@pytest.mark.slow
def test_ring_on_the_triton_kernels():
    """The same with the block routines on the Triton kernels (through the interpreter),
    causal with documents and padding, fp32 against the tile loop, to 1e-5."""
    pytest.importorskip("triton")
    cases = [(True, True, False, 2)]
    _check_against_single_process(_run(2, "triton", cases), 2, "triton", cases)


def test_zigzag_balances_causal_work():
    world, length = 4, 32
    shares = [zigzag_indices(length, r, world) for r in range(world)]
    assert sorted(torch.cat(shares).tolist()) == list(range(length))
    work = [int((s + 1).sum()) for s in shares]  # keys visible to each query, summed
    assert len(set(work)) == 1


def test_zigzag_needs_divisible_length():
    with pytest.raises(ValueError, match="divisible"):
        zigzag_indices(30, 0, 4)


def test_zigzag_share_takes_each_sequences_share_with_its_positions():
    inputs = torch.arange(16).view(2, 8)
    batch = Batch(inputs, inputs + 100, inputs % 3)
    share = zigzag_share(batch, 1, 2)
    index = torch.tensor([2, 3, 4, 5])  # chunks 1 and 2 of 4
    assert share.positions.tolist() == index.tolist()
    assert torch.equal(share.inputs, inputs[:, index])
    assert torch.equal(share.targets, inputs[:, index] + 100)
    assert torch.equal(share.doc_ids, inputs[:, index] % 3)
    assert zigzag_share(Batch(inputs, inputs, None), 0, 2).doc_ids is None


def test_context_parallel_swaps_every_kernel_from_outside():
    """apply_context_parallel puts a ring kernel in each block (the model holds no group);
    local_attention restores the plain kernels for a while, for one-rank evaluation."""
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, context_length=32, fragment_size=4)
    model = Transformer(cfg, 50)
    plain = [block.attn.kernel for block in model.blocks]
    before = model.state_dict().keys()
    group = object()  # never used: nothing runs
    apply_context_parallel(model, group)  # type: ignore[arg-type]
    rings = [block.attn.kernel for block in model.blocks]
    assert all(isinstance(k, RingAttentionKernel) and k.group is group for k in rings)
    assert model.state_dict().keys() == before  # kernels hold no state: checkpoints unchanged
    with local_attention(model):
        assert [block.attn.kernel for block in model.blocks] == plain
        assert all(isinstance(k, AttentionKernel) for k in plain)
        model(torch.randint(0, 50, (1, 8)))
    assert [block.attn.kernel for block in model.blocks] == rings
