"""The one exception type for mistakes a user can fix (bad config, data, paths).

The CLI prints its message as one line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class LmtuneError(Exception):
    """A user-fixable problem; the message says what is wrong and how to fix it."""
