"""The one exception type the CLI turns into a clean message (no traceback unless --debug)."""


class TsarankError(Exception):
    """A user-facing error: bad input, a broken file, an unsupported model. The message names the culprit."""
