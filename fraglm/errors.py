"""The one exception type that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

from pathlib import Path


class FraglmError(Exception):
    """A user-facing problem: bad config, missing file, bad corpus, corrupt checkpoint."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for wrapping library errors in one line."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def describe_exception(exc: BaseException) -> str:
    """One line for an exception nobody turned into a ``FraglmError``: an ``OSError`` as
    its reason and file, anything else as its type and first line."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"{type(exc).__name__}: {first_line(exc)}"


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of a file the user named, or a one-line error saying what is wrong."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FraglmError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FraglmError(f"{what} {path} is not UTF-8 text (line {line})") from None
