"""Export: the Hugging Face directory and the GGUF file compute what fraglm computes."""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fraglm.config import END, PAD, SPECIAL_TOKENS, SampleConfig
from fraglm.data.chat_template import CHAT_TEMPLATE, chat_prompt
from fraglm.data.tokenizer import load_tokenizer
from fraglm.export.gguf import (
    GGUF_DTYPES,
    export_gguf,
    gguf_tensors,
    interleave_rope_rows,
    write_gguf,
)
from fraglm.export.hf import export_hf
from fraglm.inference.generate import Generator, make_rng
from fraglm.nn.layers import RotaryEmbedding, apply_rope
from fraglm.runs.loading import load_run

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


# arbitrary Unicode with the special tokens glued in anywhere
TEXT_WITH_SPECIALS = st.lists(
    st.one_of(st.text(max_size=16), st.sampled_from(SPECIAL_TOKENS)), max_size=6
).map("".join)
TOKENIZER_SAMPLE = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def seed_run(train_tiny_run, tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("seed"), "model.arch=seed")


@pytest.fixture(scope="module")
def exported(train_tiny_run, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("export")
    # grouped-query attention and a RoPE base of its own
    run_dir = train_tiny_run(tmp, "model.n_kv_heads=2", "model.rope_theta=500.0")
    return run_dir, export_hf(run_dir, tmp / "hf")


def test_exported_logits_match(exported):
    run_dir, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    run = load_run(run_dir, device="cpu")
    text = "<|Q|>I have a headache and a fever<|A|>Rest and drink water."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == run.tokenizer.encode(text).ids
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, run.model(ids), rtol=0, atol=1e-4)


def test_exported_greedy_generation_matches(exported):
    run_dir, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    run = load_run(run_dir, device="cpu")
    prompt = run.tokenizer.encode("<|Q|>How do I sleep better?<|A|>").ids
    ours = Generator(run.model, SampleConfig(temperature=0, max_new_tokens=24), frozenset())
    expected = list(ours.stream(prompt, make_rng(0)))
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None)
    assert got[0, len(prompt) :].tolist() == expected


def test_cli_export_writes_a_loadable_directory(exported, run_cli, tmp_path):
    run_dir, _ = exported
    result = run_cli("export", "--run", run_dir, "--out", tmp_path / "hf")
    assert result.exit_code == 0, result.stderr
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").model_type == "llama"


def test_seed_architecture_refuses_export(seed_run, tmp_path, run_cli):
    run_cli("export", "--run", seed_run, "--out", tmp_path / "hf").assert_user_error(
        "supports model.arch = 'modern'"
    )
    assert not (tmp_path / "hf").exists()


def test_untied_embeddings_export_their_output_head(train_tiny_run, tmp_path):
    run_dir = train_tiny_run(tmp_path, "model.tie_embeddings=false", "model.zero_init_out=true")
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run_dir, tmp_path / "hf"))
    run = load_run(run_dir, device="cpu")
    assert not hf.config.tie_word_embeddings
    ids = torch.tensor([run.tokenizer.encode("<|Q|>Is water good for me?<|A|>").ids])
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, run.model(ids), rtol=0, atol=1e-4)
    assert torch.equal(gguf_tensors(run.model)["output.weight"], run.model.head.weight)


@pytest.fixture(scope="module")
def qk_norm_run(train_tiny_run, tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("qknorm"), "model.qk_norm=true")


@pytest.fixture(scope="module")
def qk_norm_model(qk_norm_run):
    """The QK-norm run (as p100.yaml trains) with its gains moved well off 1, so that a
    norm left out, or applied after RoPE, changes the logits."""
    run = load_run(qk_norm_run, device="cpu")
    with torch.no_grad():
        for i, block in enumerate(run.model.blocks):
            gain = block.attn.qk_norm.weight
            gain.copy_(torch.linspace(0.5, 1.5 + i, gain.numel()))
    return run


QK_TEXT = "<|Q|>Why does my knee hurt?<|A|>Rest it."


