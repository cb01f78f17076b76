"""Safe output files: atomic writes that never clobber an input or an existing output."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from bnfold.errors import BnfoldError

__all__ = ["atomic_write", "check_output"]


def check_output(path: str | os.PathLike, *, force: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Check that ``path`` may be written, before any work is done.

    Args:
        path: The output file.
        force: Whether an existing output may be replaced.
        inputs: Files the command reads; the output may not be one of them.

    Returns:
        The output path.

    Raises:
        BnfoldError: The output is an input, exists without ``force``, or its
            directory is missing or not writable.
    """
    out = Path(path)
    for source in inputs:
        if Path(source).exists() and out.exists() and out.resolve() == Path(source).resolve():
            raise BnfoldError(f"{out}: the output would overwrite the input; choose another -o")
    if out.is_dir():
        raise BnfoldError(f"{out}: is a directory")
    if out.exists() and not force:
        raise BnfoldError(f"{out}: exists; pass --force to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise BnfoldError(f"{out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise BnfoldError(f"{out}: directory {parent} is not writable")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file through ``write(temporary_path)`` and move it into place.

    A crash, an exception or Ctrl-C leaves no partial file behind: the data
    goes to a temporary file in the same directory, renamed over ``path`` only
    once complete.

    Args:
        path: The final file.
        write: Writes the whole content to the path it is given.

    Returns:
        The final path.
    """
    out = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the output the usual permissions
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return out
