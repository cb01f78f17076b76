"""Batches from a user's data for population statistics: arrays, IDX files, image folders, their own code.

Every source yields ``(inputs, labels or None)`` batches of float32 tensors shaped for the
model, each rank of a torchrun job reading its own shard: batch ``b`` of the whole source
goes to rank ``b % world``, so the ranks together see exactly the batches one process
sees (batch statistics, and so every later BN's input, depend on how samples are batched).
Problems a user can fix (no such file, an empty source, a shape the model does not take, a
file that is not what its name says) raise :class:`BnfoldError` in one line.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnfold.errors import BnfoldError, first_line

__all__ = ["ImageOptions", "Source", "open_source"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclasses.dataclass
class ImageOptions:
    """How an image folder is turned into tensors.

    Attributes:
        resize: The shorter side is resized to this (None: as stored).
        crop: A centred square crop of this side (None: none).
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided by.
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


@dataclasses.dataclass
class Source:
    """Batches of one rank's shard, and what is known of the whole source."""

    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]
    samples: int | None  # in the whole source, where known
    kind: str
    has_labels: bool


def _starts(n: int, batch_size: int, rank: int, world: int) -> range:
    """Where this rank's batches start: every ``world``-th batch of the whole source."""
    return range(rank * batch_size, n, world * batch_size)


def _batched(
    x: np.ndarray, y: np.ndarray | None, batch_size: int, shape: tuple[int, ...] | None, rank: int, world: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    for start in _starts(len(x), batch_size, rank, world):
        xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32))
        if shape is not None:
            xb = xb.reshape(len(xb), *shape)
        yb = torch.from_numpy(np.asarray(y[start : start + batch_size]).astype(np.int64)) if y is not None else None
        yield xb, yb


def _check_shape(x: np.ndarray, shape: tuple[int, ...] | None, source: str) -> tuple[int, ...] | None:
    """The per-sample shape to reshape to, or a one-line error when the data cannot take the model's shape."""
    if len(x) == 0:
        raise BnfoldError(f"{source}: no samples")
    if shape is None or tuple(x.shape[1:]) == tuple(shape):
        return None
    if math.prod(x.shape[1:]) == math.prod(shape) and len(shape) != len(x.shape[1:]):
        return tuple(shape)  # flat rows for an image model, or images for a flat model: same values
    raise BnfoldError(
        f"{source}: samples of shape {list(x.shape[1:])} do not fit the model's input {list(shape)} "
        "(channels, size or layout differ)"
    )


