"""Quality at equal budget: the modern default vs the original ("seed") architecture.

Trains configs/p100.yaml and configs/seed.yaml on the same corpus, tokenizer and token
budget on the current device, then prints the validation losses and one sample answer
from each. Example (MedQuAD, about 20 minutes per model on a 2-core CPU)::

    python scripts/bench_quality.py --data ../shared/data/medquad/medquad.jsonl \
        --steps 500 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What are the symptoms of high blood pressure?"


def run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "fraglm", *args], capture_output=True, text=True, cwd=ROOT
    )
    if result.returncode:
        sys.exit(f"fraglm {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Q&A corpus (jsonl with question/answer)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="checkpoints/quality")
    args = parser.parse_args()
    rows = []
    for name in ("p100", "seed"):
        out_dir = f"{args.out}/{name}"
        overrides = [
            f"data.path={args.data}", "data.question_field=question", "data.answer_field=answer",
            "data.tokenized_dir=data/tokenized/quality-8k", f"train.out_dir={out_dir}",
            f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
            "train.warmup_steps=50", "train.eval_interval=100", "train.eval_batches=25",
            "train.save_interval=100", "logging.progress=false",
        ]  # fmt: skip
        start = time.perf_counter()
        run("train", "-c", f"configs/{name}.yaml", *[a for o in overrides for a in ("--set", o)])
        minutes = (time.perf_counter() - start) / 60
        metrics = [
            json.loads(x) for x in (ROOT / out_dir / "metrics.jsonl").read_text().split("\n") if x
        ]
        val = min(r["val_loss"] for r in metrics if "val_loss" in r)
        tokens = max(r["tokens"] for r in metrics)
        sample = run("generate", PROMPT, "--run", out_dir, "--temperature", "0.5", "--seed", "0",
                     "--repetition-penalty", "1.2", "--max-new-tokens", "80").strip()  # fmt: skip
        rows.append((name, val, tokens, minutes, sample))
    print("| config | arch | best val loss | tokens | minutes |")
    print("|---|---|---|---|---|")
    for name, val, tokens, minutes, _ in rows:
        arch = "seed" if name == "seed" else "modern"
        print(f"| {name}.yaml | {arch} | {val:.4f} | {tokens:,} | {minutes:.1f} |")
    print(f"\nmodern vs seed: {100 * (1 - rows[0][1] / rows[1][1]):.1f}% lower validation loss\n")
    for name, *_, sample in rows:
        print(f"{name}: Q: {PROMPT}\nA: {sample}\n")


if __name__ == "__main__":
    main()
