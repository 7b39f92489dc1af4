"""`fraglm eval`: the trainer's validation loss, reproduced; any corpus file with --data."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fraglm.config import END, ModelConfig, TokenizerConfig, load_config
from fraglm.data.batches import WindowSampler, answer_target_mask
from fraglm.data.shards import tokenize
from fraglm.data.tokenizer import decode, token_byte_lengths, train_tokenizer, vocab_size
from fraglm.device import Precision
from fraglm.nn.model import Transformer
from fraglm.runs import layout, pointers
from fraglm.runs.loading import load_run
from fraglm.training.evaluation import bits_per_byte, evaluate
from fraglm.training.run_evaluation import evaluate_run
from fraglm.training.trainer import train

REPO_ROOT = Path(__file__).resolve().parents[2]
FP32 = Precision("fp32", torch.float32, use_scaler=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_overrides) -> Path:
    """The tiny config trained for 20 steps, evaluated at steps 10 and 20."""
    overrides = tiny_overrides(tmp_path_factory.mktemp("eval"), steps=20)
    return train(load_config(REPO_ROOT / "configs" / "tiny.yaml", overrides)).run_dir


def logged_val(run: Path, step: int, key: str = "val_loss") -> float:
    lines = (run / layout.METRICS_FILE).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    [value] = [r[key] for r in records if r["step"] == step and "val_loss" in r]
    return value


@pytest.mark.parametrize("which", ["best", "latest"])
def test_eval_reproduces_the_trainers_validation_loss(run_dir, which):
    step = pointers.read_pointer(run_dir, which)["step"]
    result = evaluate_run(run_dir, which=which, device="cpu")
    assert result.loss == pytest.approx(logged_val(run_dir, step), abs=1e-6)
    assert result.bits_per_byte == pytest.approx(logged_val(run_dir, step, "val_bpb"), abs=1e-6)
    assert result.tokens == 2 * 8 * 64  # eval_batches x batch_size x context_length
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_eval_command(run_cli, run_dir):
    result = run_cli("eval", "--run", run_dir, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    best = pointers.read_pointer(run_dir, "best")["val_loss"]
    ppl = math.exp(best)
    bpb = evaluate_run(run_dir, device="cpu").bits_per_byte
    split = Path(layout.load_run_config(run_dir).data.tokenized_dir) / "val.bin"
    assert result.stdout == (
        f"{split}: loss {best:.4f}, perplexity {ppl:.2f}, {bpb:.4f} bits per byte, 1,024 tokens\n"
    )


def test_bits_per_byte_equals_a_hand_computation(qa_documents):
    """Summed nats over the targets / (ln 2 x UTF-8 bytes of the text they decode to), on
    a text with two- to four-byte characters that the small vocabulary splits into pieces."""
    tokenizer = train_tokenizer(qa_documents, TokenizerConfig(vocab_size=300), progress=False)
    document = "<|Q|>Où est le café ? 头痛 🤒<|A|>Buvez de l'eau, ½ litre.<|END|>"
    tokens = np.array(tokenizer.encode(document).ids)
    assert decode(tokenizer, tokens) == document
    context = len(tokens) - 1  # one window: every token after <|Q|> is a target
    sampler = WindowSampler(tokens, context, end_id=tokenizer.token_to_id(END))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=1, d_model=16, n_heads=2), vocab_size(tokenizer))
    starts, cpu = np.array([0]), torch.device("cpu")
    loss, count = evaluate(model, sampler, starts, batch_size=1, precision=FP32, device=cpu)
    n_bytes = sampler.counted_target_bytes(starts, token_byte_lengths(tokenizer))
    assert n_bytes == len(document.encode("utf-8")) - len("<|Q|>")
    with torch.no_grad():
        logits = model(torch.tensor(tokens[None, :-1]))
    nats = F.cross_entropy(logits[0], torch.tensor(tokens[1:]), reduction="sum")
    expected = float(nats) / (math.log(2) * (len(document.encode("utf-8")) - 5))
    assert count == context
    assert bits_per_byte(loss, count, n_bytes) == pytest.approx(expected, rel=1e-5)


def test_eval_on_a_corpus_file(run_cli, run_dir, qa_jsonl, qa_documents):
    result = evaluate_run(run_dir, data=str(qa_jsonl), device="cpu")
    # the same loss computed by hand: the documents encoded one after another, cut into
    # consecutive context-length windows, each predicting its next tokens
    loaded = load_run(run_dir, device="cpu")
    tokens = np.concatenate([e.ids for e in loaded.tokenizer.encode_batch(qa_documents)])
    context = loaded.cfg.model.context_length
    starts = range(0, len(tokens) - context, context)
    windows = torch.tensor(np.stack([tokens[s : s + context + 1] for s in starts]))
    with torch.no_grad():
        logits = loaded.model(windows[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert result.tokens == len(starts) * context
    assert result.loss == pytest.approx(float(expected), rel=1e-5)
    cli = run_cli("eval", "--run", run_dir, "--data", qa_jsonl, "--device", "cpu")
    assert cli.exit_code == 0, cli.stderr
    assert cli.stdout.startswith(f"{qa_jsonl}: loss {result.loss:.4f}, ")


def test_eval_input_errors(run_cli, run_dir, tmp_path, write_jsonl):
    missing = tmp_path / "missing.jsonl"
    run_cli("eval", "--run", run_dir, "--data", missing).assert_user_error("corpus file not found")
    short = write_jsonl(tmp_path / "short.jsonl", [{"question": "Hi?", "answer": "Yes."}])
    run_cli("eval", "--run", run_dir, "--data", short).assert_user_error(
        "evaluation needs at least 66"
    )
    run_cli("eval", "--run", run_dir, "--checkpoint", "first").assert_user_error(
        "--checkpoint must be best or latest"
    )


def test_eval_refuses_a_validation_split_tokenized_again(
    run_cli, run_dir, tmp_path, tiny_overrides
):
    # a copy of the run whose tokenized directory was since tokenized with another vocabulary
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    overrides = tiny_overrides(tmp_path, "tokenizer.vocab_size=300", steps=20)
    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", overrides)
    tokenize(cfg, progress=False)
    saved = layout.load_run_config(copy)
    saved.data.tokenized_dir = cfg.data.tokenized_dir
    (copy / layout.CONFIG_FILE).write_text(saved.to_yaml(), encoding="utf-8")
    run_cli("eval", "--run", copy).assert_user_error("has been tokenized again since run")
    corpus = REPO_ROOT / "data" / "sample_health_qa.jsonl"
    assert run_cli("eval", "--run", copy, "--data", corpus).exit_code == 0


def test_evaluation_waits_for_the_device_once(op_log):
    """However many batches, the loss sums and token counts are read once, at the end."""
    gen = np.random.default_rng(0)
    tokens = gen.integers(4, 50, size=2000)
    tokens[::7], tokens[3::7], tokens[6::7] = 1, 2, 3  # Q ... A ... END
    sampler = WindowSampler(tokens, 16, end_id=3, target_mask=answer_target_mask(tokens, 1, 2, 3))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=1, d_model=16, n_heads=2, context_length=16), 50)
    starts = sampler.eval_starts(12)
    device = torch.device("cpu")
    with op_log() as log:
        loss, count = evaluate(model, sampler, starts, batch_size=4, precision=FP32, device=device)
    assert log.host_syncs == ["aten._local_scalar_dense.default"]
    assert count == sampler.counted_targets(starts) and 0 < count < 12 * 16
    assert math.isfinite(loss)
