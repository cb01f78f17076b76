"""Reading and writing ONNX files, external data (models over 2 GB) included, atomically."""

from __future__ import annotations

import atexit
import contextlib
import errno
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError, first_line
from bnfold.model_io.outputs import usual_mode, write_error
from bnfold.onnx_fold.tensors import (
    check_model_tensors,
    declared_bytes,
    decode,
    external_location,
    external_tensors,
    graph_tensors,
    resolve_external_data,
    shell,
    stored_at,
)

__all__ = [
    "PROTOBUF_LIMIT",
    "external_data_files",
    "inline_copy",
    "keeps_data_apart",
    "load_onnx",
    "save_onnx",
    "session_source",
    "uses_external_data",
    "without_field",
]

PROTOBUF_LIMIT = 2**31 - 2**20
_EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the .data file
_ALIGN = 4096
_LAZY_MIN_BYTES = 16 * 2**20  # inline files from this size are read with their weights left in the file
# files whose tensors count as inline when an output's form is chosen: inline .onnx files read with their
# weights left in place (``load_onnx(lazy=True)``) and bnfold's scratch files (resolved paths)
_SELF_CONTAINED: set[str] = set()
_SCRATCH_FILES: list[Path] = []


class Scratch:
    """A data file beside the output for the folded weights of a model whose own weights stay on disk.

    ``bnfold fold`` then holds no folded layer in memory until the save: each is appended here
    (4 KB aligned) and referenced as external data. :func:`save_onnx` with external data into the
    same folder makes this file the output's data file, the other tensors appended to it, so the
    folded weights are written once; an inline output copies them in chunks. A scratch file that
    is not taken over so is removed when the process ends.
    """

    def __init__(self, folder: str | os.PathLike | None = None, name: str = "model.onnx") -> None:
        """Create nothing yet: the file is made on the first :meth:`append`.

        Args:
            folder: Where (the output's folder: the same disk, so the file can become its data
                file); default the temporary folder.
            name: The output's file name, for the scratch file's (hidden) name.
        """
        self.folder = Path(folder) if folder is not None else None
        self.name = name
        self.path: Path | None = None
        self.payload = 0  # bytes appended, padding not counted
        self._handle: Any = None

    def append(self, data: bytes | memoryview | np.ndarray) -> tuple[str, int]:
        """Write ``data`` at the end; return ``(file, offset)``.

        Raises:
            BnfoldError: The scratch file cannot be written (a full disk).
        """
        try:
            if self._handle is None:
                descriptor, name = tempfile.mkstemp(prefix=f".{self.name}.", suffix=".bnfold-scratch", dir=self.folder)
                os.fchmod(descriptor, usual_mode())  # as any file written: it may become the output's data file
                self._handle, self.path = os.fdopen(descriptor, "wb"), Path(name).resolve()
                if not _SCRATCH_FILES:
                    atexit.register(lambda: [f.unlink(missing_ok=True) for f in _SCRATCH_FILES])
                _SCRATCH_FILES.append(self.path)
                _SELF_CONTAINED.add(str(self.path))
            offset = self._handle.tell()
            if offset % _ALIGN:
                self._handle.write(b"\0" * (_ALIGN - offset % _ALIGN))
                offset = self._handle.tell()
            self._handle.write(data)
            self._handle.flush()
        except OSError as error:
            where = self.folder or tempfile.gettempdir()
            raise BnfoldError(
                f"cannot write folded weights to a scratch file in {where} ({error.strerror or error}); "
                "free some space there"
            ) from None
        self.payload += memoryview(data).nbytes
        return str(self.path), offset

    def adoptable(self, model: onnx.ModelProto, directory: Path) -> bool:
        """Whether this file can become the data file of ``model`` saved into ``directory``.

        It must lie there, and every byte written must still be used (no layer folded twice).
        """
        if self.path is None or self.path.parent != directory.resolve():
            return False
        used = sum(external_location(t)[2] or 0 for t in external_tensors(model) if self.holds(t))
        return used == self.payload

    def holds(self, tensor: onnx.TensorProto) -> bool:
        """Whether ``tensor``'s data lies in this file."""
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        return external and self.path is not None and external_location(tensor)[0] == str(self.path)

    def close(self) -> None:
        """Close the file (it stays until moved or the process ends)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def load_onnx(path: str | os.PathLike, *, lazy: bool = False) -> onnx.ModelProto:
    """Load an ONNX file; its external data stays on disk, checked, and is memory-mapped when read.

    Args:
        path: The file.
        lazy: Also leave an inline file's large initializers in the file (16 MB files and up): each
            becomes external data pointing at its own bytes in the file, read when a fold asks for it,
            and written inline again by :func:`save_onnx`. The file must stay unchanged while the model
            is used; meant for load -> fold -> save (``bnfold fold``).

    Raises:
        BnfoldError: Missing, truncated or not an ONNX model; external data that is
            missing, outside the model's folder or shorter than declared.
    """
    p = Path(path)
    if not p.is_file():
        raise BnfoldError(f"{p}: no such file")
    try:
        model = _load_leaving_weights(p) if lazy else None
        if model is None:
            model = onnx.load(str(p), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf readers fail in many ways
        first = first_line(error, 200)
        raise BnfoldError(f"{p}: not a readable ONNX model ({first})") from None
    if not model.graph.node and not model.graph.output:
        raise BnfoldError(f"{p}: not a readable ONNX model (no graph)")
    try:
        resolve_external_data(model, p.parent)
        check_model_tensors(model)
    except BnfoldError as error:
        raise BnfoldError(f"{p}: {error}") from None
    return model


def _load_leaving_weights(path: Path) -> onnx.ModelProto | None:
    """Parse an inline file without its initializers' raw bytes; None for a small or unusual file.

    The protobuf wire format is walked three levels down (model -> graph -> initializer), everything
    but ``raw_data`` is parsed as usual, and each initializer's ``raw_data`` becomes an external-data
    reference to its byte range in this file. So the file's weights are not held twice (file bytes
    and parsed model) while it loads; a tensor is read (memory-mapped) when a fold asks for it.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < _LAZY_MIN_BYTES:
            return None
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        top = _wire_fields(data, 0, size, 10_000)
        graphs = [f for f in top or () if f[0] == 7]
        if top is None or len(graphs) != 1 or graphs[0][1] != 2:
            return None
        model = onnx.ModelProto()
        model.ParseFromString(b"".join(data[f[2] : f[4]] for f in top if f[0] != 7))
        graph_fields = _wire_fields(data, graphs[0][3], graphs[0][4], 1_000_000)
        if graph_fields is None:
            return None
        graph = model.graph
        graph.ParseFromString(b"".join(data[f[2] : f[4]] for f in graph_fields if f[0] != 5))
        location = path.name
        for _, _, _, start, end in (f for f in graph_fields if f[0] == 5):
            tensor = graph.initializer.add()
            fields = _wire_fields(data, start, end, 10_000)
            raw = [f for f in fields or () if f[0] == 9]
            small = not raw or raw[0][4] - raw[0][3] < _EXTERNAL_THRESHOLD
            if fields is None or len(raw) != 1 or raw[0][1] != 2 or small:
                tensor.ParseFromString(data[start:end])
                continue
            tensor.ParseFromString(b"".join(data[f[2] : f[4]] for f in fields if f[0] != 9))
            if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
                tensor.ParseFromString(data[start:end])  # raw bytes beside a reference: leave it to the checks
                continue
            stored_at(tensor, location, raw[0][3], raw[0][4] - raw[0][3])
    finally:
        data.close()
    _SELF_CONTAINED.add(str(path.resolve()))
    return model


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files an ONNX file names (beside it), read without its weights.

    A large inline file is walked, not parsed whole (see :func:`load_onnx`'s ``lazy``).
    """
    p = Path(path)
    model = _load_leaving_weights(p) or onnx.load(str(p), load_external_data=False)
    found = set()
    for tensor in external_tensors(model):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location and location != p.name:  # the file's own bytes (a lazily read tensor) are the file itself
            found.add(p.parent / location)
    return sorted(found)


def _wire_fields(data: Any, start: int, end: int, limit: int) -> list[tuple[int, int, int, int, int]] | None:  # noqa: ANN401
    """``(number, wire type, field start, value start, field end)`` of each field in ``data[start:end]``.

    None when the bytes are not a well-formed message, or hold more than ``limit`` fields (a file
    built to make this walk slow): the normal parser then reads the file, as for a small one.
    """
    fields = []
    position = start
    while position < end:
        if len(fields) >= limit:
            return None
        field_start = position
        key, position = _read_varint(data, position, end)
        if key is None:
            return None
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, value_end = _read_varint(data, position, end)
            if value_end is None:
                return None
            value_start, position = position, value_end
        elif wire in (1, 5):
            value_start, position = position, position + (8 if wire == 1 else 4)
        elif wire == 2:
            length, value_start = _read_varint(data, position, end)
            if length is None:
                return None
            position = value_start + length
        else:
            return None
        if position > end or number == 0:
            return None
        fields.append((number, wire, field_start, value_start, position))
    return fields


def _read_varint(data: Any, position: int, end: int) -> tuple[int | None, int]:  # noqa: ANN401 - bytes or mmap
    value = shift = 0
    while position < end and shift < 64:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    return None, position


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of ``model`` is stored as external data (also a lazily read inline file's)."""
    return bool(external_tensors(model))


def keeps_data_apart(model: onnx.ModelProto) -> bool:
    """Whether the file ``model`` came from keeps tensors in a separate data file (its output should too).

    Tensors that :func:`load_onnx` left in an inline file (``lazy=True``) do not count.
    """
    return any(external_location(t)[0] not in _SELF_CONTAINED for t in external_tensors(model))


def _tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers, inline or external."""
    return sum(declared_bytes(t) or 0 for t in model.graph.initializer)


def inline_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its external data read into memory (for runtimes that take bytes).

    Raises:
        BnfoldError: The model is too large for one protobuf (over 2 GB).
    """
    if not uses_external_data(model):
        return model
    if _tensor_bytes(model) > PROTOBUF_LIMIT:
        raise BnfoldError("the model is over 2 GB: it can only be run from its file")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in external_tensors(copy):
        tensor.CopyFrom(_inlined(tensor))
    return copy


def _inlined(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """An external tensor with its data read into the tensor itself."""
    return numpy_helper.from_array(np.array(decode(tensor)), tensor.name)


_SESSION_FILES: list[Path] = []


def session_source(model: onnx.ModelProto) -> bytes | str:
    """What ONNX Runtime can load ``model`` from: its bytes, or (over 2 GB) a temporary file with external data."""
    if _tensor_bytes(model) <= PROTOBUF_LIMIT:  # an in-memory model over 2 GB cannot serialize either
        return inline_copy(model).SerializeToString()
    folder = Path(tempfile.mkdtemp(prefix="bnfold-session-"))
    if not _SESSION_FILES:
        atexit.register(lambda: [shutil.rmtree(f, ignore_errors=True) for f in _SESSION_FILES])
    _SESSION_FILES.append(folder)
    return str(save_onnx(model, folder / "model.onnx", external_data=True))


def save_onnx(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    scratch: Scratch | None = None,
) -> Path:
    """Write ``model`` atomically; with external data, tensors go to ``<name>.data`` beside it.

    External data is written tensor by tensor (a tensor already on disk is copied in
    chunks), so no copy of the whole model is made and no protobuf over 2 GB is built.

    Args:
        model: The model (not modified, except that tensors in an adopted ``scratch`` then
            point at the output's data file, which holds their bytes).
        path: The output file.
        external_data: Force (True) or forbid (False) external data; by default used
            when the model's tensors are external already or too large for one protobuf.
        scratch: The fold's scratch file: with external data into its folder it becomes the
            output's data file (the folded weights are not written twice).

    Returns:
        The output path.

    Raises:
        BnfoldError: The output cannot be written (one line), or a model over 2 GB
            with ``external_data=False``.
    """
    out = Path(path)
    external = (
        (keeps_data_apart(model) or _tensor_bytes(model) > PROTOBUF_LIMIT) if external_data is None else external_data
    )
    if not external and _tensor_bytes(model) > PROTOBUF_LIMIT:
        raise BnfoldError(f"{out}: the model is over 2 GB: it can only be written with external data")
    directory = out.parent if str(out.parent) else Path(".")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=directory))
    except OSError as error:
        raise write_error(out, error) from None
    try:
        staged = tmp / out.name
        adopted = scratch if external and scratch is not None and scratch.adoptable(model, directory) else None
        if adopted is not None:
            adopted.close()
            _write_streamed(model, staged, adopted.path, f"{out.name}.data", adopted=adopted)
            os.replace(adopted.path, directory / f"{out.name}.data")
            _repoint(model, adopted, directory / f"{out.name}.data")
        elif external:
            _write_streamed(model, staged, tmp / f"{out.name}.data", f"{out.name}.data")
            os.replace(tmp / f"{out.name}.data", directory / f"{out.name}.data")
        else:
            _write_streamed(model, staged, None, "")
        os.replace(staged, out)
    except OSError as error:
        raise write_error(out, error) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _repoint(model: onnx.ModelProto, scratch: Scratch, data: Path) -> None:
    """Tensors whose bytes were in ``scratch`` (now moved to ``data``) read them there."""
    target = str(data.resolve())
    for tensor in external_tensors(model):
        if scratch.holds(tensor):
            _, offset, length = external_location(tensor)
            stored_at(tensor, target, offset, length)
    _SELF_CONTAINED.discard(str(scratch.path))
    scratch.path = None


