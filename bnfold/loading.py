"""``bnfold.load``: any supported model file in, a torch module or ONNX model out, no code run by default."""

from __future__ import annotations

import dataclasses
import json
import os
import types
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from bnfold import zoo
from bnfold.checkpoint import (
    FOLDED_FORMAT,
    TRAINED_FORMAT,
    build_arch,
    load_folded,
    load_into,
    read_checkpoint,
    rebuild_folded,
)
from bnfold.checkpoint import state_dict_from as _state_dict_from
from bnfold.errors import BnfoldError
from bnfold.formats import detect_format
from bnfold.onnx_fold import load_onnx

__all__ = ["Loaded", "load", "load_detailed"]

# Formats whose loader can run code from the file: refused unless the user opts in.
_CODE_FORMATS = {
    "torchscript": "a TorchScript archive, whose code is compiled and run when it loads and runs",
    "torch-export": "a torch.export program, parts of which torch unpickles without restriction (this can run code)",
}


@dataclasses.dataclass
class Loaded:
    """A loaded model and what is known about it.

    Attributes:
        model: An ``nn.Module`` (TorchScript and torch.export programs included) or ``onnx.ModelProto``.
        format: What :func:`bnfold.formats.detect_format` read.
        arch: Architecture name or ``module:callable``, when known.
        arch_kwargs: Its keyword arguments.
        input_shape: One input's shape with batch axis, when known.
    """

    model: nn.Module | onnx.ModelProto
    format: str
    arch: str | None = None
    arch_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None


def _zoo_shape(arch: str | None) -> tuple[int, ...] | None:
    return (2, *zoo.ZOO[arch].input_shape) if arch in zoo.ZOO else None


def _with_arch(
    path: Path, state: dict[str, torch.Tensor], arch: str | None, kwargs: dict[str, Any], fmt: str
) -> Loaded:
    if not arch:
        raise BnfoldError(f"{path}: a bare state_dict needs --arch (a zoo name or package.module:callable)")
    model = load_into(build_arch(arch, kwargs), state, str(path)).eval()
    return Loaded(model, fmt, arch, kwargs, _zoo_shape(arch))


def load_detailed(
    path: str | os.PathLike,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    *,
    unsafe_pickle: bool = False,
) -> Loaded:
    """Load a model file of any supported format (detected from its content).

    Args:
        path: bnfold trainer or folded checkpoint, state_dict (.pt/.pth/.bin,
            nested or DDP-prefixed), safetensors, TorchScript archive,
            torch.export program (.pt2) or ONNX file.
        arch: Zoo name or ``package.module:callable`` for bare weights.
        arch_kwargs: Keyword arguments for ``arch``.
        unsafe_pickle: Allow formats whose loading can run code from the file:
            a whole pickled module, a TorchScript archive, a torch.export
            program. Only for files you trust.

    Returns:
        The model and what is known about it.

    Raises:
        BnfoldError: Unreadable file, missing ``--arch``, weights that do not
            match it, or a format that can run code without ``unsafe_pickle``.
    """
    p = Path(path)
    kwargs = dict(arch_kwargs or {})
    fmt = detect_format(p)
    if fmt == "onnx":
        return Loaded(load_onnx(p), fmt)
    if fmt == "safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
            with safe_open(str(p), "pt") as handle:
                meta = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise BnfoldError(f"{p}: not a readable safetensors file ({error})") from None
        if meta.get("format") == FOLDED_FORMAT:
            arch, kwargs = meta["arch"], json.loads(meta["arch_kwargs"])
            model = rebuild_folded(arch, kwargs, json.loads(meta["replaced"]), state, str(p))
            return Loaded(model, "bnfold-folded", arch, kwargs, _zoo_shape(arch))
        return _with_arch(p, state, arch, kwargs, fmt)
    if fmt in _CODE_FORMATS and not unsafe_pickle:
        raise BnfoldError(
            f"{p}: {_CODE_FORMATS[fmt]}; pass --unsafe-pickle (unsafe_pickle=True) only for a file you trust"
        )
    if fmt == "torchscript":
        try:
            return Loaded(torch.jit.load(str(p), map_location="cpu").eval(), fmt)
        except RuntimeError as error:
            raise BnfoldError(f"{p}: not a readable TorchScript archive ({str(error).splitlines()[0][:160]})") from None
    if fmt == "torch-export":
        try:
            program = torch.export.load(str(p))
        except Exception as error:  # noqa: BLE001 - the deserializer raises many kinds
            raise BnfoldError(f"{p}: not a readable torch.export program ({type(error).__name__})") from None
        example = program.example_inputs[0] if program.example_inputs else ()
        shape = tuple(example[0].shape) if example and isinstance(example[0], torch.Tensor) else None
        module = program.module()
        # an exported program is fixed in the mode it was exported in; train()/eval() raise on it
        module.train = types.MethodType(lambda self, mode=True: self, module)
        module.eval = types.MethodType(lambda self: self, module)
        return Loaded(module, fmt, input_shape=shape)
    if unsafe_pickle:
        obj = torch.load(p, map_location="cpu", weights_only=False)
        if isinstance(obj, nn.Module):
            return Loaded(obj.eval(), "pickle")
    else:
        obj = read_checkpoint(p)
    if isinstance(obj, dict) and obj.get("format") == FOLDED_FORMAT:
        folded = load_folded(p)
        arch = obj["arch"]
        return Loaded(folded, "bnfold-folded", arch, json.loads(obj["arch_kwargs"]), _zoo_shape(arch))
    if isinstance(obj, dict) and obj.get("format") == TRAINED_FORMAT:
        arch, kwargs = obj["arch"], json.loads(obj["arch_kwargs"])
        loaded = _with_arch(p, obj["state_dict"], arch, kwargs, "bnfold-trained")
        loaded.input_shape = (2, *obj["input_shape"])
        return loaded
    return _with_arch(p, _state_dict_from(obj, p), arch, kwargs, "state_dict")


def load(
    path: str | os.PathLike,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    *,
    unsafe_pickle: bool = False,
) -> nn.Module | onnx.ModelProto:
    """Load a model file; see :func:`load_detailed` for the formats and errors."""
    return load_detailed(path, arch, arch_kwargs, unsafe_pickle=unsafe_pickle).model
