"""``fraglm serve`` as a real process on 127.0.0.1: the official ``openai`` client gets the
greedy text of ``fraglm generate``; streams, concurrency, disconnects, errors; the chat
page in headless Chromium.

The README's screenshot comes from the browser test with a trained run:
``FRAGLM_CHAT_RUN=checkpoints/cpu FRAGLM_CHAT_SCREENSHOT=docs/images/chat.png
pytest tests/inference/test_serve.py -k chat_page`` (the other tests need the test's own run).
"""

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from local_server import server_process
from safetensors.torch import save_model

from fraglm.config import END, QUESTION
from fraglm.runs import checkpoint as ckpt
from fraglm.runs import layout, pointers
from fraglm.runs.loading import load_run

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO_ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["What should I do about a fever?", "How do I sleep better?"]
START_TIMEOUT_S = 90
LONG = 10**6  # max_tokens that would run for many minutes: only a cancelled request ends


@pytest.fixture(scope="module")
def run_dir(train_tiny_run, tmp_path_factory) -> Path:
    """A tiny run made sharp (varied greedy text) whose model never ends an answer by
    itself: <|END|> and <|Q|> have zero embeddings, so their logits are exactly 0 while the
    largest logit is positive; every answer runs to max_tokens unless a stop text ends it.
    ``FRAGLM_CHAT_RUN`` serves another run instead (for the README's screenshot)."""
    if os.environ.get("FRAGLM_CHAT_RUN"):
        return Path(os.environ["FRAGLM_CHAT_RUN"]).resolve()
    run = train_tiny_run(tmp_path_factory.mktemp("serve"), "train.max_steps=2")
    loaded = load_run(run, device="cpu")
    model = loaded.model
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(10)
        model.norm.weight.mul_(20)
        for token in (END, QUESTION):
            model.embed.weight[loaded.tokenizer.token_to_id(token)] = 0
    for which in ("best", "latest"):
        step_dir = pointers.checkpoint_dir(run, which)
        save_model(model, str(step_dir / layout.WEIGHTS_FILE))
        ckpt.write_manifest(step_dir, loaded.step)
    return run


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """``fraglm serve`` in a subprocess on a free port; yields its base URL; killed at the end."""
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w+")
    try:
        with server_process(run_dir, output=log, start_timeout_s=START_TIMEOUT_S) as url:
            yield url
    except RuntimeError as exc:
        log.seek(0)
        raise RuntimeError(f"{exc}\n{log.read()[-3000:]}") from None
    finally:
        log.close()


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=60) as c:
        yield c


