"""Benchmark greedy decoding: fraglm with and without the KV cache, and Hugging Face.

For each prompt length, times the generation of ``--new-tokens`` tokens (prefill
included, as ``transformers``' ``generate`` does) by

* ``fraglm.inference.generate.Generator`` with the KV cache,
* the same without the cache (every step recomputes the whole window),
* ``transformers.LlamaForCausalLM.generate`` (``use_cache=True``) when transformers
  is installed: the same shape and the same weights (fraglm's modern architecture is
  Llama's, so the weights are copied over), so both compute the same function.

The model is the p100 shape (8 layers, width 128, 8 heads, vocab 8000, context 512)
with random weights; the prompts are random token ids. The variants are run
round-robin ``--repeats`` times and the best time is kept, so a load change on a shared
machine hits them alike. Prints a markdown table and the targets (cache >= 5x faster
than no cache at the longest prompt; fraglm cached >= transformers).

Example: python scripts/bench_generate.py --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fraglm.config import ModelConfig, SampleConfig
from fraglm.device import resolve_device
from fraglm.export.hf import to_hf
from fraglm.inference.generate import Generator
from fraglm.nn.model import Transformer

VOCAB = 8000
FIRST_ORDINARY_ID = 4  # ids 0-3 are the special tokens
# cpu: CPU seconds of this process; on a CPU shared with other jobs it leaves out the time
# spent waiting for a core, which wall-clock time cannot (use it with --threads 1).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Row:
    prompt_len: int
    seconds: dict[str, float] = field(default_factory=dict)
    hf_same_tokens: bool | None = None


def fraglm_model(attention: str, context: int, device: torch.device) -> Transformer:
    cfg = ModelConfig(
        n_layers=8, d_model=128, n_heads=8, context_length=context, attention=attention
    )
    torch.manual_seed(0)
    return Transformer(cfg, VOCAB).to(device).eval()


def hf_model(model: Transformer) -> torch.nn.Module | None:
    """``LlamaForCausalLM`` holding ``model``'s weights (None without transformers)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    return to_hf(model)


def timed(
    fn: Callable[[], list[int]], device: torch.device, clock: Callable[[], float]
) -> tuple[float, list[int]]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    tokens = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start, tokens


def run(args: argparse.Namespace) -> list[Row]:
    device = resolve_device(args.device)
    model = fraglm_model(args.attention, args.context, device)
    hf = None if args.no_hf else hf_model(model)
    params = SampleConfig(temperature=0.0, max_new_tokens=args.new_tokens)
    cached = Generator(model, params, frozenset(), use_cache=True)
    uncached = Generator(model, params, frozenset(), use_cache=False)
    rng = torch.Generator().manual_seed(0)
    rows = []
    for length in args.prompt_lens:
        if length + args.new_tokens > args.context:
            raise SystemExit(f"prompt {length} + {args.new_tokens} new tokens > {args.context}")
        prompt = torch.randint(FIRST_ORDINARY_ID, VOCAB, (length,), generator=rng).tolist()
        variants: dict[str, Callable[[], list[int]]] = {
            "cache": lambda g=cached, p=prompt: list(g.stream(p, torch.Generator())),
            "no cache": lambda g=uncached, p=prompt: list(g.stream(p, torch.Generator())),
        }
        if hf is not None:
            ids = torch.tensor([prompt], device=device)

            def hf_generate(ids: torch.Tensor = ids) -> list[int]:
                out = hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    use_cache=True,
                )
                return out[0, ids.shape[1] :].tolist()

            variants["transformers"] = hf_generate
        row = Row(length)
        outputs: dict[str, list[int]] = {}
        with torch.no_grad():
            for name, fn in variants.items():  # warm-up
                outputs[name] = fn()
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    seconds, tokens = timed(fn, device, CLOCKS[args.clock])
                    assert len(tokens) == args.new_tokens, (name, len(tokens))
                    row.seconds[name] = min(row.seconds.get(name, float("inf")), seconds)
        if hf is not None:
            row.hf_same_tokens = outputs["transformers"] == outputs["cache"]
        rows.append(row)
    return rows


def table(rows: list[Row], new_tokens: int) -> str:
    has_hf = any("transformers" in r.seconds for r in rows)
    head = "| prompt | fraglm cache tok/s | fraglm no cache tok/s | cache speedup |"
    rule = "|---:|---:|---:|---:|"
    if has_hf:
        head += " transformers tok/s | fraglm / transformers | same tokens |"
        rule += "---:|---:|:---:|"
    lines = [head, rule]
    for r in rows:
        rate = {name: new_tokens / s for name, s in r.seconds.items()}
        line = (
            f"| {r.prompt_len} | {rate['cache']:.1f} | {rate['no cache']:.1f} "
            f"| {rate['cache'] / rate['no cache']:.1f}x |"
        )
        if has_hf:
            same = "yes" if r.hf_same_tokens else "no"
            line += (
                f" {rate['transformers']:.1f} | {rate['cache'] / rate['transformers']:.2f}x "
                f"| {same} |"
            )
        lines.append(line)
    return "\n".join(lines)


def targets(rows: list[Row]) -> str:
    longest = max(rows, key=lambda r: r.prompt_len)
    speedup = longest.seconds["no cache"] / longest.seconds["cache"]
    lines = [
        f"- cache vs no cache at prompt {longest.prompt_len}: {speedup:.1f}x "
        f"(target >= 5x: {'met' if speedup >= 5 else 'NOT met'})"
    ]
    if "transformers" in longest.seconds:
        worst = min(r.seconds["transformers"] / r.seconds["cache"] for r in rows)
        lines.append(
            f"- fraglm cached vs transformers, slowest prompt length: {worst:.2f}x "
            f"(target >= 1x: {'met' if worst >= 1 else 'NOT met'})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[16, 256, 480])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--attention", default="fragment", choices=["fragment", "sdpa", "naive"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS), help="what is timed")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    hf_version = "not installed"
    with contextlib.suppress(ImportError):
        import transformers

        hf_version = transformers.__version__
    device = resolve_device(args.device)
    print(
        f"device {device} ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"transformers {hf_version}; fraglm attention {args.attention}; "
        f"greedy, {args.new_tokens} new tokens, best of {args.repeats} ({args.clock} clock)\n"
    )
    rows = run(args)
    print(table(rows, args.new_tokens))
    print()
    print(targets(rows))


if __name__ == "__main__":
    main()
