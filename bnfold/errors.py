"""Errors bnfold raises for problems a user can fix, and how an exception becomes one line."""

__all__ = ["BnfoldError", "first_line"]


class BnfoldError(Exception):
    """A user-facing error: bad input, bad arguments, or an unsupported model.

    The CLI prints ``str(error)`` as one line and exits with status 2.
    """


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name when it has none), cut to ``limit``."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines and lines[0] else type(error).__name__)[:limit]
