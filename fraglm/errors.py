"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class FraglmError(Exception):
    """A user-facing problem: bad config, missing file, bad corpus, corrupt checkpoint."""
