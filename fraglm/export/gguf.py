"""``fraglm export --format gguf``: a trained run as one GGUF file for llama.cpp and Ollama.

The file is written with the ``gguf`` package (llama.cpp's own writer), not with
llama.cpp's converter, which refuses BPE tokenizers it does not know by hash. It holds:

- architecture ``llama``, or ``qwen3`` for ``model.qk_norm`` (llama.cpp's Qwen3 is Llama
  with an RMSNorm on each query and key head before RoPE, as fraglm's QK-norm);
- its metadata: context, widths, heads, kv heads, head size, RoPE dimension and base, RMS
  eps;
- the weights under llama.cpp's names (from :func:`fraglm.export.hf.hf_state_dict`); a
  tied head has no ``output.weight`` (llama.cpp and transformers then use the token
  embedding as the output head), an untied one (``model.tie_embeddings: false``) has;
- for ``llama``, query and key rows reordered for llama.cpp's RoPE (see
  :func:`interleave_rope_rows`); its ``qwen3`` rotates halves as fraglm does;
- the tokenizer as a ``gpt2`` (byte-level BPE) model with pre-tokenizer ``gpt-2``, whose
  split regex is the one of our ``ByteLevel`` pre-tokenizer; vocabulary, merges, the
  special tokens as control tokens, end of sequence ``<|END|>``, and the chat template of
  :mod:`fraglm.data.chat_template`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import Tokenizer

from fraglm.config import END, PAD, SPECIAL_TOKENS, ModelConfig
from fraglm.data.chat_template import CHAT_TEMPLATE
from fraglm.errors import FraglmError
from fraglm.export.hf import hf_architecture, hf_state_dict, load_exportable_run
from fraglm.nn.model import Transformer

if TYPE_CHECKING:
    import gguf

GGUF_DTYPES = ("f32", "f16", "q8_0")

# transformers' Llama/Qwen3 name (after "model.layers.N.") -> llama.cpp's tensor kind
_LAYER_TENSORS = {
    "input_layernorm": "ATTN_NORM",
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.q_norm": "ATTN_Q_NORM",
    "self_attn.k_norm": "ATTN_K_NORM",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "post_attention_layernorm": "FFN_NORM",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}


def interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder a query or key projection (n_heads * head_dim, d) for llama.cpp's RoPE.

    fraglm (like transformers' Llama) rotates the pair (x[i], x[i + head_dim/2]) of each
    head by angle_i; llama.cpp rotates the adjacent pair (x[2i], x[2i + 1]). Putting row
    i of a head at 2i and row i + head_dim/2 at 2i + 1 makes llama.cpp rotate the same
    pairs by the same angles, so attention scores (and outputs) are unchanged.
    """
    rows, d = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, d).transpose(1, 2).reshape(rows, d)


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """``model``'s weights under llama.cpp's names, queries and keys in the RoPE layout of
    its architecture (:func:`fraglm.export.hf.hf_architecture`)."""
    import gguf

    names = gguf.TENSOR_NAMES
    kinds = gguf.MODEL_TENSOR
    interleave = hf_architecture(model.cfg) == "llama"
    tensors = {}
    for name, tensor in hf_state_dict(model).items():
        if name == "model.embed_tokens.weight":
            tensors[names[kinds.TOKEN_EMBD] + ".weight"] = tensor
            continue
        if name == "model.norm.weight":
            tensors[names[kinds.OUTPUT_NORM] + ".weight"] = tensor
            continue
        if name == "lm_head.weight":
            tensors[names[kinds.OUTPUT] + ".weight"] = tensor
            continue
        layer, part = name.removeprefix("model.layers.").split(".", 1)
        kind = _LAYER_TENSORS[part.removesuffix(".weight")]
        if kind == "ATTN_Q" and interleave:
            tensor = interleave_rope_rows(tensor, model.cfg.n_heads)
        elif kind == "ATTN_K" and interleave:
            tensor = interleave_rope_rows(tensor, model.cfg.kv_heads)
        tensors[names[kinds[kind]].format(bid=int(layer)) + ".weight"] = tensor
    return tensors


