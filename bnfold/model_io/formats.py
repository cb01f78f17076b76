"""What kind of model file a path holds, read from its content rather than its name."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

from bnfold.errors import BnfoldError

__all__ = ["FORMATS", "detect_format"]

FORMATS = ("onnx", "torch", "torchscript", "torch-export", "safetensors", "pickle")
_ONNX_FIRST_BYTES = (b"\x08", b"\x12", b"\x1a", b"\x22", b"\x3a", b"\x42", b"\x52", b"\x72")  # ModelProto tags


def check_zip_sizes(path: Path, entries: list[zipfile.ZipInfo]) -> None:
    """Refuse a zip archive whose entries would inflate far beyond the file (a deflate bomb) or lie about sizes.

    torch.save stores entries uncompressed; compressed entries are allowed up to
    :data:`bnfold.limits.LIMITS` ``max_zip_ratio``, and the total up to ``max_zip_inflated``.

    Raises:
        BnfoldError: One line naming the entry and the sizes.
    """
    from bnfold.limits import LIMITS

    archive_bytes = path.stat().st_size
    total = 0
    for info in entries:
        total += info.file_size
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size or info.header_offset + info.compress_size > archive_bytes:
                raise BnfoldError(
                    f"{path}: zip entry {info.filename[:80]} declares {info.file_size} bytes the file lacks"
                )
        elif info.file_size > 2**20 and info.file_size > LIMITS.max_zip_ratio * max(info.compress_size, 1):
            raise BnfoldError(
                f"{path}: zip entry {info.filename[:80]} inflates {info.compress_size} bytes to {info.file_size} "
                f"(over {LIMITS.max_zip_ratio}:1, BNFOLD_MAX_ZIP_RATIO): refused as a decompression bomb"
            )
    if total > LIMITS.max_zip_inflated:
        raise BnfoldError(f"{path}: the zip archive declares {total} bytes, over BNFOLD_MAX_ZIP_INFLATED")


def check_npz(path: Path) -> None:
    """Refuse an ``.npz`` archive that is not a zip or would inflate far beyond its size (see :func:`check_zip_sizes`).

    Raises:
        BnfoldError: One line.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise BnfoldError(f"{path}: not a readable .npz archive ({error})") from None
    check_zip_sizes(path, entries)


def _zip_kind(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except Exception:  # noqa: BLE001 - a damaged directory fails in many ways (bad names, versions, sizes)
        return None
    check_zip_sizes(path, entries)
    names = [info.filename for info in entries]
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return "torch-export"
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch"
    return None


def _is_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    if length <= 1 or length > min(100 * 2**20, path.stat().st_size - 8):
        return False
    with open(path, "rb") as f:
        f.seek(8)
        header = f.read(length)
    try:
        return isinstance(json.loads(header), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def detect_format(path: str | os.PathLike) -> str:
    """Return one of :data:`FORMATS` for the file at ``path``.

    ``torch`` is a ``torch.save`` archive, ``pickle`` a legacy (non-zip)
    ``torch.save`` file.

    Raises:
        BnfoldError: Missing, empty, or none of the formats.
    """
    p = Path(path)
    if not p.is_file():
        raise BnfoldError(f"{p}: no such file")
    with open(p, "rb") as f:
        head = f.read(16)
    if not head:
        raise BnfoldError(f"{p}: is empty")
    if head[:2] == b"PK":
        kind = _zip_kind(p)
        if kind is None:
            raise BnfoldError(f"{p}: a zip archive that is no PyTorch checkpoint (or it is truncated)")
        return kind
    if _is_safetensors(p, head):  # first: a header length such as 0x180 starts with the pickle byte 0x80
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    if head[:1] in _ONNX_FIRST_BYTES:
        return "onnx"
    raise BnfoldError(f"{p}: neither a PyTorch checkpoint, safetensors, TorchScript, torch.export nor ONNX file")
