"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class FraglmError(Exception):
    """A user-facing problem: bad config, missing file, bad corpus, corrupt checkpoint."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for wrapping library errors in one line."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
