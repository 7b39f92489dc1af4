"""``fraglm serve``: an OpenAI-compatible HTTP API and a chat page for a trained run.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as
server-sent events with ``"stream": true``), ``GET /v1/models``, ``GET /health`` and the
chat page at ``/``. Generation is the code of ``fraglm generate`` (:class:`Generator`,
:func:`stream_text`), so greedy answers are the same text.

Requests are served one at a time, in arrival order, on one worker thread that alone
uses the model; each request gets its own :class:`Generator` and so its own KV cache. A
client that disconnects (streaming or not) stops its generation at the next token. Bad
requests get a 4xx with an OpenAI-style body ``{"error": {"message", "type", "param",
"code"}}``, never a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from fraglm.config import SampleConfig
from fraglm.data.chat_template import chat_prompt
from fraglm.errors import FraglmError
from fraglm.inference.generate import Generator, make_rng, stop_ids_for, stream_text
from fraglm.runs.loading import LoadedRun

MAX_STOPS = 4  # as OpenAI's API


class ApiError(Exception):
    """A request the API refuses: becomes ``{"error": {...}}`` with ``status``."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class _Sampling(BaseModel):
    """Fields both endpoints share; unknown fields are ignored, as OpenAI clients send many."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="fraglm extension: 0 disables")
    repetition_penalty: float | None = Field(None, gt=0, description="fraglm extension")
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    role: str
    content: str | list[_TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


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


@dataclass(eq=False)
class _Job:
    prompt: str
    prompt_tokens: int
    params: SampleConfig
    stops: tuple[str, ...]
    cancelled: threading.Event = field(default_factory=threading.Event)


_DONE = object()


class Engine:
    """One model, one worker thread: generations run one at a time in arrival order."""

    def __init__(self, loaded: LoadedRun) -> None:
        self.loaded = loaded
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fraglm-serve")
        self._lock = threading.Lock()
        self._jobs: set[_Job] = set()  # queued or running

    @property
    def in_progress(self) -> int:
        return len(self._jobs)

    def _generate(self, job: _Job, emit: Any) -> None:
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

    async def run(self, job: _Job) -> AsyncIterator[str | Finish]:
        """Text pieces as they are produced, then one :class:`Finish`."""
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


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop takes at most {MAX_STOPS} texts", param="stop")
    return tuple(s for s in stops if s)


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", code="json_invalid")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if param is None and first.get("type") == "model_attributes_type":
        message = "the request body must be a JSON object"
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


def create_app(loaded: LoadedRun) -> FastAPI:
    """The FastAPI app serving ``loaded`` (a run from :func:`fraglm.runs.loading.load_run`)."""
    model_id = loaded.run_dir.name
    created = int(time.time())
    engine = Engine(loaded)
    base = loaded.cfg.sample
    defaults = {
        "temperature": base.temperature,
        "top_p": base.top_p,
        "top_k": base.top_k,
        "repetition_penalty": base.repetition_penalty,
        "max_tokens": base.max_new_tokens,
        "seed": base.seed,
    }

    app = FastAPI(title="fraglm", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.on_shutdown.append(engine.close)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}").response()

    def job_for(body: _Sampling, prompt: str) -> _Job:
        if body.model is not None and body.model != model_id:
            raise ApiError(
                404,
                f"model {body.model!r} not found; this server serves {model_id!r}",
                param="model",
                code="model_not_found",
            )
        given = {
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "repetition_penalty": body.repetition_penalty,
            "max_new_tokens": body.max_tokens,
            "seed": body.seed,
        }
        params = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
        prompt_tokens = len(loaded.tokenizer.encode(prompt).ids)
        if prompt_tokens == 0:
            raise ApiError(400, "the prompt encodes to no tokens", param="prompt")
        return _Job(prompt, prompt_tokens, params, (params.stop, *_stops(body.stop)))

    async def complete(
        request: Request, job: _Job, chunk: Any, whole: Any, include_usage: bool
    ) -> Response:
        """Stream ``chunk(text, finish)`` events, or answer ``whole(text, finish)``."""
        if not chunk:
            return await _collect(request, engine.run(job), whole)

        async def events() -> AsyncIterator[str]:
            try:
                async for item in engine.run(job):
                    if isinstance(item, Finish):
                        yield _sse(chunk(None, item))
                        if include_usage:
                            usage = {"choices": [], "usage": item.usage()}
                            yield _sse(chunk(None, None) | usage)
                    else:
                        yield _sse(chunk(item, None))
            except Exception as exc:  # the status line has gone out: report in the stream
                error = ApiError(500, f"internal error: {type(exc).__name__}")
                yield _sse(json.loads(error.response().body))
                return
            yield _sse("[DONE]")

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    def envelope(kind: str, prefix: str) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": kind,
            "created": int(time.time()),
            "model": model_id,
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest) -> Response:
        try:
            prompt = chat_prompt((m.role, m.text()) for m in body.messages)
        except FraglmError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        job = job_for(body, prompt)
        head = envelope("chat.completion.chunk" if body.stream else "chat.completion", "chatcmpl")
        opened = False

        def chunk(text: str | None, finish: Finish | None) -> dict[str, Any]:
            nonlocal opened
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if not opened:
                delta, opened = {"role": "assistant", **delta}, True
            reason = finish.reason if finish else None
            return head | {"choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

        def whole(text: str, finish: Finish) -> dict[str, Any]:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": finish.reason}
            return head | {"choices": [choice], "usage": finish.usage()}

        usage = bool((body.stream_options or {}).get("include_usage"))
        return await complete(request, job, chunk if body.stream else None, whole, usage)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt must be one text", param="prompt")
        job = job_for(body, prompts[0])
        head = envelope("text_completion", "cmpl")

        def chunk(text: str | None, finish: Finish | None) -> dict[str, Any]:
            reason = finish.reason if finish else None
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return head | {"choices": [choice]}

        def whole(text: str, finish: Finish) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish.reason}
            return head | {"choices": [choice], "usage": finish.usage()}

        usage = bool((body.stream_options or {}).get("include_usage"))
        return await complete(request, job, chunk if body.stream else None, whole, usage)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "fraglm"}
        card["sampling"] = defaults  # fraglm extension: the run's defaults, for the chat page
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "requests_in_progress": engine.in_progress}

    page = resources.files("fraglm").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return page

    return app


async def _collect(request: Request, items: AsyncIterator[str | Finish], whole: Any) -> Response:
    """The whole answer of a non-streaming request; generation stops if the client leaves."""

    async def gather() -> dict[str, Any]:
        pieces: list[str] = []
        async for item in items:
            if isinstance(item, Finish):
                return whole("".join(pieces), item)
            pieces.append(item)
        raise RuntimeError("generation ended without a finish")

    task = asyncio.ensure_future(gather())
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            return Response(status_code=499)
    return JSONResponse(task.result())


def serve(
    run: str | None, *, which: str, host: str, port: int, device: str, log_level: str = "info"
) -> None:
    """Load the run and serve it with uvicorn until interrupted."""
    import uvicorn

    from fraglm.runs.loading import load_run

    loaded = load_run(run, which=which, device=device)
    app = create_app(loaded)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"fraglm serve: {loaded.run_dir} (step {loaded.step}) on http://{shown}:{port}/ "
        f"(chat page; OpenAI API at /v1)",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
