"""Corpus -> documents -> BPE tokenizer -> token shards (``fraglm tokenize``).

Outputs, in ``data.tokenized_dir``: ``tokenizer.json``, ``train.bin`` and ``val.bin``
(flat token ids, uint16 when the vocabulary fits, else uint32) and ``meta.json``. The
directory is written under a temporary name and renamed into place, so a failure or a
kill never damages a previous result.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError
from tokenizers import Tokenizer

from fraglm.config import END, Config, DataConfig
from fraglm.data.tokenizer import load_tokenizer, train_tokenizer, vocab_size
from fraglm.errors import FraglmError, first_line
from fraglm.storage.atomic import atomic_write, fsync_dir, write_text_atomic
from fraglm.storage.locks import lock_sibling

FORMAT_VERSION = 1
LOCAL_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}
TEXT_FILES = {".json", ".jsonl", ".csv", ".txt"}
TOKENIZER_FILE, META_FILE = "tokenizer.json", "meta.json"
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


def _is_local(path: str) -> bool:
    """A path with a corpus suffix, an explicit path prefix, or an existing file is local;
    anything else (``owner/name``) is a hub dataset id."""
    return (
        Path(path).suffix.lower() in LOCAL_BUILDERS
        or path.startswith((".", "/", "~"))
        or Path(path).exists()
    )


def _check_utf8(path: Path) -> None:
    """Fail with the line number of the first byte sequence that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                line += chunk[: exc.start].count(b"\n")
                raise FraglmError(f"corpus {path} is not valid UTF-8 (line {line})") from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise FraglmError(f"corpus {path} is not valid UTF-8 (ends mid-character)") from None


def load_records(cfg: DataConfig) -> datasets.Dataset:
    """Load the corpus as a ``datasets.Dataset``, from a local file or the hub."""
    if _is_local(cfg.path):
        path = Path(cfg.path)
        if not path.is_file():
            raise FraglmError(f"corpus file not found: {path}")
        suffix = path.suffix.lower()
        if suffix not in LOCAL_BUILDERS:
            raise FraglmError(
                f"corpus {path}: unsupported file type '{suffix}' "
                f"(use {', '.join(sorted(LOCAL_BUILDERS))} or a hub dataset id)"
            )
        if suffix in TEXT_FILES:
            _check_utf8(path)
        if path.stat().st_size == 0:
            raise FraglmError(f"corpus {path} is empty")
        options: dict[str, Any] = {}
        if suffix == ".csv":
            # Mapped fields stay text exactly as written ("4", "1.50", "None", "NA"); only an
            # empty cell is missing. pandas would otherwise parse numbers and NA words.
            fields = [cfg.text_field] if cfg.text_field else [cfg.question_field, cfg.answer_field]
            options = {
                "converters": dict.fromkeys(fields, str),
                "keep_default_na": False,
                "na_values": [""],
            }
        try:
            with _quiet_datasets():
                ds = datasets.load_dataset(
                    LOCAL_BUILDERS[suffix], data_files=str(path), split="train", **options
                )
        except Exception as exc:
            if "corresponds to no data" in str(exc):  # datasets' words for zero records
                raise FraglmError(f"corpus {path} has no records") from None
            # datasets wraps the parser's own message (the useful one) in a generic error
            while isinstance(exc, DatasetGenerationError) and exc.__cause__ is not None:
                exc = exc.__cause__
            raise FraglmError(f"corpus {path} could not be read: {first_line(exc)}") from None
    else:
        if datasets.config.HF_HUB_OFFLINE:
            raise FraglmError(
                f"hub dataset '{cfg.path}' cannot be downloaded while offline "
                "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set) and no local file has that name"
            )
        try:
            ds = datasets.load_dataset(cfg.path, split=cfg.split)
        except Exception as exc:
            raise FraglmError(
                f"hub dataset '{cfg.path}' (split '{cfg.split}') could not be loaded: "
                f"{first_line(exc)}"
            ) from None
    if cfg.max_records is not None:
        ds = ds.select(range(min(cfg.max_records, len(ds))))
    if len(ds) == 0:
        raise FraglmError(f"corpus {cfg.path} has no records")
    return ds


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No log lines and progress bars from ``datasets`` while it reads a corpus: a file it
    cannot parse would print several lines of its own before our one-line error. The
    settings are restored afterwards."""
    verbosity = datasets.logging.get_verbosity()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _column(ds: datasets.Dataset, name: str, source: str) -> list[Any]:
    if name not in ds.column_names:
        raise FraglmError(
            f"corpus {source} has no field '{name}'; its fields are: {', '.join(ds.column_names)}"
        )
    values = list(ds[name])
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise FraglmError(
                f"corpus {source}: record {index} has no text in field '{name}' (got {value!r})"
            )
    return values


def make_documents(ds: datasets.Dataset, cfg: DataConfig) -> list[str]:
    """Turn records into documents: the Q&A template, or plain text followed by ``<|END|>``."""
    if cfg.text_field is not None:
        return [text + END for text in _column(ds, cfg.text_field, cfg.path)]
    questions = _column(ds, cfg.question_field, cfg.path)
    answers = _column(ds, cfg.answer_field, cfg.path)
    return [
        cfg.template.format(question=q, answer=a) for q, a in zip(questions, answers, strict=True)
    ]


def split_documents(
    n_documents: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split by document: (train indices, val indices), each in corpus order."""
    n_val = min(round(n_documents * val_fraction), n_documents - 1)  # train is never empty
    if val_fraction > 0 and n_documents > 1:
        n_val = max(n_val, 1)
    order = np.random.default_rng(seed).permutation(n_documents)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def corpus_fingerprint(
    cfg: Config, ds: datasets.Dataset | None = None, tokenizer: Tokenizer | None = None
) -> str:
    """Hash of the corpus content and every setting that shapes the token shards (and of
    the given tokenizer, when the shards are encoded with one instead of a new one)."""
    h = hashlib.sha256()
    settings = {
        "format": FORMAT_VERSION,
        "data": {
            k: v for k, v in asdict(cfg.data).items() if k not in ("tokenized_dir", "num_proc")
        },
        "tokenizer": asdict(cfg.tokenizer),
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    if tokenizer is not None:
        h.update(tokenizer.to_str().encode())
    if _is_local(cfg.data.path):
        path = Path(cfg.data.path)
        if not path.is_file():
            raise FraglmError(f"corpus file not found: {path}")
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    else:
        ds = ds if ds is not None else load_records(cfg.data)
        h.update(ds._fingerprint.encode())
    return h.hexdigest()


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

    final = Path(cfg.data.tokenized_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    for stale in final.parent.glob(f"{glob.escape(final.name)}.tmp-*"):  # interrupted runs
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
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
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
