"""The endpoints of ``fraglm serve``: an :class:`APIRouter` whose handlers find the
engine and the served model's identity on ``request.app.state`` (see
:func:`fraglm.inference.serve.app.create_app`).

A generation that fails goes to the server's log with its traceback; the client gets an
OpenAI-style ``server_error`` that names no exception.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from fraglm.data.chat_template import chat_prompt
from fraglm.errors import FraglmError
from fraglm.inference.serve.engine import Engine, Finish, Job
from fraglm.inference.serve.formats import (
    ApiError,
    ChatFormat,
    ChatRequest,
    CompletionFormat,
    CompletionRequest,
    ResponseFormat,
    SamplingFields,
    internal_error,
    sse,
)

MAX_STOPS = 4  # as OpenAI's API

logger = logging.getLogger(__name__)
router = APIRouter()


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _model_id(request: Request) -> str:
    return request.app.state.model_id


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop takes at most {MAX_STOPS} texts", param="stop")
    return tuple(s for s in stops if s)


def _job_for(request: Request, body: SamplingFields, prompt: str) -> Job:
    """The request as a generation job: the run's ``sample`` settings, overridden by the
    fields the request gives."""
    model_id, loaded = _model_id(request), _engine(request).loaded
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
    base = loaded.cfg.sample
    params = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    prompt_tokens = len(loaded.tokenizer.encode(prompt).ids)
    if prompt_tokens == 0:
        raise ApiError(400, "the prompt encodes to no tokens", param="prompt")
    return Job(prompt, prompt_tokens, params, (params.stop, *_stops(body.stop)))


async def _complete(
    request: Request, job: Job, answer: ResponseFormat, *, stream: bool, include_usage: bool
) -> Response:
    """Stream ``answer``'s chunks as server-sent events, or answer with the whole."""
    items = _engine(request).run(job)
    if not stream:
        return await _collect(request, items, answer)

    async def events() -> AsyncIterator[str]:
        try:
            async for item in items:
                if isinstance(item, Finish):
                    yield sse(answer.chunk(None, item))
                    if include_usage:
                        yield sse(answer.usage_chunk(item))
                else:
                    yield sse(answer.chunk(item, None))
        except Exception:  # the status line has gone out: report in the stream
            logger.exception("generation failed")
            yield sse(internal_error().body())
            return
        yield sse("[DONE]")

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def _collect(
    request: Request, items: AsyncIterator[str | Finish], answer: ResponseFormat
) -> Response:
    """The whole answer of a non-streaming request; generation stops if the client leaves."""

    async def gather() -> dict[str, Any]:
        pieces: list[str] = []
        async for item in items:
            if isinstance(item, Finish):
                return answer.whole("".join(pieces), item)
            pieces.append(item)
        raise RuntimeError("generation ended without a finish")

    task = asyncio.ensure_future(gather())
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            return Response(status_code=499)
    try:
        return JSONResponse(task.result())
    except Exception:
        logger.exception("generation failed")
        return internal_error().response()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatRequest) -> Response:
    try:
        prompt = chat_prompt((m.role, m.text()) for m in body.messages)
    except FraglmError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    job = _job_for(request, body, prompt)
    answer = ChatFormat.for_request(_model_id(request), stream=body.stream)
    return await _complete(
        request, job, answer, stream=body.stream, include_usage=body.include_usage
    )


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest) -> Response:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "prompt must be one text", param="prompt")
    job = _job_for(request, body, prompts[0])
    answer = CompletionFormat.for_request(_model_id(request))
    return await _complete(
        request, job, answer, stream=body.stream, include_usage=body.include_usage
    )


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    base = _engine(request).loaded.cfg.sample
    card = {
        "id": _model_id(request),
        "object": "model",
        "created": request.app.state.created,
        "owned_by": "fraglm",
        # fraglm extension: the run's defaults, for the chat page
        "sampling": {
            "temperature": base.temperature,
            "top_p": base.top_p,
            "top_k": base.top_k,
            "repetition_penalty": base.repetition_penalty,
            "max_tokens": base.max_new_tokens,
            "seed": base.seed,
        },
    }
    return {"object": "list", "data": [card]}


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    in_progress = _engine(request).in_progress
    return {"status": "ok", "model": _model_id(request), "requests_in_progress": in_progress}


@router.get("/", response_class=HTMLResponse)
async def chat_page(request: Request) -> str:
    return request.app.state.chat_page
