"""Quality at equal tokens: variants of a config trained on the same corpus and batches.

Every variant trains on the same tokenizer, corpus, batches and token budget on the
current device; the table gives each one's validation loss and bits per byte (best and
last evaluation) and wall time. A variant is ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE``
with config overrides (``config=PATH`` picks another base config); ``--llama`` variants
train transformers' ``LlamaForCausalLM`` of the config's model shape in the same trainer,
with the same optimizer, schedule and batches. Without variants: configs/p100.yaml
against configs/seed.yaml (the original architecture). Examples::

    python scripts/bench_quality.py --data ../shared/data/medquad/medquad.jsonl \\
        --steps 400 --batch-size 16
    python scripts/bench_quality.py --data ../shared/data/medquad/medquad.jsonl \\
        --steps 150 --variant adamw:train.optimizer=adamw --variant muon:train.optimizer=muon \\
        --llama llama-muon:train.optimizer=muon
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fraglm.config import ModelConfig, load_config  # noqa: E402
from fraglm.export.hf import llama_config  # noqa: E402
from fraglm.nn.loss import TokenLoss  # noqa: E402
from fraglm.training.optim import build_optimizer  # noqa: E402
from fraglm.training.tracking import read_metrics  # noqa: E402
from fraglm.training.trainer import Trainer  # noqa: E402

PROMPT = "What are the symptoms of high blood pressure?"
DEFAULT_VARIANTS = ["p100:config=configs/p100.yaml", "seed:config=configs/seed.yaml"]


class LlamaLM(torch.nn.Module):
    """transformers' Llama of a fraglm model shape, with what the trainer's loss
    (:class:`fraglm.nn.loss.TokenLoss`) reads: ``hidden_states``, ``head``, ``vocab_size``."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.hf = LlamaForCausalLM(LlamaConfig(**llama_config(cfg, vocab_size)))
        self.blocks = self.hf.model.layers  # the matrices train.optimizer=muon updates
        self.head, self.vocab_size = self.hf.lm_head, vocab_size

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx: torch.Tensor, **_: object) -> torch.Tensor:
        return self.hf.model(input_ids=idx).last_hidden_state


@dataclass
class Variant:
    name: str
    config: str
    overrides: list[str]
    llama: bool

    @classmethod
    def parse(cls, spec: str, *, base: str, llama: bool) -> Variant:
        name, _, rest = spec.partition(":")
        config, overrides = base, []
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, _, value = item.partition("=")
            if key == "config":
                config = value
            else:
                overrides.append(item)
        return cls(name, config, overrides, llama)


def train_variant(variant: Variant, common: list[str], out_dir: str) -> float:
    """Train one variant; returns the wall time in minutes."""
    cfg = load_config(
        ROOT / variant.config, [*common, f"train.out_dir={out_dir}", *variant.overrides]
    )
    start = time.perf_counter()
    trainer = Trainer(cfg)
    if variant.llama:
        torch.manual_seed(cfg.train.seed)
        trainer.model = LlamaLM(cfg.model, trainer.vocab_size)
        trainer.forward_model = TokenLoss(trainer.model)
        trainer.optimizer = build_optimizer(trainer.model, cfg.train, trainer.plan.muon_dtype)
    trainer.run()
    return (time.perf_counter() - start) / 60


def sample_answer(out_dir: str) -> str:
    args = ["generate", PROMPT, "--run", out_dir, "--temperature", "0.5", "--seed", "0",
            "--repetition-penalty", "1.2", "--max-new-tokens", "80"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "fraglm", *args], capture_output=True, text=True, cwd=ROOT
    )
    return result.stdout.strip() if result.returncode == 0 else f"(failed: {result.stderr})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Q&A corpus (jsonl with question/answer)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--config", default="configs/p100.yaml", help="base config of variants")
    parser.add_argument("--variant", action="append", default=[], help="NAME[:KEY=VALUE,...]")
    parser.add_argument("--llama", action="append", default=[], help="NAME[:KEY=VALUE,...]")
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--tokenized-dir", default="data/tokenized/quality-8k")
    parser.add_argument("--out", default="checkpoints/quality")
    args = parser.parse_args()
    specs = [Variant.parse(v, base=args.config, llama=False) for v in args.variant]
    specs += [Variant.parse(v, base=args.config, llama=True) for v in args.llama]
    if not specs:
        specs = [Variant.parse(v, base=args.config, llama=False) for v in DEFAULT_VARIANTS]
    common = [
        f"data.path={args.data}", "data.question_field=question", "data.answer_field=answer",
        f"data.tokenized_dir={args.tokenized_dir}", f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}", "train.warmup_steps=50",
        f"train.eval_interval={args.eval_interval}", "train.eval_batches=25",
        f"train.save_interval={args.steps}", "logging.progress=false",
    ]  # fmt: skip
    print("| variant | changes | best val loss | best val bpb | last val bpb | tokens | minutes |")
    print("|---|---|---|---|---|---|---|")
    samples = []
    for variant in specs:
        out_dir = f"{args.out}/{variant.name}"
        minutes = train_variant(variant, common, out_dir)
        evals = [r for r in read_metrics(ROOT / out_dir) if "val_loss" in r]
        best = min(evals, key=lambda r: r["val_loss"])
        changes = ", ".join(variant.overrides) or variant.config
        if variant.llama:
            changes = f"transformers Llama; {changes}"
        else:
            samples.append((variant.name, sample_answer(out_dir)))
        print(
            f"| {variant.name} | {changes} | {best['val_loss']:.4f} | {best['val_bpb']:.4f} | "
            f"{evals[-1]['val_bpb']:.4f} | {evals[-1]['tokens']:,} | {minutes:.1f} |",
            flush=True,
        )
        (ROOT / out_dir / "bench.json").write_text(
            json.dumps({"variant": variant.name, "changes": changes, "minutes": minutes}) + "\n"
        )
    for name, sample in samples:
        print(f"\n{name}: Q: {PROMPT}\nA: {sample}")


if __name__ == "__main__":
    main()
