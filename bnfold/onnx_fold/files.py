"""Reading and writing ONNX files, external data (models over 2 GB) included, atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx

from bnfold.errors import BnfoldError, first_line
from bnfold.io import write_error
from bnfold.onnx_fold.tensors import check_model_tensors

__all__ = ["load_onnx", "save_onnx"]

_PROTOBUF_LIMIT = 2**31 - 2**20


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file with its external data.

    Raises:
        BnfoldError: Missing, truncated or not an ONNX model.
    """
    p = Path(path)
    if not p.is_file():
        raise BnfoldError(f"{p}: no such file")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except Exception as error:  # noqa: BLE001 - protobuf and external-data readers fail in many ways
        first = first_line(error, 200)
        raise BnfoldError(f"{p}: not a readable ONNX model ({first})") from None
    if not model.graph.node and not model.graph.output:
        raise BnfoldError(f"{p}: not a readable ONNX model (no graph)")
    try:
        check_model_tensors(model)
    except BnfoldError as error:
        raise BnfoldError(f"{p}: {error}") from None
    return model


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` atomically; large models go to ``<name>.data`` beside it.

    Args:
        model: The model.
        path: The output file.
        external_data: Force (True) or forbid (False) external data; by default
            used when the model is too large for one protobuf.

    Returns:
        The output path.
    """
    out = Path(path)
    external = model.ByteSize() > _PROTOBUF_LIMIT if external_data is None else external_data
    directory = out.parent if str(out.parent) else Path(".")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=directory))
    except OSError as error:
        raise write_error(out, error) from None
    try:
        staged = tmp / out.name
        if external:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving as external data rewrites the tensors it is given
            onnx.save_model(
                copy,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=f"{out.name}.data",
                size_threshold=1024,
            )
            os.replace(tmp / f"{out.name}.data", directory / f"{out.name}.data")
        else:
            onnx.save_model(model, str(staged))
        with open(staged, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(staged, out)
    except OSError as error:
        raise write_error(out, error) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
