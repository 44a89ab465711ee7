"""The one exception type for mistakes a user can fix (bad config, data, paths).

The CLI prints its message as one line and exits with status 2; so it does for an OSError or
UnicodeError that reaches it (a path the user gave: `os_error_line`). Anything else is a bug and
keeps its traceback.
"""


class LmtuneError(Exception):
    """A user-fixable problem; the message says what is wrong and how to fix it."""



def os_error_line(err: OSError | UnicodeError) -> str:
    """One line for a file-system or text-encoding error that reached the command (the path, what went wrong)."""
    if isinstance(err, UnicodeError):
        return f"a file is not UTF-8 text ({err}); save it as UTF-8"
    problem = err.strerror or str(err) or type(err).__name__
    if err.filename is None:
        return f"{problem}; check the paths given and their permissions"
    target = f"{err.filename} -> {err.filename2}" if err.filename2 else str(err.filename)
    return f"{target}: {problem}; check the path and its permissions"