def _write_streamed(
    model: onnx.ModelProto, staged: Path, data: Path | None, location: str, *, adopted: Scratch | None = None
) -> None:
    """Write the model a tensor at a time: never one serialisation of the whole model.

    The bytes are protobuf's canonical encoding (fields in number order, the graph as one
    field), assembled piece by piece: each message is split around the field written by
    hand (the model around its graph, the graph around its initializers, a tensor around
    its raw data), and each tensor's raw bytes are copied once, straight to the file. The
    lengths are known beforehand from the pieces and the declared data sizes (checked
    against the data as it is written). With ``data``, large tensors go there and the
    file holds references; with ``adopted`` (its file is ``data``), tensors already in it
    stay where they are and the others are appended.
    """
    graph_shell = without_field(model.graph, "initializer")
    for tensor, _ in graph_tensors(graph_shell):  # tensors held in attributes and subgraphs stay inline
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.CopyFrom(_inlined(tensor))
    graph_head, graph_tail = _split(graph_shell, 5)
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(open(data, "ab" if adopted is not None else "wb")) if data is not None else None
        parts = []  # (tensor, encoding before raw_data, after it, raw_data length or None)
        for tensor in model.graph.initializer:
            raw_length = declared_bytes(tensor)
            if store is None and tensor.data_location == onnx.TensorProto.EXTERNAL and raw_length:
                # written inline: its bytes are copied from their file when its turn comes, not held
                parts.append((tensor, *_split(shell(tensor), 9), raw_length))
                continue
            if adopted is not None and adopted.holds(tensor):  # already in the data file: referenced where it is
                _, offset, length = external_location(tensor)
                stored = stored_at(shell(tensor), location, offset, length)
            else:
                stored = _stored(tensor, store, location)
            raw_length = declared_bytes(stored)
            if stored.data_location != onnx.TensorProto.EXTERNAL and stored.HasField("raw_data") and raw_length:
                parts.append((stored, *_split(stored, 9), raw_length))
            else:
                parts.append((stored, stored.SerializeToString(), b"", None))
        if store is not None:
            store.flush()
            os.fsync(store.fileno())
        sizes = [
            len(head) + len(tail) + (0 if raw is None else len(_varint(9 << 3 | 2)) + len(_varint(raw)) + raw)
            for _, head, tail, raw in parts
        ]
        graph_length = len(graph_head) + len(graph_tail) + sum(1 + len(_varint(n)) + n for n in sizes)
        model_head, model_tail = _split(model, 7)
        handle = stack.enter_context(open(staged, "wb"))
        handle.write(model_head + _varint(7 << 3 | 2) + _varint(graph_length) + graph_head)
        for (tensor, head, tail, raw_length), size in zip(parts, sizes, strict=True):
            handle.write(_varint(5 << 3 | 2) + _varint(size) + head)
            if raw_length is not None and tensor.data_location == onnx.TensorProto.EXTERNAL:
                handle.write(_varint(9 << 3 | 2) + _varint(raw_length))
                source, start, _ = external_location(tensor)
                _copy_range(source, start, raw_length, handle, tensor.name)
            elif raw_length is not None:
                raw = tensor.raw_data
                if len(raw) != raw_length:
                    raise BnfoldError(f"tensor '{tensor.name[:80]}' holds {len(raw)} bytes, declares {raw_length}")
                handle.write(_varint(9 << 3 | 2) + _varint(raw_length))
                handle.write(raw)
                del raw
            handle.write(tail)
        handle.write(graph_tail + model_tail)
        handle.flush()
        os.fsync(handle.fileno())


