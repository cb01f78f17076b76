"""Safe output files: every path checked against every input and output, then written atomically.

A temporary file is renamed into place; write failures (disk full, permissions)
are reported in one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from bnfold.errors import BnfoldError

__all__ = ["atomic_write", "check_output", "check_outputs", "companions", "write_error"]


def companions(path: str | os.PathLike) -> list[Path]:
    """Files that belong to a model file: the external data an ONNX file names (read without its data).

    Anything unreadable has no companions here: the loader reports it.
    """
    p = Path(path)
    try:
        from bnfold.model_io.formats import detect_format

        if not p.is_file() or detect_format(p) != "onnx":
            return []
        from bnfold.onnx_fold.files import external_data_files

        return external_data_files(p)
    except Exception:  # noqa: BLE001 - a file we cannot parse here is refused by the loader with its own message
        return []


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_outputs(
    outputs: Mapping[str, str | os.PathLike | None],
    *,
    force: bool,
    inputs: Iterable[str | os.PathLike] = (),
) -> None:
    """Check, before any work, that every output may be written.

    Every output (and the ``.data`` file beside an ``.onnx`` output) is compared,
    links resolved, with every input, every input's external data, and every
    other output.

    Args:
        outputs: Option name (``-o``, ``--report``, ``--chart``) -> path, or None when not given.
        force: Whether existing outputs may be replaced.
        inputs: Files the command reads.

    Raises:
        BnfoldError: One line naming the path and the conflict.
    """
    read = []
    for source in inputs:
        read.append((Path(source), "the input"))
        read += [(c, f"external data of {Path(source).name}") for c in companions(source)]
    claimed: list[tuple[Path, str]] = []
    for option, target in outputs.items():
        if target is None:
            continue
        out = check_output(target, force=force)
        written = [out] + ([out.with_name(out.name + ".data")] if out.suffix == ".onnx" else [])
        for path in written:
            for source, what in read:
                if _same(path, source):
                    raise BnfoldError(f"{path}: {option} would overwrite {what}; choose another path")
            for other, other_option in claimed:
                if _same(path, other):
                    raise BnfoldError(f"{path}: {option} and {other_option} name the same file")
        claimed += [(path, option) for path in written]


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
        if _same(out, Path(source)):
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


def usual_mode() -> int:
    """The permissions a newly created file gets under the process's umask (mkstemp makes 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_error(path: str | os.PathLike, error: OSError) -> BnfoldError:
    """The one-line error for a failed write (disk full, permissions, read-only file system, ...)."""
    reason = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system",
        errno.EXDEV: "cannot move the file across file systems",
    }.get(error.errno, error.strerror or type(error).__name__)
    return BnfoldError(f"{path}: cannot write ({reason}); nothing was written")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file through ``write(temporary_path)`` and move it into place.

    A crash, an exception, a full disk or Ctrl-C leaves no partial file behind:
    the data goes to a temporary file in the same directory, flushed to disk,
    and is renamed over ``path`` only once complete.

    Args:
        path: The final file.
        write: Writes the whole content to the path it is given.

    Returns:
        The final path.

    Raises:
        BnfoldError: The write failed (the temporary file is removed).
    """
    out = Path(path)
    directory = out.parent if str(out.parent) else Path(".")
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=directory)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, usual_mode())  # mkstemp makes 0600 files; give the output the usual permissions
        os.replace(tmp, out)
        tmp = None
    except OSError as error:
        raise write_error(out, error) from None
    except RuntimeError as error:  # torch.save reports a failed write as RuntimeError ("... file write failed")
        if "write" not in str(error).lower():
            raise
        raise write_error(out, OSError(errno.EIO, "the write failed")) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return out
