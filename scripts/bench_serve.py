"""Benchmark ``fraglm serve``: N concurrent streaming clients against a local server.

Starts ``fraglm serve`` on 127.0.0.1 (a free port) for ``--run``, or, without one, for a
run made here with random weights in the p100 shape (8 layers, width 128, 8 heads,
context 512; tokenizer trained on the sample corpus), so every answer runs to
``--max-tokens``. For each client count, every client sends ``--requests`` streaming chat
requests one after another (temperature 1, seeded, fixed length). Reports the aggregate generated
tokens/s and the p50/p99 latency to the first token and to the end of an answer; prints
a markdown table. The server queues requests (one generation at a time), so latency
grows with the number of clients while tokens/s stays that of one stream.

Example: python scripts/bench_serve.py --clients 1 4 8 --requests 4 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from benchmarking import machine
from local_server import server_process

from fraglm.config import load_config
from fraglm.data.corpus import load_records, make_documents
from fraglm.data.tokenizer import train_tokenizer, vocab_size
from fraglm.nn.model import Transformer
from fraglm.runs import checkpoint as ckpt
from fraglm.runs import layout

REPO_ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What are the symptoms of high blood pressure?"


@dataclass
class Sample:
    first_token_s: float
    total_s: float
    tokens: int


def random_run(root: Path) -> Path:
    """A run directory with random weights in the p100 shape (no training)."""
    cfg = load_config(
        REPO_ROOT / "configs/p100.yaml",
        [
            f"data.path={REPO_ROOT / 'data/sample_health_qa.jsonl'}",
            "data.question_field=question",
            "data.answer_field=answer",
            f"train.out_dir={root}",
        ],
    )
    documents = make_documents(load_records(cfg.data), cfg.data)
    tokenizer = train_tokenizer(documents, cfg.tokenizer, progress=False)
    tokenizer_path = root / "tokenizer-source.json"
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(tokenizer_path))
    layout.write_run_files(root, cfg, tokenizer_path)
    torch.manual_seed(0)
    model = Transformer(cfg.model, vocab_size(tokenizer))
    ckpt.save_checkpoint(root, model, {}, step=0, pointers=("latest", "best"))
    return root


def one_request(url: str, max_tokens: int, timeout: float, seed: int = 0) -> Sample:
    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        # sampled: greedy decoding of random weights repeats the prompt's last (special) token
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    return Sample(first if first is not None else total, total, tokens)


def run_clients(url: str, clients: int, requests: int, max_tokens: int) -> tuple[list, float]:
    samples: list[Sample] = []
    lock = threading.Lock()
    timeout = 600.0

    def client() -> None:
        for seed in range(requests):
            sample = one_request(url, max_tokens, timeout, seed)
            with lock:
                samples.append(sample)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout * requests)
    return samples, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="Run directory (default: random p100 shape).")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=4, help="Requests per client.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fraglm-bench-serve-") as tmp:
        run = args.run or random_run(Path(tmp) / "run")
        threads = {"OMP_NUM_THREADS": str(args.threads)}
        with server_process(run, env=threads) as url:
            one_request(url, 4, 120)  # warm-up
            torch.set_num_threads(args.threads)
            model = run if args.run else "random p100-shape run"
            print(f"# fraglm serve, {model}; {machine(torch.device('cpu'))}")
            print(f"# {args.requests} requests per client, {args.max_tokens} tokens each")
            print("| clients | tokens/s | first token p50 | first token p99 | end p50 | end p99 |")
            print("|---:|---:|---:|---:|---:|---:|")
            for clients in args.clients:
                samples, wall = run_clients(url, clients, args.requests, args.max_tokens)
                firsts = [s.first_token_s * 1000 for s in samples]
                totals = [s.total_s * 1000 for s in samples]
                rate = sum(s.tokens for s in samples) / wall
                print(
                    f"| {clients} | {rate:.0f} | {percentile(firsts, 50):.0f} ms | "
                    f"{percentile(firsts, 99):.0f} ms | {percentile(totals, 50):.0f} ms | "
                    f"{percentile(totals, 99):.0f} ms |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
