"""Errors bnfold raises for problems a user can fix."""

__all__ = ["BnfoldError"]


class BnfoldError(Exception):
    """A user-facing error: bad input, bad arguments, or an unsupported model.

    The CLI prints ``str(error)`` as one line and exits with status 2.
    """