def _generate_greedy(run_cli, run_dir: Path, question: str, tokens: int, *raw: str) -> str:
    result = run_cli(
        "generate", question, "--run", run_dir, "--temperature", "0",
        "--max-new-tokens", tokens, "--device", "cpu", *raw,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return result.stdout.removesuffix("\n")


def _chat_stream(client, model: str, question: str, **kw) -> tuple[str, list]:
    chunks = list(
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], stream=True, **kw
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_and_health(server, client, run_dir):
    assert [m.id for m in client.models.list().data] == [run_dir.name]
    card = httpx.get(server + "/v1/models", timeout=10).json()["data"][0]
    assert (
        card["sampling"]["max_tokens"] == load_run(run_dir, device="cpu").cfg.sample.max_new_tokens
    )
    health = httpx.get(server + "/health", timeout=10).json()
    assert health == {"status": "ok", "model": run_dir.name, "requests_in_progress": 0}


def test_chat_gives_the_greedy_text_of_fraglm_generate(client, run_cli, run_dir):
    tokens = 80  # prompt + answer outgrow the 64-token context: the cache restarts on both
    for question in QUESTIONS:
        expected = _generate_greedy(run_cli, run_dir, question, tokens)
        assert len(expected) > 20
        reply = client.chat.completions.create(
            model=run_dir.name,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=tokens,
        )
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == tokens
        text, chunks = _chat_stream(
            client, run_dir.name, question, temperature=0, max_tokens=tokens
        )
        assert text == expected
        assert len(chunks) > 10  # streamed piece by piece
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_give_the_greedy_text_of_fraglm_generate(client, run_cli, run_dir):
    question = QUESTIONS[0]
    expected = _generate_greedy(run_cli, run_dir, question, 30)
    prompt = f"<|Q|>{question}<|A|>"  # completions take the prompt as is, like --raw
    assert _generate_greedy(run_cli, run_dir, prompt, 30, "--raw") == expected
    reply = client.completions.create(
        model=run_dir.name, prompt=prompt, temperature=0, max_tokens=30
    )
    assert reply.choices[0].text == expected
    chunks = list(
        client.completions.create(
            model=run_dir.name, prompt=prompt, temperature=0, max_tokens=30, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_is_server_sent_events_ending_in_done(server, run_dir):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_a_stop_text_ends_the_answer(client, run_dir):
    full = client.completions.create(
        model=run_dir.name, prompt="<|Q|>hi<|A|>", temperature=0, max_tokens=40
    ).choices[0]
    stop = full.text[10:13]
    cut = client.completions.create(
        model=run_dir.name, prompt="<|Q|>hi<|A|>", temperature=0, max_tokens=40, stop=[stop]
    ).choices[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert (full.finish_reason, cut.finish_reason) == ("length", "stop")


def test_concurrent_streams_give_the_texts_of_one_at_a_time(client, run_dir):
    requests = [
        {"question": q, "temperature": 1.0, "top_p": 0.9, "seed": seed, "max_tokens": 40}
        for seed, q in enumerate(QUESTIONS, start=1)
    ]

    def one(req: dict) -> str:
        return _chat_stream(client, run_dir.name, **req)[0]

    alone = [one(req) for req in requests]
    assert alone[0] != alone[1]
    together: list[str | None] = [None] * len(requests)

    def worker(i: int) -> None:
        together[i] = one(requests[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert together == alone
    assert one(requests[0]) == alone[0]  # a seed gives the same sample every time


def _idle_within(server: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if httpx.get(server + "/health", timeout=5).json()["requests_in_progress"] == 0:
            return True
        time.sleep(0.1)
    return False


def test_a_client_that_disconnects_stops_its_generation(server, client, run_dir):
    # greedy: <|END|> has logit 0, far below the others but not impossible to sample
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": LONG,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
    assert _idle_within(server, 15), "the abandoned stream kept generating"

    with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up waiting
        httpx.post(
            server + "/v1/completions",
            json={"prompt": "hi", "max_tokens": LONG, "temperature": 0},
            timeout=1,
        )
    assert _idle_within(server, 15), "the abandoned request kept generating"
    reply = client.completions.create(model=run_dir.name, prompt="hi", max_tokens=3)
    assert reply.usage.completion_tokens == 3


def _error(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    assert "Traceback" not in reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "message"),
    [
        ("/v1/completions", b'{"prompt": "hi",', 400, None, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, None, "must be a JSON object"),
        (
            "/v1/completions",
            {"prompt": "hi", "max_tokens": -3},
            400,
            "max_tokens",
            "greater than or equal to 1",
        ),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model", "'gpt-9' not found"),
        (
            "/v1/completions",
            {"prompt": "hi", "temperature": 7},
            400,
            "temperature",
            "less than or equal to 2",
        ),
        ("/v1/completions", {"prompt": "hi", "stop": list("abcde")}, 400, "stop", "at most 4"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "one text"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt", "no tokens"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "required"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "assistant", "content": "hi"}]},
            400,
            "messages",
            "last message must be the user's",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "wizard", "content": "hi"}]},
            400,
            "messages",
            "unknown message role 'wizard'",
        ),
        ("/v1/nowhere", {}, 404, None, "Not Found"),
    ],
)
def test_bad_requests_get_openai_style_errors(server, path, body, status, param, message):
    if isinstance(body, bytes):
        reply = httpx.post(
            server + path, content=body, headers={"content-type": "application/json"}, timeout=10
        )
    else:
        reply = httpx.post(server + path, json=body, timeout=10)
    error = _error(reply, status)
    assert error["param"] == param
    assert message in error["message"], error


def test_the_openai_client_sees_errors_as_its_exceptions(client, run_dir):
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=run_dir.name, prompt="a", max_tokens=-1)


def test_missing_serve_extra_gives_an_install_hint(run_cli, monkeypatch, run_dir):
    monkeypatch.setitem(sys.modules, "fraglm.inference.serve.app", None)
    run_cli("serve", "--run", run_dir).assert_user_error('pip install -e ".[serve]"')


# the chat page in a real browser

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = os.environ.get("FRAGLM_CHAT_SCREENSHOT")  # also save the picture here


# records the length of the answer's text at every change the page makes to it
WATCH_ANSWER_LENGTHS = """
window.answerLengths = [];
new MutationObserver(() => {
  const bubbles = document.querySelectorAll(".msg.assistant");
  if (bubbles.length) window.answerLengths.push(bubbles[bubbles.length - 1].textContent.length);
}).observe(document.getElementById("log"), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("no Chromium: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,700"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_chat_page_streams_an_answer(server, browser, run_dir, tmp_path, run_cli):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30, poll_frequency=0.05)
    browser.get(server + "/")
    wait.until(lambda d: d.find_element(By.ID, "model").text == f"model: {run_dir.name}")
    defaults = load_run(run_dir, device="cpu").cfg.sample  # the controls start from these
    for field, value in (
        ("temperature", defaults.temperature),
        ("top_p", defaults.top_p),
        ("top_k", defaults.top_k),
        ("repetition_penalty", defaults.repetition_penalty),
        ("max_tokens", defaults.max_new_tokens),
    ):
        shown = browser.find_element(By.ID, field).get_attribute("value")
        assert float(shown) == value, field
    for field, value in (("temperature", "0"), ("max_tokens", "150")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.execute_script(WATCH_ANSWER_LENGTHS)
    browser.find_element(By.ID, "question").send_keys(QUESTIONS[0])
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta"))
    final = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
    meta = final.find_element(By.CSS_SELECTOR, ".meta").text
    answer = final.get_attribute("textContent").removesuffix(meta)
    assert meta.split(" ")[0] in ("length", "stop"), meta
    assert answer == _generate_greedy(run_cli, run_dir, QUESTIONS[0], 150)
    lengths = browser.execute_script("return window.answerLengths")
    assert len(set(lengths)) > 3, lengths  # the text grew piece by piece as it streamed
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == QUESTIONS[0]
    browser.save_screenshot(str(tmp_path / "chat.png"))
    if SCREENSHOT:
        shutil.copy(tmp_path / "chat.png", SCREENSHOT)
