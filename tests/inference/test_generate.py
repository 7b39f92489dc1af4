"""Sampling: KV cache exactness, sampling controls, stop handling, sliding window, CLI."""

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from fraglm.config import (
    ANSWER,
    END,
    QUESTION,
    ModelConfig,
    SampleConfig,
    TokenizerConfig,
    load_config,
)
from fraglm.data.tokenizer import train_tokenizer, vocab_size
from fraglm.errors import FraglmError
from fraglm.inference import generate
from fraglm.inference.generate import (
    Generator,
    apply_repetition_penalty,
    make_rng,
    next_token,
    prompt_text,
    stop_ids_for,
    stream_text,
)
from fraglm.nn.model import Transformer
from fraglm.runs import checkpoint as ckpt
from fraglm.runs import layout
from fraglm.runs.loading import load_run

REPO_ROOT = Path(__file__).resolve().parents[2]
ARCHS = ["modern", "seed"]


def sharp_model(arch: str, context: int, *, vocab: int = 96, seed: int = 0) -> Transformer:
    """A random tiny model whose attention is far from uniform, so that a wrong position
    or a wrong cached key changes the logits well beyond the tolerances below."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch=arch, n_layers=2, d_model=32, n_heads=4, context_length=context, fragment_size=16
    )
    model = Transformer(cfg, vocab)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(10)
        model.norm.weight.mul_(20)  # logits of order 1
    return model.eval()


class BigramStub(nn.Module):
    """A stand-in model whose logits depend only on the last token: ``table[last]``."""

    def __init__(self, table: torch.Tensor, context: int = 512) -> None:
        super().__init__()
        self.cfg = ModelConfig(n_layers=1, d_model=8, n_heads=1, context_length=context)
        self.vocab_size = table.shape[1]
        self.table = nn.Parameter(table.float(), requires_grad=False)

    def forward(self, idx: torch.Tensor, *, cache=None, last_only: bool = False) -> torch.Tensor:
        if cache is not None:
            cache.advance(idx.shape[1])
        return self.table[idx[:, -1:] if last_only else idx]


def chain(vocab: int, links: dict[int, int]) -> torch.Tensor:
    """Bigram logits where ``a`` is followed by ``links[a]`` (else by 0) with certainty."""
    table = torch.zeros(vocab, vocab)
    table[:, 0] = 10.0
    for a, b in links.items():
        table[a] = 0.0
        table[a, b] = 10.0
    return table


def greedy(**changes) -> SampleConfig:
    return SampleConfig(**{"temperature": 0.0, "max_new_tokens": 20, **changes})


def random_prompt(length: int, vocab: int, seed: int = 1) -> list[int]:
    return torch.randint(
        4, vocab, (length,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


@pytest.fixture
def recorded_logits(monkeypatch) -> list[torch.Tensor]:
    """Every logits vector that the generator hands to ``next_token``."""
    seen: list[torch.Tensor] = []

    def recording(logits, *args):
        seen.append(logits.detach().clone())
        return next_token(logits, *args)

    monkeypatch.setattr(generate, "next_token", recording)
    return seen


# KV cache


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_and_uncached_decoding_give_the_same_logits(arch, recorded_logits):
    model = sharp_model(arch, context=256)
    prompt = random_prompt(30, model.vocab_size)
    runs = {}
    for use_cache in (True, False):
        recorded_logits.clear()
        gen = Generator(model, greedy(max_new_tokens=200), frozenset(), use_cache=use_cache)
        tokens = list(gen.stream(prompt, make_rng(0)))
        runs[use_cache] = tokens, torch.stack(recorded_logits)
    (cached, cached_logits), (uncached, uncached_logits) = runs[True], runs[False]
    assert len(cached) == 200
    assert cached == uncached
    assert cached_logits.std() > 0.5  # logits that carry information, not a flat model
    torch.testing.assert_close(cached_logits, uncached_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_sliding_past_the_context_keeps_generating(arch, recorded_logits, caplog):
    model = sharp_model(arch, context=64)
    prompt = random_prompt(50, model.vocab_size)
    gen = Generator(model, greedy(max_new_tokens=100), frozenset())
    tokens = list(gen.stream(prompt, make_rng(0)))
    assert len(tokens) == 100
    assert caplog.messages == ["note: context of 64 tokens is full; continuing with the last 32"]
    # Each step sees the tokens since the last refill, which keeps the last 32 tokens.
    history, start = prompt + tokens, 0
    with torch.no_grad():
        for step, logits in enumerate(recorded_logits):
            end = len(prompt) + step
            if end - start > 64:
                start = end - 32
            expected = model(torch.tensor([history[start:end]]))[0, -1]
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_a_prompt_longer_than_the_context_is_cut_with_a_warning(caplog):
    model = sharp_model("seed", context=64)
    gen = Generator(model, greedy(max_new_tokens=5), frozenset())
    assert len(list(gen.stream(random_prompt(80, model.vocab_size), make_rng(0)))) == 5
    assert caplog.records[0].levelname == "WARNING"
    assert caplog.messages[0] == "note: prompt is 80 tokens; keeping the last 64"


def test_the_generator_can_be_reused_for_another_prompt():
    model = sharp_model("modern", context=64)
    gen = Generator(model, greedy(max_new_tokens=10), frozenset())
    first = list(gen.stream(random_prompt(40, model.vocab_size, seed=1), make_rng(0)))
    list(gen.stream(random_prompt(20, model.vocab_size, seed=2), make_rng(0)))
    assert list(gen.stream(random_prompt(40, model.vocab_size, seed=1), make_rng(0))) == first


# sampling controls


def test_greedy_and_top_k_1_are_deterministic_and_equal():
    model = sharp_model("modern", context=64)
    prompt = random_prompt(10, model.vocab_size)

    def sample(params: SampleConfig, seed: int) -> list[int]:
        return list(Generator(model, params, frozenset()).stream(prompt, make_rng(seed)))

    reference = sample(greedy(), 0)
    assert sample(greedy(), 1) == reference
    top1 = SampleConfig(temperature=1.5, top_k=1, max_new_tokens=20)
    assert sample(top1, 0) == sample(top1, 7) == reference


def test_a_seed_reproduces_sampled_text_and_other_seeds_differ():
    model = sharp_model("modern", context=64)
    prompt = random_prompt(10, model.vocab_size)
    params = SampleConfig(temperature=1.0, max_new_tokens=20)

    def sample(seed: int) -> list[int]:
        return list(Generator(model, params, frozenset()).stream(prompt, make_rng(seed)))

    assert sample(3) == sample(3)
    assert len({tuple(sample(seed)) for seed in range(4)}) == 4


def test_a_small_top_p_keeps_only_the_most_likely_token():
    logits = torch.tensor([1.0, 3.0, 2.9, 2.8, 0.0])
    params = SampleConfig(temperature=1.0, top_p=0.01)
    seen = torch.zeros(5, dtype=torch.bool)
    rng = make_rng(0)
    assert {next_token(logits, params, seen, rng) for _ in range(50)} == {1}


def test_top_p_keeps_the_smallest_set_that_holds_the_mass():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    params = SampleConfig(temperature=1.0, top_p=0.5)
    seen = torch.zeros(4, dtype=torch.bool)
    rng = make_rng(0)
    assert {next_token(logits, params, seen, rng) for _ in range(200)} == {0, 1}


def test_top_k_restricts_the_support():
    logits = torch.tensor([0.0, 0.1, 0.5, 0.2, 0.4, 0.3])
    params = SampleConfig(temperature=1.0, top_k=3)
    seen = torch.zeros(6, dtype=torch.bool)
    rng = make_rng(0)
    assert {next_token(logits, params, seen, rng) for _ in range(300)} == {2, 4, 5}


def test_sampling_does_not_change_the_models_logits():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.1])
    before = logits.clone()
    seen = torch.tensor([True, True, False, False])
    params = SampleConfig(temperature=0.7, top_k=2, top_p=0.9, repetition_penalty=1.5)
    next_token(logits, params, seen, make_rng(0))
    assert torch.equal(logits, before)


def test_repetition_penalty_shrinks_positive_and_grows_negative_seen_logits():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    seen = torch.tensor([True, True, False, False])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [1.0, -4.0, 2.0, -2.0]


def repeated_ngram_fraction(tokens: list[int], n: int = 3) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams)


def test_repetition_penalty_breaks_a_loop():
    # Every token is followed by a 4 -> 5 -> 6 -> 4 cycle at logit 2.0; the other tokens
    # sit at random logits below that, many of them above 2.0 / 1.3.
    vocab = 48
    table = torch.rand(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 1.9
    table[:, 4] = 2.0
    table[4, 4], table[4, 5] = 0.0, 2.0
    table[5, 4], table[5, 6] = 0.0, 2.0
    model = BigramStub(table)

    def tokens(penalty: float) -> list[int]:
        params = greedy(max_new_tokens=60, repetition_penalty=penalty)
        return list(Generator(model, params, frozenset()).stream([7], make_rng(0)))

    looping, penalized = tokens(1.0), tokens(1.3)
    assert looping[:6] == [4, 5, 6, 4, 5, 6]
    assert repeated_ngram_fraction(looping) > 0.9
    assert repeated_ngram_fraction(penalized) < 0.5


# stopping


def test_the_stop_token_ends_generation():
    model = BigramStub(chain(16, {10: 11, 11: 12, 12: 3, 3: 13}))
    gen = Generator(model, greedy(), frozenset({3}))
    assert list(gen.stream([10], make_rng(0))) == [11, 12]
    free = Generator(model, greedy(max_new_tokens=4), frozenset())
    assert list(free.stream([10], make_rng(0))) == [11, 12, 3, 13]


@pytest.fixture(scope="module")
def tokenizer(qa_documents):
    return train_tokenizer(qa_documents, TokenizerConfig(vocab_size=300), progress=False)


def test_stop_ids_are_the_stop_token_and_a_new_question(tokenizer):
    end, question = tokenizer.token_to_id(END), tokenizer.token_to_id(QUESTION)
    assert stop_ids_for(tokenizer, END) == {end, question}
    assert stop_ids_for(tokenizer, "no such token") == {question}


class ScriptedGenerator:
    """Stands in for ``Generator``: streams fixed ids whatever the prompt."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def stream(self, prompt_ids: list[int], rng: torch.Generator) -> Iterator[int]:
        yield from self.ids


