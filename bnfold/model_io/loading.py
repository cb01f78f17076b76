"""``bnfold.load``: any supported model file in, a torch module or ONNX model out, no code run by default."""

from __future__ import annotations

import dataclasses
import os
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from bnfold.errors import BnfoldError, first_line
from bnfold.lazy import is_module
from bnfold.model_io.formats import detect_format
from bnfold.onnx_fold import load_onnx

if TYPE_CHECKING:  # torch is imported only for formats that need it: ONNX jobs never load it
    import torch
    from torch import nn

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
        format: What :func:`bnfold.model_io.formats.detect_format` read.
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
    from bnfold import zoo

    return (2, *zoo.ZOO[arch].input_shape) if arch in zoo.ZOO else None


def _with_arch(
    path: Path, state: dict[str, torch.Tensor], arch: str | None, kwargs: dict[str, Any], fmt: str
) -> Loaded:
    if not arch:
        raise BnfoldError(f"{path}: a bare state_dict needs --arch (a zoo name or package.module:callable)")
    from bnfold.model_io.checkpoint import build_for_state, load_into

    model = load_into(build_for_state(arch, kwargs, state, str(path)), state, str(path)).eval()
    return Loaded(model, fmt, arch, kwargs, _zoo_shape(arch))


def _self_describing(path: Path, raw: dict[str, Any], state: dict[str, torch.Tensor], choice: dict[str, Any]) -> Loaded:
    """A bnfold folded or trainer file: its recipe read as data, code built only as :func:`choose_arch` allows."""
    from bnfold.model_io.checkpoint import rebuild_folded
    from bnfold.model_io.recipe import FOLDED_FORMAT, choose_arch, parse_recipe

    recipe = parse_recipe(raw, str(path))
    arch, kwargs = choose_arch(recipe, str(path), **choice)
    if recipe.format == FOLDED_FORMAT:
        model = rebuild_folded(arch, kwargs, recipe.replaced, state, str(path))
        return Loaded(model, "bnfold-folded", arch, kwargs, _zoo_shape(arch))
    loaded = _with_arch(path, state, arch, kwargs, "bnfold-trained")
    loaded.input_shape = (2, *recipe.input_shape) if recipe.input_shape else loaded.input_shape
    return loaded


def load_detailed(
    path: str | os.PathLike,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    *,
    unsafe_pickle: bool = False,
    trust_arch: bool = False,
    lazy_onnx: bool = False,
) -> Loaded:
    """Load a model file of any supported format (detected from its content).

    Args:
        path: bnfold trainer or folded checkpoint, state_dict (.pt/.pth/.bin,
            nested or DDP-prefixed), safetensors, TorchScript archive,
            torch.export program (.pt2) or ONNX file.
        arch: Zoo name or ``package.module:callable`` for bare weights; for
            bnfold's own files it replaces the architecture the file names.
        arch_kwargs: Keyword arguments for ``arch``.
        unsafe_pickle: Allow formats whose loading can run code from the file:
            a whole pickled module, a TorchScript archive, a torch.export
            program. Only for files you trust.
        trust_arch: Build the ``package.module:callable`` that a bnfold file's
            recipe names (imports and runs that code). Without it such a file
            needs ``arch`` naming the code; zoo architectures need neither.
        lazy_onnx: Leave a large inline ONNX file's weights in the file until a fold
            reads them (see :func:`bnfold.onnx_fold.files.load_onnx`).

    Returns:
        The model and what is known about it.

    Raises:
        BnfoldError: Unreadable file, missing ``--arch``, weights that do not
            match it, a format that can run code without ``unsafe_pickle``, or
            a recipe naming code without ``arch``/``trust_arch``.
    """
    p = Path(path)
    kwargs = dict(arch_kwargs or {})
    choice = {"arch": arch, "arch_kwargs": arch_kwargs, "trust_arch": trust_arch}
    fmt = detect_format(p)
    if fmt == "onnx":
        return Loaded(load_onnx(p, lazy=lazy_onnx), fmt)
    import torch

    from bnfold.model_io.checkpoint import read_checkpoint
    from bnfold.model_io.checkpoint import state_dict_from as _state_dict_from

    if fmt == "safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
            with safe_open(str(p), "pt") as handle:
                meta = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise BnfoldError(f"{p}: not a readable safetensors file ({error})") from None
        if str(meta.get("format", "")).startswith("bnfold."):
            return _self_describing(p, meta, state, choice)
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
    obj = _unpickle(p) if unsafe_pickle else read_checkpoint(p)
    if is_module(obj):
        return Loaded(obj.eval(), "pickle")
    if isinstance(obj, dict) and isinstance(obj.get("format"), str) and obj["format"].startswith("bnfold."):
        return _self_describing(p, obj, _state_dict_from(obj, p), choice)
    return _with_arch(p, _state_dict_from(obj, p), arch, kwargs, "state_dict")


def _unpickle(path: Path) -> Any:
    """``torch.load`` without restrictions (the user opted in): classes may live in the working directory."""
    import torch

    from bnfold.model_io.checkpoint import working_directory_importable

    try:
        with working_directory_importable():
            return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as error:
        raise BnfoldError(f"{path}: the pickled model needs code that cannot be found ({error})") from None
    except Exception as error:  # noqa: BLE001 - unpickling runs arbitrary code and fails in many ways
        first = first_line(error)
        raise BnfoldError(f"{path}: not a readable pickled model ({type(error).__name__}: {first})") from None


def load(
    path: str | os.PathLike,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    *,
    unsafe_pickle: bool = False,
    trust_arch: bool = False,
) -> nn.Module | onnx.ModelProto:
    """Load a model file; see :func:`load_detailed` for the formats, options and errors."""
    return load_detailed(path, arch, arch_kwargs, unsafe_pickle=unsafe_pickle, trust_arch=trust_arch).model
