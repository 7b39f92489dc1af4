"""Sampling from a trained model with a KV cache (``fraglm generate`` and ``fraglm chat``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from fraglm.config import ANSWER, QUESTION, SampleConfig
from fraglm.data.tokenizer import decode_stream
from fraglm.errors import FraglmError
from fraglm.nn.cache import KVCache
from fraglm.nn.model import Transformer

logger = logging.getLogger(__name__)


def prompt_text(prompt: str, *, raw: bool) -> str:
    """The training template's question part, so the model answers: ``<|Q|>prompt<|A|>``."""
    if not prompt.strip():
        raise FraglmError("the prompt is empty")
    return prompt if raw else f"{QUESTION}{prompt}{ANSWER}"


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style penalty on the tokens marked in the boolean mask ``seen`` (vocab,):
    positive logits shrink, negative ones grow."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def next_token(
    logits: torch.Tensor, params: SampleConfig, seen: torch.Tensor, generator: torch.Generator
) -> int:
    """Pick the next id from one position's logits (vocab,); ``seen`` marks the ids so far."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature  # a new tensor: the masking below may be in place
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits[logits < kth] = -float("inf")
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token once the more likely ones already hold top_p of the mass
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        logits[order[drop]] = -float("inf")
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class Generator:
    """Streams token ids for a prompt; with ``use_cache`` each new token costs one position.

    When prompt and output outgrow the context, the cached path restarts the cache from
    the last half context of tokens (one recomputation every ``context / 2`` tokens)
    and the uncached path keeps the last ``context`` tokens; either way with a warning in
    the log.
    """

    model: Transformer
    params: SampleConfig
    stop_ids: frozenset[int]
    use_cache: bool = True

    def __post_init__(self) -> None:
        self.context = self.model.cfg.context_length
        self.device = next(self.model.parameters()).device
        self._cache: KVCache | None = None

    def _window_logits(self, ids: list[int]) -> torch.Tensor:
        window = torch.tensor([ids[-self.context :]], device=self.device)
        return self.model(window, last_only=True)[0, -1]

    def _cached_logits(self, ids: list[int], new: int) -> torch.Tensor:
        """Feed the last ``new`` ids through the cache, refilling it when it is full."""
        cache = self._cache
        if cache is None:
            dtype = next(self.model.parameters()).dtype
            cache = self._cache = KVCache(self.model.cfg, 1, device=self.device, dtype=dtype)
        if cache.length + new > cache.max_len:
            cache.reset()
            new = min(len(ids), max(self.context // 2, 1))
        fresh = torch.tensor([ids[-new:]], device=self.device)
        return self.model(fresh, cache=cache, last_only=True)[0, -1]

    @torch.no_grad()
    def stream(self, prompt_ids: list[int], generator: torch.Generator) -> Iterator[int]:
        if not prompt_ids:
            raise FraglmError("the prompt encodes to no tokens")
        ids = list(prompt_ids)
        if len(ids) > self.context:
            logger.warning("note: prompt is %d tokens; keeping the last %d", len(ids), self.context)
            ids = ids[-self.context :]
        if self._cache is not None:
            self._cache.reset()
        # The ids of prompt and answer so far, as a mask on the device (repetition penalty).
        seen = torch.zeros(self.model.vocab_size, dtype=torch.bool, device=self.device)
        seen[torch.tensor(ids, device=self.device)] = True
        pending = len(ids)
        for _ in range(self.params.max_new_tokens):
            if len(ids) == self.context + 1:  # the first step that does not fit
                keep = max(self.context // 2, 1) if self.use_cache else self.context
                logger.warning(
                    "note: context of %d tokens is full; continuing with the last %d",
                    self.context,
                    keep,
                )
            if self.use_cache:
                logits = self._cached_logits(ids, pending)
            else:
                logits = self._window_logits(ids)
            token = next_token(logits, self.params, seen, generator)
            if token in self.stop_ids:
                return
            ids.append(token)
            seen[token] = True
            pending = 1
            yield token


def stop_ids_for(tokenizer: Tokenizer, stop: str) -> frozenset[int]:
    """The ids that end generation: the stop text when it is one token, and ``<|Q|>``
    (a model that starts a new question has finished its answer)."""
    candidates = (tokenizer.token_to_id(stop), tokenizer.token_to_id(QUESTION))
    return frozenset(i for i in candidates if i is not None)


def stream_text(
    generator: Generator,
    tokenizer: Tokenizer,
    prompt: str,
    rng: torch.Generator,
    *,
    stop: str | Sequence[str],
) -> Iterator[str]:
    """Decoded answer text as it is produced, special tokens left out; ends at the first
    ``stop`` text (one or several; not printed)."""
    stops = [s for s in ((stop,) if isinstance(stop, str) else stop) if s]
    ids = generator.stream(tokenizer.encode(prompt).ids, rng)
    held = ""
    for piece in decode_stream(tokenizer, ids, skip_special_tokens=True):
        held += piece
        found = [held.index(s) for s in stops if s in held]
        if found:
            yield held[: min(found)]
            return
        keep = max((_partial_stop_suffix(held, s) for s in stops), default=0)
        if len(held) > keep:
            yield held[: len(held) - keep]
            held = held[len(held) - keep :]
    if held:
        yield held


def _partial_stop_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that could begin ``stop``."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


def make_rng(seed: int | None) -> torch.Generator:
    rng = torch.Generator()
    if seed is None:
        rng.seed()
    else:
        rng.manual_seed(seed)
    return rng
