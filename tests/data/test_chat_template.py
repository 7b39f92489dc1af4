"""The chat template in GGUF files and the server's prompt rule are one rule."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fraglm.data.chat_template import CHAT_TEMPLATE, chat_prompt
from fraglm.errors import FraglmError
from fraglm.inference.generate import prompt_text

jinja2 = pytest.importorskip("jinja2")

TEXT = st.text(min_size=1, max_size=12).filter(str.strip)
TURNS = st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), TEXT), max_size=5).map(
    lambda turns: [*turns, ("user", "last question")]
)


def _render(messages: list[tuple[str, str]]) -> str:
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    return template.render(
        messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=True
    )


@settings(max_examples=100, deadline=None)
@given(messages=TURNS)
def test_python_rule_matches_the_jinja_template(messages):
    assert chat_prompt(messages) == _render(messages)


def test_one_question_is_the_prompt_of_fraglm_generate():
    assert chat_prompt([("user", "Why?")]) == prompt_text("Why?", raw=False) == "<|Q|>Why?<|A|>"
    conversation = [("system", "be brief"), ("user", "a"), ("assistant", "b"), ("user", "c")]
    assert chat_prompt(conversation) == "<|Q|>a<|A|>b<|END|><|Q|>c<|A|>"


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "last message must be the user's"),
        ([("user", "a"), ("assistant", "b")], "last message must be the user's"),
        ([("tool", "a"), ("user", "b")], "unknown message role 'tool'"),
        ([("user", "  ")], "a user message is empty"),
    ],
)
def test_bad_conversations_are_one_line_errors(messages, message):
    with pytest.raises(FraglmError, match=message):
        chat_prompt(messages)