def _arrays(path: Path, labels: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    if path.suffix == ".npz":
        from bnfold.model_io.formats import check_npz

        check_npz(path)  # a stranger's archive may be a decompression bomb
    try:
        data = np.load(path, allow_pickle=False, mmap_mode="r" if path.suffix == ".npy" else None)
    except (OSError, ValueError, EOFError) as error:
        raise BnfoldError(f"{path}: not a readable .npy/.npz file ({first_line(error)})") from None
    if isinstance(data, np.ndarray):
        x, y = data, None
    else:
        keys = list(data.files)
        if not keys:
            raise BnfoldError(f"{path}: the archive holds no arrays")
        x_key = next((k for k in ("x", "inputs", "images", "data") if k in keys), keys[0])
        y_key = next((k for k in ("y", "labels", "targets") if k in keys and k != x_key), None)
        x, y = data[x_key], (data[y_key] if y_key else None)
    if labels is not None:
        y = _read_labels(labels)
    return x, y


def _read_labels(path: Path) -> np.ndarray:
    if path.suffix in (".npy", ".npz"):
        x, _ = _arrays(path, None)
        return np.asarray(x)
    return _idx(path)


def _idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): magic 0 0 type ndim, big-endian dims, then the values."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
            if len(head) != 4 or head[:2] != b"\0\0" or head[2] not in _IDX_TYPES or not 1 <= head[3] <= 4:
                raise BnfoldError(f"{path}: not an IDX file (bad magic number)")
            dims = struct.unpack(f">{head[3]}I", handle.read(4 * head[3]))
            dtype = np.dtype(_IDX_TYPES[head[2]])
            want = math.prod(dims) * dtype.itemsize
            raw = handle.read(want + 1)
    except OSError as error:
        raise BnfoldError(f"{path}: cannot read ({error.strerror or error})") from None
    except struct.error:
        raise BnfoldError(f"{path}: not an IDX file (truncated header)") from None
    if len(raw) != want:
        raise BnfoldError(f"{path}: IDX header declares {list(dims)} ({want} bytes) but the file holds {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).reshape(dims)


def _image_folder(path: Path, options: ImageOptions) -> tuple[list[Path], np.ndarray, list[str]]:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise BnfoldError(f"{path}: an image folder needs one subfolder per class")
    files, labels = [], []
    for index, name in enumerate(classes):
        for file in sorted((path / name).rglob("*")):
            if file.suffix.lower() in _IMAGE_SUFFIXES and file.is_file():
                files.append(file)
                labels.append(index)
    if not files:
        raise BnfoldError(f"{path}: no images in its class subfolders ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    return files, np.asarray(labels), classes


def _load_image(file: Path, channels: int, options: ImageOptions) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if options.resize:
                w, h = image.size
                scale = options.resize / min(w, h)
                image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
            if options.crop:
                w, h = image.size
                if options.crop > min(w, h):
                    raise BnfoldError(f"{file}: {w}x{h} is smaller than the crop {options.crop}")
                left, top = (w - options.crop) // 2, (h - options.crop) // 2
                image = image.crop((left, top, left + options.crop, top + options.crop))
            array = np.asarray(image, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as error:
        raise BnfoldError(f"{file}: not a readable image ({first_line(error)})") from None
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    mean = np.asarray(options.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(options.std, dtype=np.float32).reshape(-1, 1, 1)
    return (array - mean) / std


def _image_batches(
    files: list[Path],
    labels: np.ndarray,
    batch_size: int,
    shape: tuple[int, ...] | None,
    options: ImageOptions,
    rank: int,
    world: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    channels = shape[0] if shape else 3
    for start in _starts(len(files), batch_size, rank, world):
        images = [_load_image(f, channels, options) for f in files[start : start + batch_size]]
        sizes = {im.shape for im in images}
        if len(sizes) != 1:
            raise BnfoldError(f"images of different sizes {sorted(sizes)[:3]}: pass --resize and --crop")
        x = np.stack(images)
        if shape is not None and tuple(x.shape[1:]) != tuple(shape):
            raise BnfoldError(
                f"images become {list(x.shape[1:])} but the model takes {list(shape)}: set --resize/--crop"
            )
        yield torch.from_numpy(x), torch.from_numpy(labels[start : start + batch_size].astype(np.int64))


def _from_code(
    spec: str, batch_size: int, rank: int, world: int
) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor | None]], str]:
    from bnfold.model_io.checkpoint import import_named

    target = import_named(spec, "--data")
    if isinstance(target, type) and issubclass(target, torch.utils.data.Dataset):
        try:
            dataset = target()
        except Exception as error:  # noqa: BLE001
            raise BnfoldError(
                f"--data {spec}: the Dataset raised {type(error).__name__}: {first_line(error)}"
            ) from None
        if hasattr(dataset, "__len__") and not len(dataset):
            raise BnfoldError(f"--data {spec}: the Dataset is empty")
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        return (_pair(b) for i, b in enumerate(loader) if i % world == rank), "dataset"
    if not callable(target):
        raise BnfoldError(f"--data {spec}: not a callable or a torch Dataset class")
    try:
        batches = target()
    except Exception as error:  # noqa: BLE001
        raise BnfoldError(f"--data {spec}: it raised {type(error).__name__}: {first_line(error)}") from None
    return (_pair(b) for i, b in enumerate(batches) if i % world == rank), "callable"


def _pair(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:  # noqa: ANN401 - a user's batch
    if isinstance(batch, torch.Tensor | np.ndarray):
        return torch.as_tensor(batch, dtype=torch.float32), None
    if isinstance(batch, list | tuple) and batch:
        y = torch.as_tensor(batch[1]) if len(batch) > 1 and batch[1] is not None else None
        return torch.as_tensor(batch[0], dtype=torch.float32), y
    raise BnfoldError(f"a batch must be a tensor or an (inputs, labels) pair, got {type(batch).__name__}")


def open_source(
    spec: str,
    *,
    batch_size: int,
    input_shape: tuple[int, ...] | None,
    labels: str | None = None,
    images: ImageOptions | None = None,
    rank: int = 0,
    world: int = 1,
) -> Source:
    """Open a data source for this rank.

    Args:
        spec: A ``.npy``/``.npz`` file, an IDX file (MNIST's ``*-idx3-ubyte``), a folder of
            class subfolders of images, or ``package.module:name`` naming a function that
            returns an iterable of batches or a ``torch.utils.data.Dataset`` class.
        batch_size: Samples per batch (files and folders).
        input_shape: One sample's shape as the model takes it (no batch axis), to check
            and reshape to; None to take the data as it is.
        labels: A separate labels file (``.npy``/``.npz`` or IDX) for arrays and IDX data.
        images: Resizing, cropping and normalisation for an image folder.
        rank: This process's rank under torchrun.
        world: The number of processes.

    Raises:
        BnfoldError: A missing or unreadable source, an empty one, or samples that do not fit ``input_shape``.
    """
    if batch_size < 1:
        raise BnfoldError("--batch-size must be positive")
    path = Path(spec)
    if ":" in spec and not path.exists():
        batches, kind = _from_code(spec, batch_size, rank, world)
        return Source(batches, None, kind, has_labels=True)
    if not path.exists():
        raise BnfoldError(f"--data {spec}: no such file or folder")
    label_path = Path(labels) if labels else None
    if label_path is not None and not label_path.is_file():
        raise BnfoldError(f"--labels {labels}: no such file")
    if path.is_dir():
        files, y, _ = _image_folder(path, images or ImageOptions())
        batches = _image_batches(files, y, batch_size, input_shape, images or ImageOptions(), rank, world)
        return Source(batches, len(files), "image folder", True)
    if path.suffix in (".npy", ".npz"):
        x, y = _arrays(path, label_path)
        kind = path.suffix[1:]
    else:
        raw = _idx(path)
        x = raw.astype(np.float32) / 255.0 if raw.dtype == np.uint8 else raw.astype(np.float32)
        y = _read_labels(label_path) if label_path else None
        kind = "idx"
    if x.ndim < 2:
        raise BnfoldError(f"--data {spec}: expected samples along the first axis, got shape {list(x.shape)}")
    if y is not None and len(y) != len(x):
        raise BnfoldError(f"--data {spec}: {len(x)} samples but {len(y)} labels")
    reshape = _check_shape(x, input_shape, f"--data {spec}")
    return Source(_batched(x, y, batch_size, reshape, rank, world), len(x), kind, y is not None)
