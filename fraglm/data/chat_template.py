"""How a conversation becomes a prompt in the training template.

A question becomes ``<|Q|>question<|A|>`` (what ``fraglm generate`` sends) and an earlier
answer is closed by ``<|END|>``, as documents are separated in training. The same rule is
written into GGUF files as a Jinja chat template (read by llama.cpp, Ollama and
transformers) and applied here in Python by ``fraglm serve``; a test checks they agree.
System messages are left out: the model never saw one in training.
"""

from __future__ import annotations

from collections.abc import Iterable

from fraglm.config import ANSWER, END, QUESTION
from fraglm.errors import FraglmError

ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    f"{{%- if message['role'] == 'user' -%}}{QUESTION}{{{{ message['content'] }}}}"
    f"{{%- elif message['role'] == 'assistant' -%}}{ANSWER}{{{{ message['content'] }}}}{END}"
    "{%- endif -%}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{ANSWER}{{%- endif -%}}"
)


def chat_prompt(messages: Iterable[tuple[str, str]]) -> str:
    """The prompt for ``(role, content)`` messages that end with the user's question; for
    one question it is ``<|Q|>question<|A|>``, the prompt of ``fraglm generate``."""
    parts: list[str] = []
    last = None
    for role, content in messages:
        if role not in ROLES:
            raise FraglmError(f"unknown message role {role!r}: use one of {', '.join(ROLES)}")
        if role == "user":
            if not content.strip():
                raise FraglmError("a user message is empty")
            parts.append(QUESTION + content)
        elif role == "assistant":
            parts.append(ANSWER + content + END)
        last = role
    if last != "user":
        raise FraglmError("the last message must be the user's question")
    return "".join(parts) + ANSWER
