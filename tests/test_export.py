"""Hugging Face export: the exported Llama model computes what fraglm computes."""

import sys
from pathlib import Path

import pytest
import torch

from fraglm.config import SampleConfig, load_config
from fraglm.export import export_hf
from fraglm.generate import Generator, make_rng
from fraglm.run import load_run
from fraglm.train import train

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def _trained(tmp_path: Path, *overrides: str) -> Path:
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        [
            f"data.path={ROOT / 'data/sample_health_qa.jsonl'}",
            f"data.tokenized_dir={tmp_path / 'tokens'}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.max_steps=12",
            "logging.progress=false",
            *overrides,
        ],
    )
    return train(cfg).run_dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("export")
    run_dir = _trained(tmp, "model.n_kv_heads=2", "model.rope_theta=500.0")  # GQA, own RoPE base
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


def test_seed_architecture_refuses_export(tmp_path, run_cli):
    run_dir = _trained(tmp_path, "model.arch=seed")
    run_cli("export", "--run", run_dir, "--out", tmp_path / "hf").assert_user_error(
        "supports model.arch = 'modern'"
    )
    assert not (tmp_path / "hf").exists()


def test_untied_embeddings_export_their_output_head(tmp_path):
    run_dir = _trained(tmp_path, "model.tie_embeddings=false", "model.zero_init_out=true")
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run_dir, tmp_path / "hf"))
    run = load_run(run_dir, device="cpu")
    assert not hf.config.tie_word_embeddings
    ids = torch.tensor([run.tokenizer.encode("<|Q|>Is water good for me?<|A|>").ids])
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, run.model(ids), rtol=0, atol=1e-4)


def test_qk_norm_refuses_export(tmp_path, run_cli):
    run_dir = _trained(tmp_path, "model.qk_norm=true")
    run_cli("export", "--run", run_dir, "--out", tmp_path / "hf").assert_user_error(
        "cannot express model.qk_norm"
    )
    assert not (tmp_path / "hf").exists()


def test_unknown_format_is_an_error(exported, run_cli, tmp_path):
    run_dir, _ = exported
    result = run_cli("export", "--run", run_dir, "--format", "gguf", "--out", tmp_path / "x")
    result.assert_user_error("--format must be hf")


def test_missing_hf_extra_gives_an_install_hint(exported, run_cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    run_dir, _ = exported
    result = run_cli("export", "--run", run_dir, "--out", tmp_path / "hf")
    result.assert_user_error('pip install -e ".[hf]"')


def test_training_gradients_match_transformers():
    """The hand-written backward passes (fused loss, RMSNorm, SwiGLU) give the gradients
    that autograd gives through transformers' Llama with the same weights."""
    from fraglm.config import ModelConfig
    from fraglm.export import llama_state_dict, to_hf_llama
    from fraglm.model import Transformer

    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, context_length=16)
    torch.manual_seed(0)
    model = Transformer(cfg, 64)
    for norm in (model.norm, *(m for b in model.blocks for m in (b.attn_norm, b.mlp_norm))):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    hf = to_hf_llama(model).train()
    tokens = torch.randint(0, 64, (3, 17))
    model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    logits = hf(input_ids=tokens[:, :-1], use_cache=False).logits
    torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"
    ).backward()

    grads = Transformer(cfg, 64)  # fraglm's gradients in a model's shape, renamed to Llama's
    grads.load_state_dict({name: p.grad for name, p in model.named_parameters()}, strict=False)
    expected = llama_state_dict(grads)
    for name, param in hf.named_parameters():
        torch.testing.assert_close(expected[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