def _tensor_data(tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, object | None]:
    """The array to store and its GGML type (``None``: the array's own dtype).

    Norm weights (1-D) stay f32, as llama.cpp's converter keeps them; a matrix whose rows
    do not split into q8_0's 32-value blocks is stored as f16.
    """
    import gguf

    array = tensor.numpy()
    if array.ndim == 1 or dtype == "f32":
        return array.astype(np.float32), None
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if dtype == "q8_0" and array.shape[-1] % block == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array.astype(np.float32), q8), q8
    return array.astype(np.float16), None


def _tokenizer_tables(tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id (in the byte-level alphabet, as tokenizer.json spells them), their
    llama.cpp token types, and the merges as ``"left right"`` strings."""
    import gguf

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise FraglmError("the tokenizer's ids are not contiguous; GGUF needs ids 0..n-1")
    tokens = [token for token, _ in by_id]
    types = [
        gguf.TokenType.CONTROL if token in SPECIAL_TOKENS else gguf.TokenType.NORMAL
        for token in tokens
    ]
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, [int(t) for t in types], merges


def _add_model_metadata(writer: gguf.GGUFWriter, model: Transformer, dtype: str, name: str) -> None:
    """The model's name, file type and shape under llama.cpp's keys."""
    import gguf

    m: ModelConfig = model.cfg
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_name(name or "fraglm")
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(model.vocab_size)
    writer.add_context_length(m.context_length)
    writer.add_embedding_length(m.d_model)
    writer.add_block_count(m.n_layers)
    writer.add_feed_forward_length(m.mlp_hidden_size)
    writer.add_head_count(m.n_heads)
    writer.add_head_count_kv(m.kv_heads)
    writer.add_key_length(m.head_dim)
    writer.add_value_length(m.head_dim)
    writer.add_rope_dimension_count(m.head_dim)
    writer.add_rope_freq_base(m.rope_theta)
    writer.add_layer_norm_rms_eps(m.norm_eps)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer) -> None:
    """The tokenizer as llama.cpp's ``gpt2`` model, its special ids and the chat template."""
    tokens, types, merges = _tokenizer_tables(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # Training documents follow one another as ...<|END|><|Q|>..., so <|END|> is also the
    # natural beginning of sequence; it is not added, so prompts stay as fraglm's.
    writer.add_bos_token_id(tokenizer.token_to_id(END))
    writer.add_eos_token_id(tokenizer.token_to_id(END))
    writer.add_pad_token_id(tokenizer.token_to_id(PAD))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def write_gguf(
    model: Transformer, tokenizer: Tokenizer, out: Path, *, dtype: str = "f32", name: str = ""
) -> Path:
    """Write ``model`` and ``tokenizer`` as one GGUF file at ``out`` (atomically)."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise FraglmError(f"--dtype must be one of {', '.join(GGUF_DTYPES)}, not {dtype!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, hf_architecture(model.cfg))
    try:
        _add_model_metadata(writer, model, dtype, name)
        _add_tokenizer(writer, tokenizer)
        for tensor_name, tensor in gguf_tensors(model).items():
            data, raw_dtype = _tensor_data(tensor, dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, out)
    return out


def export_gguf(
    run: str | Path | None, out: Path, *, which: str = "best", dtype: str = "f32"
) -> Path:
    """Write a run as a GGUF file for llama.cpp and Ollama; returns ``out``."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise FraglmError('export to GGUF needs gguf: pip install -e ".[gguf]"') from None
    loaded = load_exportable_run(run, which=which, target="GGUF")
    with torch.no_grad():
        return write_gguf(
            loaded.model, loaded.tokenizer, out, dtype=dtype, name=loaded.run_dir.name
        )