def _fields(message: Any, keep: Callable[[Any], bool]) -> Any:  # noqa: ANN401 - any protobuf message
    """A new message of the same type with the fields ``keep`` accepts.

    Fields are read one by one from the descriptor, so a field left out is never read:
    a tensor's raw bytes or a model's graph are not copied on the way.
    """
    part = type(message)()
    for field in message.DESCRIPTOR.fields:
        if not keep(field):
            continue
        value = getattr(message, field.name)
        if hasattr(value, "extend"):  # a repeated field
            if len(value):
                getattr(part, field.name).extend(value)
        elif message.HasField(field.name):
            if field.message_type is not None:
                getattr(part, field.name).CopyFrom(value)
            else:
                setattr(part, field.name, value)
    return part


def without_field(message: Any, skip: str) -> Any:  # noqa: ANN401 - any protobuf message
    """A copy of a protobuf message without the field ``skip`` (which is never copied)."""
    return _fields(message, lambda field: field.name != skip)


def _split(message: Any, number: int) -> tuple[bytes, bytes]:  # noqa: ANN401 - any protobuf message
    """The encodings of ``message``'s fields numbered below and above ``number`` (that field itself left out)."""
    head = _fields(message, lambda field: field.number < number)
    tail = _fields(message, lambda field: field.number > number)
    return head.SerializeToString(), tail.SerializeToString()


