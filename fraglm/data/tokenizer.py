"""Byte-level BPE tokenizer: train, save, load, and decode as a stream.

Byte-level pre-tokenizer and decoder make ``decode(encode(s)) == s`` for every UTF-8
string; the special tokens are added tokens, so each is exactly one id wherever it
appears in the text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.decoders import DecodeStream

from fraglm.config import SPECIAL_TOKENS, TokenizerConfig
from fraglm.errors import FraglmError

# the name a tokenizer is saved under, in a tokenized directory and in a run directory
TOKENIZER_FILE = "tokenizer.json"
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)


def train_tokenizer(
    texts: Iterable[str], cfg: TokenizerConfig, *, length: int | None = None, progress: bool = True
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` with the project's special tokens."""
    if cfg.vocab_size < MIN_VOCAB_SIZE:
        raise FraglmError(
            f"tokenizer.vocab_size = {cfg.vocab_size} is too small: it needs at least "
            f"{MIN_VOCAB_SIZE} ({BYTE_ALPHABET_SIZE} bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json``; a missing or unreadable file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FraglmError(f"tokenizer not found: {path} (run `fraglm tokenize` first)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise FraglmError(f"tokenizer file {path} is corrupt: {exc}") from None
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise FraglmError(f"tokenizer {path} lacks the special tokens {', '.join(missing)}")
    return tokenizer


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Id of each special token, e.g. ``{"<|END|>": 3, ...}``."""
    return {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}


def vocab_size(tokenizer: Tokenizer) -> int:
    return tokenizer.get_vocab_size(with_added_tokens=True)


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for in the text (int64, one entry per id).

    A byte-level BPE token is spelled in an alphabet of one character per byte, so its
    length is its byte count, even where it holds part of a multi-byte character (which
    decoding one token alone could not show). A special token stands for its own text
    ``<|END|>``, as the template writes it into the document.
    """
    lengths = np.zeros(vocab_size(tokenizer), dtype=np.int64)
    special = set(SPECIAL_TOKENS)
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        lengths[index] = len(token.encode("utf-8")) if token in special else len(token)
    return lengths


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """Exact text of ``ids``, special tokens included."""
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def decode_stream(
    tokenizer: Tokenizer, ids: Iterable[int], *, skip_special_tokens: bool = False
) -> Iterator[str]:
    """Yield text pieces as ``ids`` arrive; a multi-byte character appears once complete."""
    stream = DecodeStream(skip_special_tokens=skip_special_tokens)
    for token_id in ids:
        piece = stream.step(tokenizer, token_id)
        if piece:
            yield piece
