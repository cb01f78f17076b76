"""What kind of model file a path holds, read from its content rather than its name."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from bnfold.errors import BnfoldError

__all__ = ["detect_format"]


def detect_format(path: str | os.PathLike) -> str:
    """Return ``"onnx"`` or ``"torch"`` (a torch.save archive or legacy pickle).

    Raises:
        BnfoldError: Missing, empty, or neither format.

    """
    p = Path(path)
    if not p.is_file():
        raise BnfoldError(f"{p}: no such file")
    with open(p, "rb") as f:
        head = f.read(4)
    if not head:
        raise BnfoldError(f"{p}: is empty")
    if zipfile.is_zipfile(p) or head[:1] == b"\x80":
        return "torch"
    if head[:1] in (b"\x08", b"\x12", b"\x1a", b"\x22", b"\x3a", b"\x42", b"\x52"):  # ModelProto field tags
        return "onnx"
    raise BnfoldError(f"{p}: neither a PyTorch checkpoint nor an ONNX model")
