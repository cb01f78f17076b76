"""Every ONNX tensor decoded through one checked path: declared shape against the data it holds."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.errors import BnfoldError

__all__ = [
    "check_model_tensors",
    "check_tensor",
    "declared_bytes",
    "decode",
    "external_location",
    "external_tensors",
    "graph_tensors",
    "resolve_external_data",
    "shell",
    "stored_at",
]

# the protobuf field that holds each element type's values, when not raw_data
_FIELDS = {
    onnx.TensorProto.FLOAT: "float_data",
    onnx.TensorProto.COMPLEX64: "float_data",
    onnx.TensorProto.DOUBLE: "double_data",
    onnx.TensorProto.COMPLEX128: "double_data",
    onnx.TensorProto.INT64: "int64_data",
    onnx.TensorProto.UINT32: "uint64_data",
    onnx.TensorProto.UINT64: "uint64_data",
    onnx.TensorProto.STRING: "string_data",
}
_MAP_FROM_BYTES = 2**20  # external tensors of at least this size are memory-mapped, smaller ones read
_PER_ELEMENT = {onnx.TensorProto.COMPLEX64: 2, onnx.TensorProto.COMPLEX128: 2}


def _label(tensor: onnx.TensorProto, where: str) -> str:
    return f"{where} tensor '{tensor.name[:80]}'" if tensor.name else f"{where} tensor"


def check_tensor(tensor: onnx.TensorProto, where: str = "") -> int:
    """Check that a tensor's data matches its declared type and shape, without decoding it.

    Args:
        tensor: The tensor (an initializer or a Constant's value).
        where: What holds it, for the message.

    Returns:
        Its number of elements.

    Raises:
        BnfoldError: Negative dims, an unknown element type, or short, long or
            missing data.
    """
    label = _label(tensor, where)
    if any(d < 0 for d in tensor.dims):
        raise BnfoldError(f"{label} declares a negative dimension {list(tensor.dims)[:8]}")
    elements = math.prod(tensor.dims)
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        raise BnfoldError(f"{label} has an unknown element type {tensor.data_type}") from None
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        external_location(tensor, where)  # the file and the byte range are checked by resolve_external_data
        return elements
    if tensor.HasField("raw_data") or tensor.data_type not in _FIELDS and not _typed_length(tensor):
        if tensor.data_type == onnx.TensorProto.STRING:
            raise BnfoldError(f"{label} holds strings as raw data")
        want = declared_bytes(tensor)
        have = len(tensor.raw_data)
        if have != want:
            raise BnfoldError(
                f"{label} declares shape {list(tensor.dims)[:8]} of {np.dtype(dtype).name} ({want} bytes) "
                f"but holds {have} bytes"
            )
        return elements
    have = _typed_length(tensor)
    want = elements * _PER_ELEMENT.get(tensor.data_type, 1)
    if tensor.data_type not in _FIELDS and tensor.data_type in _PACKED_4BIT:
        want = (elements + 1) // 2
    if have != want:
        raise BnfoldError(f"{label} declares shape {list(tensor.dims)[:8]} ({want} values) but holds {have} values")
    return elements


_PACKED_4BIT = {
    getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, name)
}


def _bits(data_type: int, dtype: np.dtype) -> int:
    if data_type in _PACKED_4BIT:
        return 4
    return 8 * np.dtype(dtype).itemsize


def _typed_length(tensor: onnx.TensorProto) -> int:
    field = _FIELDS.get(tensor.data_type, "int32_data")  # bool, (u)int8/16, float16, bfloat16, float8 live there
    return len(getattr(tensor, field))


def decode(tensor: onnx.TensorProto, where: str = "") -> np.ndarray:
    """A tensor as a numpy array, after :func:`check_tensor`; external data is memory-mapped, read-only.

    Raises:
        BnfoldError: The data does not match the declaration, or cannot be decoded.
    """
    check_tensor(tensor, where)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return _map_external(tensor, where)
    try:
        return numpy_helper.to_array(tensor)
    except Exception as error:  # noqa: BLE001 - onnx's decoder raises ValueError, TypeError, KeyError...
        raise BnfoldError(f"{_label(tensor, where)} cannot be decoded ({type(error).__name__})") from None


def graph_tensors(graph: onnx.GraphProto, where: str = ""):  # noqa: ANN201 - a generator of (tensor, where)
    """Every tensor a graph holds, with what holds it: initializers, sparse parts, attributes, subgraphs."""
    for tensor in graph.initializer:
        yield tensor, f"{where}initializer"
    for sparse in graph.sparse_initializer:
        yield sparse.values, f"{where}sparse initializer"
        yield sparse.indices, f"{where}sparse initializer"
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t, f"{where}{node.op_type} '{node.name[:60]}' attribute"
            elif attr.type == onnx.AttributeProto.TENSORS:
                for t in attr.tensors:
                    yield t, f"{where}{node.op_type} '{node.name[:60]}' attribute"
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from graph_tensors(attr.g, f"{where}subgraph ")
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from graph_tensors(g, f"{where}subgraph ")


def check_model_tensors(model: onnx.ModelProto) -> None:
    """Check every tensor a model holds (initializers, Constant values, subgraphs) against its declaration.

    Raises:
        BnfoldError: The first tensor whose data does not match, named.
    """
    for tensor, where in graph_tensors(model.graph, ""):
        check_tensor(tensor, where)


def external_location(tensor: onnx.TensorProto, where: str = "") -> tuple[str, int, int | None]:
    """``(location, offset, length or None)`` of a tensor stored as external data.

    Raises:
        BnfoldError: No location, or an offset/length that is not a non-negative integer.
    """
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    if not location:
        raise BnfoldError(f"{_label(tensor, where)} is external data without a location")
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        raise BnfoldError(f"{_label(tensor, where)} has a non-integer external data offset or length") from None
    if offset < 0 or (length is not None and length < 0):
        raise BnfoldError(f"{_label(tensor, where)} has a negative external data offset or length")
    return location, offset, length


def declared_bytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes a tensor's declared type and shape take as raw data; None for strings and unknown types."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        return None
    return (math.prod(tensor.dims) * _bits(tensor.data_type, dtype) + 7) // 8


def _expected_bytes(tensor: onnx.TensorProto, where: str) -> int:
    want = declared_bytes(tensor)
    if want is None or tensor.data_type in _PACKED_4BIT:  # memory-mapping cannot unpack 4-bit values
        raise BnfoldError(f"{_label(tensor, where)}: external data of this element type is not supported")
    return want


def shell(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A tensor's declaration without its data: name, element type, dims, doc string."""
    bare = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    if tensor.doc_string:
        bare.doc_string = tensor.doc_string
    return bare


def stored_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    """Make ``tensor`` external data: ``length`` bytes at ``offset`` of ``location``; return it."""
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        _set_entry(tensor, key, value)
    return tensor


def _set_entry(tensor: onnx.TensorProto, key: str, value: str) -> None:
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    tensor.external_data.add(key=key, value=value)


def resolve_external_data(model: onnx.ModelProto, base: Path) -> int:
    """Check every external tensor's file and byte range, and point it at its file by absolute path.

    The data stays on disk: :func:`decode` memory-maps it when a fold asks for it. A
    location must be a relative path inside ``base`` (the model's folder, links resolved),
    and the range must lie inside the file and match the declared shape.

    Returns:
        The external bytes the model references.

    Raises:
        BnfoldError: An absolute or escaping location, a missing file, a range past the
            end of the file or of the wrong size.
    """
    root = base.resolve()
    total = 0
    files: dict[str, tuple[Path, int]] = {}  # location -> (resolved path, size): one lookup per file
    for tensor, where in graph_tensors(model.graph, ""):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        label = _label(tensor, where)
        location, offset, length = external_location(tensor, where)
        if location not in files:
            files[location] = _data_file(root, location, label)
        path, size = files[location]
        want = _expected_bytes(tensor, where)
        if length is not None and length != want:
            raise BnfoldError(
                f"{label} declares {list(tensor.dims)[:8]} ({want} bytes) but its external length is {length}"
            )
        if offset + want > size:
            raise BnfoldError(
                f"{label}: external data range {offset}..{offset + want} lies past the end of '{location[:80]}' "
                f"({size} bytes)"
            )
        _set_entry(tensor, "location", str(path))
        _set_entry(tensor, "length", str(want))
        total += want
    return total


def _data_file(root: Path, location: str, label: str) -> tuple[Path, int]:
    """The checked path and size of an external data file named by ``location`` relative to ``root``."""
    if os.path.isabs(location) or location.startswith(("/", "\\\\")):
        raise BnfoldError(f"{label}: external data location '{location[:80]}' is an absolute path")
    path = (root / location).resolve()
    if not path.is_relative_to(root):
        raise BnfoldError(f"{label}: external data location '{location[:80]}' lies outside the model's folder")
    if not path.is_file():
        raise BnfoldError(f"{label}: external data file '{location[:80]}' does not exist")
    return path, path.stat().st_size


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor of the model (subgraphs and attributes included) stored as external data."""
    return [t for t, _ in graph_tensors(model.graph, "") if t.data_location == onnx.TensorProto.EXTERNAL]


_DESCRIPTORS: dict[str, int] = {}  # external data files open for reading small tensors, a few at a time


def _descriptor(path: str) -> int:
    if path not in _DESCRIPTORS:
        if len(_DESCRIPTORS) >= 8:
            os.close(_DESCRIPTORS.pop(next(iter(_DESCRIPTORS))))
        _DESCRIPTORS[path] = os.open(path, os.O_RDONLY)
    return _DESCRIPTORS[path]


def _map_external(tensor: onnx.TensorProto, where: str) -> np.ndarray:
    location, offset, _ = external_location(tensor, where)
    if not os.path.isabs(location):
        raise BnfoldError(
            f"{_label(tensor, where)} is external data ('{location[:80]}') that was not loaded: "
            "pass the model's path, or onnx.load it with its external data"
        )
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(tensor.dims)
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype)
    try:
        size = math.prod(shape) * dtype.itemsize
        if size < _MAP_FROM_BYTES:  # small: read (a map holds a file descriptor per tensor)
            data = os.pread(_descriptor(location), size, offset)
            if len(data) != size:
                raise OSError(f"{size} bytes expected at offset {offset}, {len(data)} read")
            return np.frombuffer(data, dtype=dtype).reshape(shape)
        return np.memmap(location, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (OSError, ValueError) as error:
        raise BnfoldError(f"{_label(tensor, where)}: external data cannot be read ({error})") from None
