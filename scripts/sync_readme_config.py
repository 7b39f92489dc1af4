"""Rewrite the README's configuration reference from the config dataclasses.

Run after changing fraglm/config/sections.py: ``python scripts/sync_readme_config.py``.
tests/test_readme.py fails while the README and the dataclasses disagree.
"""

from pathlib import Path

from fraglm.config import reference_markdown

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def with_reference(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{reference_markdown()}{END}{tail}"


if __name__ == "__main__":
    README.write_text(with_reference(README.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"updated {README}")
