"""The model behind ``fraglm serve``: one worker thread that alone uses it.

Requests are served one at a time, in arrival order; each gets its own
:class:`~fraglm.inference.generate.Generator` and so its own KV cache. Generation is the
code of ``fraglm generate`` (:func:`~fraglm.inference.generate.stream_text`), so greedy
answers are the same text. A request whose client has gone stops at the next token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from fraglm.config import SampleConfig
from fraglm.inference.generate import Generator, make_rng, stop_ids_for, stream_text
from fraglm.runs.loading import LoadedRun


@dataclass
class Finish:
    """How a generation ended, for the last chunk and the usage numbers."""

    reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(eq=False)
class Job:
    """One request's generation: its prompt, sampling settings and stop texts."""

    prompt: str
    prompt_tokens: int
    params: SampleConfig
    stops: tuple[str, ...]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _ServedGenerator(Generator):
    """A :class:`Generator` that counts its tokens, notes when it ran to ``max_new_tokens``
    and stops early once ``cancelled`` is set (the client has gone)."""

    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: int = 0
    ran_out: bool = False

    def stream(self, prompt_ids: list[int], generator: torch.Generator) -> Iterator[int]:
        for token in super().stream(prompt_ids, generator):
            if self.cancelled.is_set():
                return
            self.tokens += 1
            yield token
        self.ran_out = self.tokens == self.params.max_new_tokens


_DONE = object()


class Engine:
    """One model, one worker thread: generations run one at a time in arrival order."""

    def __init__(self, loaded: LoadedRun) -> None:
        self.loaded = loaded
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fraglm-serve")
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()  # queued or running

    @property
    def in_progress(self) -> int:
        return len(self._jobs)

    def _generate(self, job: Job, emit: Any) -> None:
        tokenizer = self.loaded.tokenizer
        generator = _ServedGenerator(
            self.loaded.model,
            job.params,
            stop_ids_for(tokenizer, job.params.stop),
            cancelled=job.cancelled,
        )
        rng = make_rng(job.params.seed)
        for piece in stream_text(generator, tokenizer, job.prompt, rng, stop=job.stops):
            if piece:
                emit(piece)
        reason = "length" if generator.ran_out else "stop"
        emit(Finish(reason, job.prompt_tokens, generator.tokens))

    async def run(self, job: Job) -> AsyncIterator[str | Finish]:
        """Text pieces as they are produced, then one :class:`Finish`; an exception of the
        generation is raised here, in the request's task."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop has closed (server shutting down)
                job.cancelled.set()

        def work() -> None:
            try:
                if not job.cancelled.is_set():  # the client may have left while queued
                    self._generate(job, emit)
            except Exception as exc:
                emit(exc)
            finally:
                with self._lock:
                    self._jobs.discard(job)
                emit(_DONE)

        with self._lock:
            self._jobs.add(job)
        loop.run_in_executor(self._worker, work)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            job.cancelled.set()

    def close(self) -> None:
        """Stop every generation (the server is shutting down)."""
        with self._lock:
            for job in self._jobs:
                job.cancelled.set()
        self._worker.shutdown(wait=False, cancel_futures=True)