def char_ids(tokenizer, text: str) -> list[int]:
    """One token per character, so that every character arrives as its own stream piece."""
    return [i for char in text for i in tokenizer.encode(char).ids]


def test_a_stop_text_is_cut_across_stream_pieces_and_never_printed(tokenizer):
    text = "Rest well. ST is not it; STOP ends it. More text."
    pieces = list(
        stream_text(
            ScriptedGenerator(char_ids(tokenizer, text)),
            tokenizer,
            "q",
            make_rng(0),
            stop="STOP",
        )
    )
    assert "".join(pieces) == "Rest well. ST is not it; "
    assert len(pieces) > 10  # streamed, not printed in one piece at the end


def test_several_stop_texts_end_at_the_first_one_reached(tokenizer):
    text = "Rest well. Drink. Sleep. More text."
    ids = char_ids(tokenizer, text)
    for stops, expected in [
        (["Sleep", "Drink"], "Rest well. "),
        (["XYZ", "Sleep"], "Rest well. Drink. "),
        ([], text),
    ]:
        pieces = list(stream_text(ScriptedGenerator(ids), tokenizer, "q", make_rng(0), stop=stops))
        assert "".join(pieces) == expected, stops


def test_special_tokens_are_not_printed(tokenizer):
    ids = [*char_ids(tokenizer, "Rest"), tokenizer.token_to_id(ANSWER), *char_ids(tokenizer, ".")]
    pieces = stream_text(ScriptedGenerator(ids), tokenizer, "q", make_rng(0), stop=END)
    assert "".join(pieces) == "Rest."


