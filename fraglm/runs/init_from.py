"""``train.init_from``: a new run that starts from another run's weights and tokenizer.

Pretrain on a large corpus, then fine-tune on a small one (e.g. ``train.loss_on: answer``
on a Q&A set): the new run loads the parent's best weights into a model of the same
shape and encodes its corpus with the parent's tokenizer, so every token id means what
it meant to the parent.
"""

from __future__ import annotations

from pathlib import Path

from fraglm.config import Config
from fraglm.errors import FraglmError
from fraglm.runs.layout import load_run_config
from fraglm.runs.loading import find_run

# model keys that decide the parameters' shapes (dropout, the attention backend and, with
# RoPE, the context length may change between parent and child)
SHAPE_KEYS = ("arch", "n_layers", "d_model", "n_heads", "n_kv_heads", "mlp_hidden", "qk_norm",
              "tie_embeddings")  # fmt: skip


def parent_run(cfg: Config) -> Path | None:
    """The run named by ``train.init_from``, checked to fit ``cfg``; None without one."""
    if cfg.train.init_from is None:
        return None
    parent = find_run(cfg.train.init_from)
    saved = load_run_config(parent)
    keys = SHAPE_KEYS + (("context_length",) if cfg.model.arch == "seed" else ())
    checks = [("model", key) for key in keys]
    checks += [("tokenizer", key) for key in saved.tokenizer.__dict__]
    for section, key in checks:
        old, new = getattr(getattr(saved, section), key), getattr(getattr(cfg, section), key)
        if old != new:
            raise FraglmError(
                f"cannot initialise from {parent}: {section}.{key} is {old!r} there but "
                f"{new!r} in the config"
            )
    return parent
