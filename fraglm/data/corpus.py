"""Corpus -> documents: read the records, template them, split them, fingerprint them.

A corpus is a local ``.jsonl``/``.json``/``.csv``/``.parquet``/``.txt`` file or a hub
dataset id. Each record becomes one document (the Q&A template, or a text field followed
by ``<|END|>``); documents are split into train and val by a seeded permutation. The
fingerprint covers the corpus and every setting that shapes the token shards
(``fraglm.data.shards``), so stale shards are noticed.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError
from tokenizers import Tokenizer

from fraglm.config import END, Config, DataConfig
from fraglm.errors import FraglmError, first_line

# version of the token shards' layout: part of the fingerprint, so a new layout re-tokenizes
FORMAT_VERSION = 1
LOCAL_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}
TEXT_FILES = {".json", ".jsonl", ".csv", ".txt"}


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
    ds = _load_local(Path(cfg.path), cfg) if _is_local(cfg.path) else _load_hub(cfg)
    if cfg.max_records is not None:
        ds = ds.select(range(min(cfg.max_records, len(ds))))
    if len(ds) == 0:
        raise FraglmError(f"corpus {cfg.path} has no records")
    return ds


def _load_local(path: Path, cfg: DataConfig) -> datasets.Dataset:
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
            return datasets.load_dataset(
                LOCAL_BUILDERS[suffix], data_files=str(path), split="train", **options
            )
    except Exception as exc:
        if "corresponds to no data" in str(exc):  # datasets' words for zero records
            raise FraglmError(f"corpus {path} has no records") from None
        # datasets wraps the parser's own message (the useful one) in a generic error
        while isinstance(exc, DatasetGenerationError) and exc.__cause__ is not None:
            exc = exc.__cause__
        raise FraglmError(f"corpus {path} could not be read: {first_line(exc)}") from None


def _load_hub(cfg: DataConfig) -> datasets.Dataset:
    if datasets.config.HF_HUB_OFFLINE:
        raise FraglmError(
            f"hub dataset '{cfg.path}' cannot be downloaded while offline "
            "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set) and no local file has that name"
        )
    try:
        return datasets.load_dataset(cfg.path, split=cfg.split)
    except Exception as exc:
        raise FraglmError(
            f"hub dataset '{cfg.path}' (split '{cfg.split}') could not be loaded: {first_line(exc)}"
        ) from None


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
