"""Errors bnfold raises for problems a user can fix, and how an exception becomes one line."""

__all__ = ["BnfoldError", "first_line", "innermost_line"]


class BnfoldError(Exception):
    """A user-facing error: bad input, bad arguments, or an unsupported model.

    The CLI prints ``str(error)`` as one line and exits with status 2.
    """


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name when it has none), cut to ``limit``."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines and lines[0] else type(error).__name__)[:limit]


def innermost_line(error: BaseException, limit: int = 160) -> str:
    """``Type: first line`` of the exception at the end of ``error``'s ``raise ... from`` chain.

    torch.fx wraps a model's own error in ``RuntimeError("ShapeProp error for: node=...")``; the user needs the
    error inside (``ValueError: batch_norm eps must be non-negative``), not the wrapper's node dump.
    """
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return f"{type(error).__name__}: {first_line(error, limit)}"