def test_qk_norm_run_exports_as_qwen3(qk_norm_run, run_cli, tmp_path):
    result = run_cli("export", "--run", qk_norm_run, "--out", tmp_path / "hf")
    assert result.exit_code == 0, result.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.model_type == "qwen3"
    run = load_run(qk_norm_run, device="cpu")
    ids = torch.tensor([run.tokenizer.encode(QK_TEXT).ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, run.model(ids), rtol=0, atol=1e-4)


def test_qwen3_export_applies_the_query_and_key_norms(qk_norm_model):
    from fraglm.export.hf import to_hf

    ids = torch.tensor([qk_norm_model.tokenizer.encode(QK_TEXT).ids])
    with torch.no_grad():
        torch.testing.assert_close(
            to_hf(qk_norm_model.model)(ids).logits, qk_norm_model.model(ids), rtol=0, atol=1e-4
        )


@pytest.fixture(scope="module")
def qwen3_gguf(qk_norm_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qwen3") / "model.gguf"
    with torch.no_grad():
        return write_gguf(qk_norm_model.model, qk_norm_model.tokenizer, path)


def test_qk_norm_gguf_is_qwen3_and_computes_what_fraglm_computes(qk_norm_model, qwen3_gguf):
    reader = gguf.GGUFReader(qwen3_gguf)
    assert _field(reader, "general.architecture") == "qwen3"
    model = qk_norm_model.model
    names = {t.name for t in reader.tensors}
    layers = range(model.cfg.n_layers)
    assert {f"blk.{i}.attn_{qk}_norm.weight" for i in layers for qk in "qk"} <= names
    # llama.cpp's qwen3 rotates halves, as fraglm does: query rows stay in fraglm's order
    q_rows = model.cfg.d_model
    assert torch.equal(
        gguf_tensors(model)["blk.0.attn_q.weight"], model.blocks[0].attn.qkv.weight[:q_rows]
    )
    head_dim = model.cfg.head_dim
    assert _field(reader, "qwen3.attention.key_length") == head_dim
    gain = next(t for t in reader.tensors if t.name == "blk.1.attn_k_norm.weight")
    assert torch.equal(torch.from_numpy(gain.data.copy()), model.blocks[1].attn.qk_norm.weight)
    # the logits are checked in llama.cpp itself (test_llama_cpp_runs_the_qwen3_file):
    # transformers reads Qwen3 GGUF files with head size 128 whatever the file says


def test_unknown_format_is_an_error(exported, run_cli, tmp_path):
    run_dir, _ = exported
    result = run_cli("export", "--run", run_dir, "--format", "onnx", "--out", tmp_path / "x")
    result.assert_user_error("--format must be hf or gguf")


def test_missing_hf_extra_gives_an_install_hint(exported, run_cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    run_dir, _ = exported
    result = run_cli("export", "--run", run_dir, "--out", tmp_path / "hf")
    result.assert_user_error('pip install -e ".[hf]"')


def test_training_gradients_match_transformers():
    """The training loss (the head a chunk at a time) gives the gradients that autograd
    gives through transformers' Llama with the same weights."""
    from fraglm.config import ModelConfig
    from fraglm.export.hf import hf_state_dict, to_hf
    from fraglm.nn.loss import TokenLoss
    from fraglm.nn.model import Transformer

    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, context_length=16)
    torch.manual_seed(0)
    model = Transformer(cfg, 64)
    for norm in (model.norm, *(m for b in model.blocks for m in (b.attn_norm, b.mlp_norm))):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    hf = to_hf(model).train()
    tokens = torch.randint(0, 64, (3, 17))
    TokenLoss(model)(tokens[:, :-1], tokens[:, 1:]).backward()
    logits = hf(input_ids=tokens[:, :-1], use_cache=False).logits
    torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"
    ).backward()

    grads = Transformer(cfg, 64)  # fraglm's gradients in a model's shape, renamed to Llama's
    grads.load_state_dict({name: p.grad for name, p in model.named_parameters()}, strict=False)
    expected = hf_state_dict(grads)
    for name, param in hf.named_parameters():
        torch.testing.assert_close(expected[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- GGUF (llama.cpp, Ollama) -----------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_files(exported, tmp_path_factory) -> dict[str, Path]:
    run_dir, _ = exported
    out = tmp_path_factory.mktemp("gguf")
    return {dt: export_gguf(run_dir, out / f"model-{dt}.gguf", dtype=dt) for dt in GGUF_DTYPES}


def _field(reader, key):
    field = reader.fields[key]
    return field.contents()


def test_gguf_metadata_reads_back(exported, gguf_files):
    run_dir, _ = exported
    run = load_run(run_dir, device="cpu")
    m = run.cfg.model
    reader = gguf.GGUFReader(gguf_files["f32"])
    expected = {
        "general.architecture": "llama",
        "llama.context_length": m.context_length,
        "llama.embedding_length": m.d_model,
        "llama.block_count": m.n_layers,
        "llama.feed_forward_length": 4 * m.d_model,
        "llama.attention.head_count": m.n_heads,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": m.d_model // m.n_heads,
        "llama.vocab_size": run.model.vocab_size,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": run.tokenizer.token_to_id(END),
        "tokenizer.ggml.padding_token_id": run.tokenizer.token_to_id(PAD),
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    for key, value in expected.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(500.0)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(m.norm_eps)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = run.tokenizer.get_vocab(with_added_tokens=True)
    assert tokens == sorted(vocab, key=vocab.get)
    types = _field(reader, "tokenizer.ggml.token_type")
    control = {tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    assert control == set(SPECIAL_TOKENS)
    merges = _field(reader, "tokenizer.ggml.merges")
    assert len(merges) == len(tokens) - 256 - len(SPECIAL_TOKENS)
    assert all(len(merge.split(" ")) == 2 for merge in merges)


@pytest.mark.parametrize(("dtype", "atol"), [("f32", 0.0), ("f16", 1e-3), ("q8_0", 2e-2)])
def test_gguf_every_tensor_reads_back(exported, gguf_files, dtype, atol):
    run_dir, _ = exported
    expected = gguf_tensors(load_run(run_dir, device="cpu").model)
    reader = gguf.GGUFReader(gguf_files[dtype])
    assert {t.name for t in reader.tensors} == set(expected)
    assert "output.weight" not in expected  # tied head: llama.cpp falls back to token_embd
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        want = expected[tensor.name]
        if want.ndim == 1 or dtype == "f32":
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, tensor.name
        got = torch.from_numpy(values.astype("float32")).reshape(want.shape)
        torch.testing.assert_close(got, want, rtol=0, atol=atol * want.abs().max().item())


def test_interleaved_rope_rows_give_llama_cpp_the_same_scores():
    """llama.cpp rotates adjacent pairs (x[2i], x[2i+1]); fraglm rotates (x[i], x[i+d/2]).
    Queries and keys from the reordered rows, rotated llama.cpp's way, give the same
    attention scores as fraglm's."""
    torch.manual_seed(0)
    heads, head_dim, d, t = 3, 8, 16, 5
    wq, wk = torch.randn(heads * head_dim, d), torch.randn(heads * head_dim, d)
    x = torch.randn(t, d)
    cos, sin = RotaryEmbedding(head_dim, 10_000.0)(torch.arange(t))

    def ours(w):
        return apply_rope((x @ w.T).view(t, heads, head_dim), cos[:, None], sin[:, None])

    def llama_cpp(w):
        pairs = (x @ w.T).view(t, heads, head_dim // 2, 2)
        c, s = cos[:, None], sin[:, None]
        even, odd = pairs[..., 0], pairs[..., 1]
        return torch.stack((even * c - odd * s, even * s + odd * c), -1).flatten(-2)

    scores = torch.einsum("qhd,khd->hqk", ours(wq), ours(wk))
    q, k = llama_cpp(interleave_rope_rows(wq, heads)), llama_cpp(interleave_rope_rows(wk, heads))
    torch.testing.assert_close(torch.einsum("qhd,khd->hqk", q, k), scores)


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_files):
    path = gguf_files["f32"]
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_gguf_loads_in_transformers_with_matching_logits(exported, gguf_files, gguf_tokenizer):
    run_dir, _ = exported
    path = gguf_files["f32"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    assert hf.config.tie_word_embeddings
    run = load_run(run_dir, device="cpu")
    text = "<|Q|>I have a headache and a fever<|A|>Rest and drink water.<|END|>"
    ids = gguf_tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == run.tokenizer.encode(text).ids
    assert gguf_tokenizer.eos_token == END
    conversation = [("user", "a"), ("assistant", "b"), ("user", "c")]
    messages = [{"role": role, "content": text} for role, text in conversation]
    templated = gguf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert templated == chat_prompt(conversation)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, run.model(ids), rtol=0, atol=1e-4)


@TOKENIZER_SAMPLE
@given(text=TEXT_WITH_SPECIALS)
def test_gguf_tokenizer_gives_fraglm_ids(exported, gguf_tokenizer, text):
    run_dir, _ = exported
    ours = load_tokenizer(run_dir / "tokenizer.json")
    assert gguf_tokenizer(text).input_ids == ours.encode(text).ids


def test_cli_exports_gguf_atomically(exported, run_cli, tmp_path):
    run_dir, _ = exported
    out = tmp_path / "model.gguf"
    out.write_bytes(b"an older file")
    result = run_cli("export", "--run", run_dir, "--format", "gguf", "--dtype", "q8_0", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert _field(gguf.GGUFReader(out), "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left


def test_seed_architecture_refuses_gguf_export(seed_run, tmp_path, run_cli):
    out = tmp_path / "model.gguf"
    run_cli("export", "--run", seed_run, "--format", "gguf", "-o", out).assert_user_error(
        "export to GGUF supports model.arch = 'modern'"
    )
    assert not out.exists()


def test_gguf_dtype_errors(exported, run_cli, tmp_path):
    run_dir, _ = exported
    out = tmp_path / "model.gguf"
    bad = run_cli("export", "--run", run_dir, "--format", "gguf", "--dtype", "q4_k", "-o", out)
    bad.assert_user_error("--dtype must be one of f32, f16, q8_0")
    hf = run_cli("export", "--run", run_dir, "--dtype", "f16", "-o", tmp_path / "hf")
    hf.assert_user_error("--dtype applies to --format gguf")
    assert not out.exists() and not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def llama_cpp_model(gguf_files):
    """The f32 file in llama.cpp itself, through the llama-cpp-python binding, with an f32
    KV cache so that its logits compare at fp32 tolerances. Skips without the binding: it
    compiles llama.cpp when installed (about half an hour on 2 cores), so CI leaves it out;
    `pip install llama-cpp-python` runs these tests."""
    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = 0  # GGML_TYPE_F32
    return llama_cpp.Llama(
        model_path=str(gguf_files["f32"]), n_ctx=64, n_threads=1, logits_all=True,
        type_k=f32, type_v=f32, verbose=False,
    )  # fmt: skip


def test_llama_cpp_computes_what_fraglm_computes(exported, llama_cpp_model):
    run = load_run(exported[0], device="cpu")
    text = "<|Q|>I have a headache and a fever<|A|>Rest and drink water."
    ids = llama_cpp_model.tokenize(text.encode(), add_bos=False, special=True)
    assert ids == run.tokenizer.encode(text).ids
    llama_cpp_model.reset()
    llama_cpp_model.eval(ids)
    logits = torch.tensor(llama_cpp_model.scores[: len(ids)], dtype=torch.float32)
    with torch.no_grad():
        expected = run.model(torch.tensor([ids]))[0]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


@TOKENIZER_SAMPLE
@given(text=TEXT_WITH_SPECIALS)
def test_llama_cpp_tokenizer_gives_fraglm_ids(exported, llama_cpp_model, text):
    ours = load_tokenizer(exported[0] / "tokenizer.json")
    got = llama_cpp_model.tokenize(text.encode(), add_bos=False, special=True) if text else []
    assert got == ours.encode(text).ids


def test_llama_cpp_runs_the_qwen3_file(qk_norm_model, qwen3_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = 0  # GGML_TYPE_F32
    llm = llama_cpp.Llama(
        model_path=str(qwen3_gguf), n_ctx=64, n_threads=1, logits_all=True,
        type_k=f32, type_v=f32, verbose=False,
    )  # fmt: skip
    ids = qk_norm_model.tokenizer.encode(QK_TEXT).ids
    llm.eval(ids)
    logits = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
    with torch.no_grad():
        expected = qk_norm_model.model(torch.tensor([ids]))[0]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
