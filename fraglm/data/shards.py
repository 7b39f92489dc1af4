"""Documents -> BPE tokenizer -> token shards (``fraglm tokenize``), and reading them back.

Outputs, in ``data.tokenized_dir``: ``tokenizer.json``, ``train.bin`` and ``val.bin``
(flat token ids, uint16 when the vocabulary fits, else uint32) and ``meta.json``. The
directory is written under a temporary name and renamed into place, so a failure or a
kill never damages a previous result.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tokenizers import Tokenizer

from fraglm.config import Config
from fraglm.data.corpus import corpus_fingerprint, load_records, make_documents, split_documents
from fraglm.data.tokenizer import TOKENIZER_FILE, load_tokenizer, train_tokenizer, vocab_size
from fraglm.errors import FraglmError
from fraglm.storage.atomic import atomic_write, fsync_dir, write_text_atomic
from fraglm.storage.locks import lock_sibling

META_FILE = "meta.json"
SPLITS = ("train", "val")


@dataclass
class TokenizeSummary:
    documents: int
    characters: int
    tokens: int
    train_tokens: int
    val_tokens: int
    seconds: float

    @property
    def chars_per_token(self) -> float:
        return self.characters / max(self.tokens, 1)

    def describe(self) -> str:
        return (
            f"{self.documents:,} documents, {self.characters:,} characters, {self.tokens:,} tokens "
            f"(train {self.train_tokens:,}, val {self.val_tokens:,}), "
            f"{self.chars_per_token:.2f} characters/token, {self.seconds:.1f} s"
        )


def _token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if n_vocab <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _encode(documents: list[str], tokenizer: Tokenizer, num_proc: int) -> list[np.ndarray]:
    """Encode documents in parallel with ``datasets.map``; returns one id array per document."""
    ds = datasets.Dataset.from_dict({"text": documents})

    def encode_batch(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return {"ids": [enc.ids for enc in tokenizer.encode_batch(batch["text"])]}

    encoded = ds.map(
        encode_batch,
        batched=True,
        batch_size=256,
        num_proc=min(num_proc, max(1, len(documents) // 256)),
        remove_columns=["text"],
        desc="encoding",
        keep_in_memory=True,
    )
    ids = encoded.data.column("ids").combine_chunks()
    flat = ids.flatten().to_numpy(zero_copy_only=False)
    offsets = ids.offsets.to_numpy()
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(documents))]


def _write_tokens(path: Path, pieces: list[np.ndarray], dtype: np.dtype) -> int:
    # fh.write, not ndarray.tofile: tofile does not report a short write (a full disk)
    with atomic_write(path) as fh:
        for piece in pieces:
            fh.write(piece.astype(dtype, copy=False).tobytes())
    return sum(len(p) for p in pieces)


@contextlib.contextmanager
def _staged_dir(final: Path) -> Iterator[Path]:
    """A fresh directory beside ``final`` to write into: it replaces ``final`` when the
    block succeeds and is removed when it fails (an error, a full disk, Ctrl-C)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    for stale in final.parent.glob(f"{glob.escape(final.name)}.tmp-*"):  # interrupted runs
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` survives until the new one is in place."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def tokenize(
    cfg: Config, *, progress: bool = True, tokenizer: Tokenizer | None = None
) -> TokenizeSummary:
    """Train the tokenizer (or use ``tokenizer``: a run initialised from another run's
    weights keeps its vocabulary) and write the token shards; see the module docstring.
    One process at a time per ``data.tokenized_dir`` (a lock beside it)."""
    with lock_sibling(Path(cfg.data.tokenized_dir), "tokenized data"):
        return _tokenize(cfg, progress=progress, tokenizer=tokenizer)


def _tokenize(cfg: Config, *, progress: bool, tokenizer: Tokenizer | None) -> TokenizeSummary:
    start = time.perf_counter()
    ds = load_records(cfg.data)
    documents = make_documents(ds, cfg.data)
    characters = sum(len(d) for d in documents)
    train_idx, val_idx = split_documents(len(documents), cfg.data.val_fraction, cfg.data.split_seed)
    train_docs = [documents[i] for i in train_idx]
    given = tokenizer
    if tokenizer is None:
        tokenizer = train_tokenizer(
            train_docs, cfg.tokenizer, length=len(train_docs), progress=progress
        )
    encoded = _encode(documents, tokenizer, cfg.data.num_proc)
    n_vocab = vocab_size(tokenizer)
    dtype = _token_dtype(n_vocab)

    with _staged_dir(Path(cfg.data.tokenized_dir)) as tmp:
        write_text_atomic(tmp / TOKENIZER_FILE, tokenizer.to_str(pretty=True))
        counts = {
            split: _write_tokens(tmp / f"{split}.bin", [encoded[i] for i in idx], dtype)
            for split, idx in zip(SPLITS, (train_idx, val_idx), strict=True)
        }
        summary = TokenizeSummary(
            documents=len(documents),
            characters=characters,
            tokens=sum(counts.values()),
            train_tokens=counts["train"],
            val_tokens=counts["val"],
            seconds=time.perf_counter() - start,
        )
        meta = {
            "fingerprint": corpus_fingerprint(cfg, ds, given),
            "corpus": cfg.data.path,
            "documents": {"train": len(train_idx), "val": len(val_idx)},
            "tokens": counts,
            "characters": characters,
            "dtype": dtype.name,
            "vocab_size": n_vocab,
            "split_seed": cfg.data.split_seed,
            "val_fraction": cfg.data.val_fraction,
            "seconds": round(summary.seconds, 2),
        }
        write_text_atomic(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")
    return summary


def read_meta(tokenized_dir: str | Path) -> dict[str, Any] | None:
    """``meta.json`` of a tokenized directory, or None when it is missing or unreadable."""
    path = Path(tokenized_dir) / META_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_up_to_date(
    cfg: Config, tokenizer: Tokenizer | None = None, *, fingerprint: str | None = None
) -> bool:
    """True when the token shards exist and were made from this corpus with these settings
    (and with ``tokenizer``, when given). ``fingerprint``: the corpus's, when the caller
    has computed it already (it reads the whole corpus)."""
    root = Path(cfg.data.tokenized_dir)
    meta = read_meta(root)
    if meta is None or not all(
        (root / f).is_file() for f in (TOKENIZER_FILE, "train.bin", "val.bin")
    ):
        return False
    return meta.get("fingerprint") == (fingerprint or corpus_fingerprint(cfg, tokenizer=tokenizer))


def ensure_tokenized(
    cfg: Config,
    *,
    progress: bool = True,
    tokenizer: Tokenizer | None = None,
    fingerprint: str | None = None,
) -> TokenizeSummary | None:
    """Run ``tokenize`` when the shards are missing or stale; None when they were current.
    ``fingerprint``: as for :func:`is_up_to_date`."""
    if is_up_to_date(cfg, tokenizer, fingerprint=fingerprint):
        return None
    return tokenize(cfg, progress=progress, tokenizer=tokenizer)


def load_tokens(tokenized_dir: str | Path, split: str) -> np.ndarray:
    """Memory-map one split's token ids."""
    root = Path(tokenized_dir)
    meta = read_meta(root)
    if meta is None:
        raise FraglmError(f"no tokenized data in {root} (run `fraglm tokenize`)")
    path = root / f"{split}.bin"
    if not path.is_file():
        raise FraglmError(f"token file missing: {path} (run `fraglm tokenize`)")
    dtype = np.dtype(meta["dtype"])
    if path.stat().st_size != meta["tokens"][split] * dtype.itemsize:
        raise FraglmError(f"token file {path} is truncated or corrupt (run `fraglm tokenize`)")
    if meta["tokens"][split] == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def load_run_tokenizer(tokenized_dir: str | Path) -> Tokenizer:
    return load_tokenizer(Path(tokenized_dir) / TOKENIZER_FILE)
