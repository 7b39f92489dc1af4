"""The OpenAI API's shapes: request bodies, responses and streamed chunks of
``/v1/chat/completions`` and ``/v1/completions``, server-sent-event framing, and the
error body ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from fraglm.inference.serve.engine import Finish


class ApiError(Exception):
    """A request the API refuses: becomes ``{"error": {...}}`` with ``status``."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def internal_error() -> ApiError:
    """What a client is told of a failure on the server's side: no exception, no
    traceback (those go to the server's log)."""
    return ApiError(500, "internal error; the server's log has the details")


def validation_error(exc: RequestValidationError) -> ApiError:
    """A body that does not fit its request model, as one OpenAI-style error."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", code="json_invalid")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if param is None and first.get("type") == "model_attributes_type":
        message = "the request body must be a JSON object"
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


class SamplingFields(BaseModel):
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

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


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


class ChatRequest(SamplingFields):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: {json}`` (or ``data: [DONE]``) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _envelope(kind: str, prefix: str, model_id: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
        "object": kind,
        "created": int(time.time()),
        "model": model_id,
    }


class ResponseFormat(ABC):
    """The answer to one request: a whole response, or chunks of a stream that share one
    id (``chunk(text, None)`` for a piece, ``chunk(None, finish)`` for the end)."""

    @abstractmethod
    def chunk(self, text: str | None, finish: Finish | None) -> dict[str, Any]: ...

    @abstractmethod
    def whole(self, text: str, finish: Finish) -> dict[str, Any]: ...

    def usage_chunk(self, finish: Finish) -> dict[str, Any]:
        """The extra last chunk of ``stream_options.include_usage``."""
        return self.chunk(None, None) | {"choices": [], "usage": finish.usage()}


@dataclass
class ChatFormat(ResponseFormat):
    """``chat.completion`` and its ``chat.completion.chunk``s; the first delta says the
    role."""

    head: dict[str, Any]
    opened: bool = False

    @classmethod
    def for_request(cls, model_id: str, *, stream: bool) -> ChatFormat:
        kind = "chat.completion.chunk" if stream else "chat.completion"
        return cls(_envelope(kind, "chatcmpl", model_id))

    def chunk(self, text: str | None, finish: Finish | None) -> dict[str, Any]:
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if not self.opened:
            delta, self.opened = {"role": "assistant", **delta}, True
        reason = finish.reason if finish else None
        return self.head | {"choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

    def whole(self, text: str, finish: Finish) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": finish.reason}
        return self.head | {"choices": [choice], "usage": finish.usage()}


@dataclass
class CompletionFormat(ResponseFormat):
    """``text_completion``, whole or streamed."""

    head: dict[str, Any]

    @classmethod
    def for_request(cls, model_id: str) -> CompletionFormat:
        return cls(_envelope("text_completion", "cmpl", model_id))

    def chunk(self, text: str | None, finish: Finish | None) -> dict[str, Any]:
        reason = finish.reason if finish else None
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return self.head | {"choices": [choice]}

    def whole(self, text: str, finish: Finish) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish.reason}
        return self.head | {"choices": [choice], "usage": finish.usage()}
