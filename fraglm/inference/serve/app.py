"""``fraglm serve``: an OpenAI-compatible HTTP API and a chat page for a trained run.

Endpoints (:mod:`~fraglm.inference.serve.routes`): ``POST /v1/chat/completions`` and
``POST /v1/completions`` (streamed as server-sent events with ``"stream": true``),
``GET /v1/models``, ``GET /health`` and the chat page at ``/``. Requests are served one
at a time by the :class:`~fraglm.inference.serve.engine.Engine`. Bad requests get a 4xx
with an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``, never a
traceback; failures on the server's side go to its log.
"""

from __future__ import annotations

import logging
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from fraglm.inference.serve.engine import Engine
from fraglm.inference.serve.formats import ApiError, internal_error, validation_error
from fraglm.inference.serve.routes import router
from fraglm.runs.loading import LoadedRun, load_run

logger = logging.getLogger(__name__)


def create_app(loaded: LoadedRun) -> FastAPI:
    """The FastAPI app serving ``loaded`` (a run from :func:`fraglm.runs.loading.load_run`)."""
    app = FastAPI(title="fraglm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine = Engine(loaded)
    app.state.model_id = loaded.run_dir.name
    app.state.created = int(time.time())
    chat_page = resources.files("fraglm").joinpath("static/chat.html")
    app.state.chat_page = chat_page.read_text(encoding="utf-8")
    app.router.on_shutdown.append(engine.close)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(router)
    return app


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc).response()


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    code = "not_found" if exc.status_code == 404 else None
    return ApiError(exc.status_code, str(exc.detail), code=code).response()


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    """Any other exception: the client learns nothing of it. Starlette raises it again
    once this answer is sent, and the server (uvicorn) logs it with its traceback."""
    return internal_error().response()


def serve(
    run: str | None, *, which: str, host: str, port: int, device: str, log_level: str = "info"
) -> None:
    """Load the run and serve it with uvicorn until interrupted."""
    import uvicorn

    loaded = load_run(run, which=which, device=device)
    app = create_app(loaded)
    shown = f"[{host}]" if ":" in host else host
    logger.info(
        "fraglm serve: %s (step %d) on http://%s:%d/ (chat page; OpenAI API at /v1)",
        loaded.run_dir,
        loaded.step,
        shown,
        port,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
