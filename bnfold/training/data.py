"""Training data: scikit-learn's bundled digits (the default, no download), MNIST IDX files, or .npz arrays."""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from bnfold.errors import BnfoldError

__all__ = ["Dataset", "load_dataset"]


@dataclasses.dataclass
class Dataset:
    """Flattened float32 features in [0, 1] and integer labels, split into train and held-out parts."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    side: int  # images are side x side

    @property
    def features(self) -> int:
        """Values per example."""
        return int(self.x_train.shape[1])

    def tensors(self, shape: tuple[int, ...], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs reshaped to ``(N, *shape)`` and labels, for ``split`` ``train`` or ``test``."""
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        return torch.from_numpy(x).reshape(len(x), *shape), torch.from_numpy(y).long()


def _split(name: str, x: np.ndarray, y: np.ndarray, seed: int, side: int) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    return Dataset(name, x[train], y[train], x[test], y[test], side)


def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _split("digits", (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64), seed, 8)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise BnfoldError(f"{path}: not an IDX file of unsigned bytes")
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise BnfoldError(f"{path}: truncated ({body.size} of {int(np.prod(shape))} values)")
    return body.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise BnfoldError(f"{directory}: no {stem}[.gz] (MNIST IDX files expected)")


def _mnist(directory: Path) -> Dataset:
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise BnfoldError(f"{directory}: {prefix} images and labels differ in count")
        parts[split] = (images.reshape(len(images), -1).astype(np.float32) / 255.0, labels.astype(np.int64))
    side = int(round(parts["train"][0].shape[1] ** 0.5))
    return Dataset("mnist", *parts["train"], *parts["test"], side)


def _npz(path: Path, seed: int) -> Dataset:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise BnfoldError(f"{path}: not a readable .npz file ({error})") from None
    if "x" not in data.files or "y" not in data.files:
        raise BnfoldError(f"{path}: needs arrays 'x' and 'y' (and optionally 'x_test', 'y_test')")
    x = data["x"].reshape(len(data["x"]), -1).astype(np.float32)
    y = data["y"].astype(np.int64)
    side = int(round(x.shape[1] ** 0.5))
    if "x_test" in data.files and "y_test" in data.files:
        xt = data["x_test"].reshape(len(data["x_test"]), -1).astype(np.float32)
        return Dataset(path.stem, x, y, xt, data["y_test"].astype(np.int64), side)
    return _split(path.stem, x, y, seed, side)


def load_dataset(source: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
    """Load ``digits`` (default), a directory of MNIST IDX files, or an ``.npz`` with ``x`` and ``y``.

    Raises:
        BnfoldError: Missing or malformed data.
    """
    if source is None or str(source) == "digits":
        return _digits(seed)
    path = Path(source)
    if path.is_dir():
        return _mnist(path)
    if path.is_file() and path.suffix == ".npz":
        return _npz(path, seed)
    raise BnfoldError(f"{path}: expected 'digits', a directory of MNIST IDX files, or an .npz file")