def _stored(tensor: onnx.TensorProto, handle: Any, location: str) -> onnx.TensorProto:  # noqa: ANN401
    """The tensor as written: inline when small or without ``handle``, else its bytes appended there and a reference."""
    external = tensor.data_location == onnx.TensorProto.EXTERNAL
    if handle is None:
        return _inlined(tensor) if external else tensor
    if not external and (declared_bytes(tensor) or 0) < _EXTERNAL_THRESHOLD:  # small, or strings / 4-bit: inline
        return tensor
    offset = handle.tell()
    if offset % _ALIGN:
        handle.write(b"\0" * (_ALIGN - offset % _ALIGN))
        offset = handle.tell()
    if external:
        source, start, length = external_location(tensor)
        length = length if length is not None else 0
        _copy_range(source, start, length, handle, tensor.name)
    else:
        raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
        length = len(raw)
        handle.write(raw)
        del raw
    return stored_at(shell(tensor), location, offset, length)


def _copy_range(source: str, start: int, length: int, handle: Any, name: str) -> None:  # noqa: ANN401 - a file
    """Copy ``length`` bytes of ``source`` from ``start`` to ``handle`` (in the kernel, else 64 MB at a time)."""
    with open(source, "rb") as src:
        if hasattr(os, "copy_file_range") and length:
            handle.flush()
            copied = 0
            try:
                while copied < length:
                    step = os.copy_file_range(src.fileno(), handle.fileno(), length - copied, start + copied)
                    if step == 0:
                        raise OSError(f"external data of '{name}' ends early in {source}")
                    copied += step
                handle.seek(0, os.SEEK_END)
                return
            except OSError as error:
                if copied or error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        src.seek(start)
        left = length
        while left:
            chunk = src.read(min(left, 64 * 2**20))
            if not chunk:
                raise OSError(f"external data of '{name}' ends early in {source}")
            handle.write(chunk)
            left -= len(chunk)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
