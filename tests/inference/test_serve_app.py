"""The serve app in-process: a generation that fails is logged with its traceback, and the
client gets an OpenAI-style error that names no exception."""

import json
import logging
from pathlib import Path

import pytest
import torch

from fraglm.config import TokenizerConfig, load_config
from fraglm.data.tokenizer import train_tokenizer, vocab_size
from fraglm.nn.model import Transformer
from fraglm.runs.loading import LoadedRun

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient

from fraglm.inference.serve.app import create_app

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "secret detail of the failure"


@pytest.fixture(scope="module")
def loaded(qa_documents, tmp_path_factory) -> LoadedRun:
    """An untrained tiny model whose forward pass fails."""
    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml")
    tokenizer = train_tokenizer(qa_documents, TokenizerConfig(vocab_size=300), progress=False)
    torch.manual_seed(0)
    model = Transformer(cfg.model, vocab_size(tokenizer)).eval()

    def failing_forward(*args, **kwargs):
        raise RuntimeError(SECRET)

    model.forward = failing_forward
    run_dir = tmp_path_factory.mktemp("served") / "tiny"
    return LoadedRun(run_dir, cfg, model, tokenizer, torch.device("cpu"), 1)


@pytest.fixture
def client(loaded):
    with TestClient(create_app(loaded)) as c:
        yield c


def test_the_app_serves_the_run(client, loaded):
    health = client.get("/health").json()
    assert health == {"status": "ok", "model": "tiny", "requests_in_progress": 0}
    card = client.get("/v1/models").json()["data"][0]
    assert card["sampling"]["max_tokens"] == loaded.cfg.sample.max_new_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_failing_generation_is_logged_and_the_client_sees_no_internals(client, caplog, stream):
    body = {"messages": [{"role": "user", "content": "Hi?"}], "stream": stream}
    with caplog.at_level(logging.ERROR, logger="fraglm.inference.serve"):
        reply = client.post("/v1/chat/completions", json=body)
    [record] = [r for r in caplog.records if r.name.startswith("fraglm.inference.serve")]
    assert record.exc_info is not None and SECRET in caplog.text and "Traceback" in caplog.text
    assert "failing_forward" in caplog.text  # the traceback reaches into the worker thread
    if stream:  # the status line had gone out: the error is the stream's last event
        assert reply.status_code == 200 and "[DONE]" not in reply.text
        error = json.loads(reply.text.strip().removeprefix("data: "))["error"]
    else:
        assert reply.status_code == 500
        error = reply.json()["error"]
    assert error["type"] == "server_error" and "server's log" in error["message"]
    for internal in (SECRET, "RuntimeError", "Traceback", "failing_forward"):
        assert internal not in reply.text