def test_prompt_template_and_empty_prompts():
    assert prompt_text("Why?", raw=False) == f"{QUESTION}Why?{ANSWER}"
    assert prompt_text("Why?", raw=True) == "Why?"
    for empty in ("", "  \n"):
        with pytest.raises(FraglmError, match="prompt is empty"):
            prompt_text(empty, raw=False)


# the command line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer) -> Path:
    """A run directory (config, tokenizer, best and latest checkpoints) of an untrained
    tiny model: the CLI only needs something to load."""
    root = tmp_path_factory.mktemp("gen-run")
    tokenizer_path = root / "tokenizer.json"
    tokenizer.save(str(tokenizer_path))
    cfg = load_config(
        REPO_ROOT / "configs" / "tiny.yaml",
        [
            f"train.out_dir={json.dumps(str(root / 'run'))}",
            f"data.tokenized_dir={json.dumps(str(root / 'tokenized'))}",
        ],
    )
    run = Path(cfg.train.out_dir)
    layout.write_run_files(run, cfg, tokenizer_path)
    torch.manual_seed(0)
    model = Transformer(cfg.model, vocab_size(tokenizer))
    ckpt.save_checkpoint(run, model, {"step": 1}, step=1, pointers=("latest", "best"))
    return run


def expected_answers(run: Path, prompts: list[str], seed: int, **sample) -> list[str]:
    """What the library produces for ``prompts`` in sequence with one seeded RNG."""
    loaded = load_run(run, device="cpu")
    params = SampleConfig(**{**loaded.cfg.sample.__dict__, **sample})
    gen = Generator(loaded.model, params, stop_ids_for(loaded.tokenizer, params.stop))
    rng = make_rng(seed)
    return [
        "".join(stream_text(gen, loaded.tokenizer, prompt_text(p, raw=False), rng, stop=END))
        for p in prompts
    ]


