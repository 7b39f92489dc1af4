"""``fraglm export --format hf``: a trained run as a Hugging Face model directory.

The modern architecture is Llama's (RMSNorm, rotate-half RoPE, SwiGLU, no biases, tied
embeddings), so export renames and splits weights: the fused qkv projection into q/k/v,
the fused gate/up projection into gate/up. With ``model.qk_norm`` (an RMSNorm on each
query and key head before RoPE, which Llama cannot express) the run exports as Qwen3,
which is Llama plus exactly those norms (``q_norm``, ``k_norm``; fraglm's one shared norm
is written to both). The result loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fraglm.config import END, PAD, ModelConfig
from fraglm.errors import FraglmError
from fraglm.nn.model import Transformer
from fraglm.runs.loading import LoadedRun, load_run


def llama_config(
    m: ModelConfig, vocab_size: int, *, end_id: int | None = None, pad_id: int | None = None
) -> dict[str, Any]:
    """transformers' LlamaConfig fields for a modern fraglm model."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.mlp_hidden_size,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.context_length,
        "rms_norm_eps": m.norm_eps,
        # transformers 5 reads rope_parameters, 4.x rope_theta
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": end_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def hf_architecture(m: ModelConfig) -> str:
    """The transformers ``model_type`` that computes what ``m`` computes."""
    return "qwen3" if m.qk_norm else "llama"


def hf_config(
    m: ModelConfig, vocab_size: int, *, end_id: int | None = None, pad_id: int | None = None
) -> dict[str, Any]:
    """transformers config fields for a modern fraglm model: Llama's, or Qwen3's for
    ``model.qk_norm`` (the same fields, one attention layout for every layer)."""
    config = llama_config(m, vocab_size, end_id=end_id, pad_id=pad_id)
    if hf_architecture(m) == "qwen3":
        del config["mlp_bias"]
        config |= {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "use_sliding_window": False,
        }
    return config


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """fraglm weights under transformers' Llama (or Qwen3) names (a tied output head is
    not stored twice)."""
    m = model.cfg
    head_dim = m.head_dim
    q_size, kv_size = m.n_heads * head_dim, m.kv_heads * head_dim
    state = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.norm.weight,
    }
    if not m.tie_embeddings:
        state["lm_head.weight"] = model.head.weight
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split([q_size, kv_size, kv_size])
        gate, up = block.mlp.up.weight.chunk(2)
        state |= {
            prefix + "input_layernorm.weight": block.attn_norm.weight,
            prefix + "self_attn.q_proj.weight": q,
            prefix + "self_attn.k_proj.weight": k,
            prefix + "self_attn.v_proj.weight": v,
            prefix + "self_attn.o_proj.weight": block.attn.out.weight,
            prefix + "post_attention_layernorm.weight": block.mlp_norm.weight,
            prefix + "mlp.gate_proj.weight": gate,
            prefix + "mlp.up_proj.weight": up,
            prefix + "mlp.down_proj.weight": block.mlp.down.weight,
        }
        if block.attn.qk_norm is not None:
            state[prefix + "self_attn.q_norm.weight"] = block.attn.qk_norm.weight
            state[prefix + "self_attn.k_norm.weight"] = block.attn.qk_norm.weight
    return {name: t.detach().to(torch.float32).contiguous().clone() for name, t in state.items()}


def to_hf(model: Transformer) -> Any:
    """An in-memory transformers Llama (Qwen3 with QK-norm) with ``model``'s weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = hf_config(model.cfg, model.vocab_size)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf = AutoModelForCausalLM.from_config(config)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if model.cfg.tie_embeddings else set()):
        raise RuntimeError(f"weight mapping is off: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.to(next(model.parameters()).device).eval()


def load_exportable_run(run: str | Path | None, *, which: str, target: str) -> LoadedRun:
    """A run on the CPU whose model has Llama's layout (``model.arch = 'modern'``), for
    export to ``target``; the seed architecture is refused in one line."""
    loaded = load_run(run, which=which, device="cpu")
    if loaded.cfg.model.arch != "modern":
        raise FraglmError(
            f"export to {target} supports model.arch = 'modern' (Llama layout); "
            f"{loaded.run_dir} uses '{loaded.cfg.model.arch}' (learned positions, LayerNorm, GELU)"
        )
    return loaded


def export_hf(run: str | Path | None, out: Path, *, which: str = "best") -> Path:
    """Write a Hugging Face model directory for a run; returns ``out``."""
    loaded = load_exportable_run(run, which=which, target="Hugging Face")
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise FraglmError('export needs transformers: pip install -e ".[hf]"') from None
    tokenizer = loaded.tokenizer
    end_id, pad_id = tokenizer.token_to_id(END), tokenizer.token_to_id(PAD)
    vocab = loaded.model.vocab_size
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = hf_config(loaded.cfg.model, vocab, end_id=end_id, pad_id=pad_id)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"eos_token_id": end_id, "pad_token_id": pad_id}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(
        hf_state_dict(loaded.model), str(tmp / "model.safetensors"), metadata={"format": "pt"}
    )
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END,
        pad_token=PAD,
        model_max_length=config["max_position_embeddings"],
    )
    hf_tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