SAMPLING = ("--seed", 3, "--max-new-tokens", 12, "--temperature", 1.0)


def test_generate_prints_only_the_answer(run_cli, run_dir):
    result = run_cli("generate", "What is a cold?", "--run", run_dir, *SAMPLING)
    assert result.exit_code == 0, result.stderr
    [answer] = expected_answers(run_dir, ["What is a cold?"], 3, max_new_tokens=12, temperature=1.0)
    assert result.stdout == answer + "\n"
    assert "<|" not in result.stdout


def test_generate_num_samples(run_cli, run_dir):
    result = run_cli("generate", "What is a cold?", "--run", run_dir, "--num-samples", 2, *SAMPLING)
    assert result.exit_code == 0, result.stderr
    answers = expected_answers(
        run_dir, ["What is a cold?"] * 2, 3, max_new_tokens=12, temperature=1.0
    )
    assert result.stdout == "".join(
        f"--- sample {i + 1}\n{answer}\n" for i, answer in enumerate(answers)
    )


def test_prompts_file_writes_json_lines(run_cli, run_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is a cold?\n\nWhat is a fever? «é»\n", encoding="utf-8")
    result = run_cli(
        "generate", "--prompts-file", prompts, "--run", run_dir, "--num-samples", 2, *SAMPLING
    )
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    asked = ["What is a cold?", "What is a cold?", "What is a fever? «é»", "What is a fever? «é»"]
    assert [(r["prompt"], r["sample"]) for r in records] == [
        (prompt, i % 2) for i, prompt in enumerate(asked)
    ]
    expected = expected_answers(run_dir, asked, 3, max_new_tokens=12, temperature=1.0)
    assert [r["answer"] for r in records] == expected


def test_chat_answers_each_line_and_exits_on_eof(run_cli, run_dir, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is a cold?\n\nWhat is a fever?\n"))
    result = run_cli("chat", "--run", run_dir, *SAMPLING)
    assert result.exit_code == 0, result.stderr
    answers = expected_answers(
        run_dir, ["What is a cold?", "What is a fever?"], 3, max_new_tokens=12, temperature=1.0
    )
    assert result.stdout == "".join(answer + "\n" for answer in answers)


def test_chat_exits_cleanly_on_ctrl_c(run_cli, run_dir, monkeypatch):
    class Interrupted(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Interrupted())
    result = run_cli("chat", "--run", run_dir)
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", ""], "the prompt is empty"),
        (["generate", "   "], "the prompt is empty"),
        (["generate", "hi", "--temperature", "-0.5"], "sample.temperature"),
        (["generate", "hi", "--top-p", "0"], "sample.top_p"),
        (["generate", "hi", "--top-p", "1.5"], "sample.top_p"),
        (["generate", "hi", "--top-k", "-1"], "sample.top_k"),
        (["generate", "--prompts-file", "missing.txt"], "prompts file not found"),
        (["generate"], "give either a PROMPT or --prompts-file"),
        (["generate", "hi", "--checkpoint", "newest"], "--checkpoint must be best or latest"),
        (["chat", "--temperature", "-1"], "sample.temperature"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    run_cli, run_dir, tmp_path, monkeypatch, args, message
):
    monkeypatch.chdir(tmp_path)
    run_cli(*args, "--run", run_dir).assert_user_error(message)


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["eval"]])
def test_no_run_found(run_cli, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    run_cli(*command).assert_user_error("no trained run found under checkpoints/")
    (tmp_path / "checkpoints").mkdir()
    run_cli(*command).assert_user_error("no trained run found under checkpoints/")
    run_cli(*command, "--run", "nope").assert_user_error("run not found: nope")
