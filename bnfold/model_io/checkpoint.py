"""Loading models from checkpoints without running their code, and saving folded ones."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold import zoo
from bnfold.errors import BnfoldError, first_line
from bnfold.model_io.outputs import atomic_write
from bnfold.model_io.recipe import FOLDED_FORMAT, TRAINED_FORMAT, choose_arch, parse_recipe
from bnfold.report import FoldReport

__all__ = [
    "FOLDED_FORMAT",
    "TRAINED_FORMAT",
    "build_arch",
    "build_for_state",
    "check_state",
    "import_named",
    "load_folded",
    "load_into",
    "read_checkpoint",
    "rebuild_folded",
    "save_folded",
    "state_dict_from",
    "trained_checkpoint",
    "working_directory_importable",
]

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net")


def _unwrap(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if key in obj:
                found = _unwrap(obj[key])
                if found is not None:
                    return found
    return None


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, no code runs.

    Raises:
        BnfoldError: The file is missing, not a torch checkpoint, or holds
            pickled objects (which would run code when loaded).
    """
    p = Path(path)
    if not p.is_file():
        raise BnfoldError(f"{p}: no such file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found is None:
            raise BnfoldError(f"{p}: not a readable PyTorch checkpoint (invalid pickle data)") from None
        raise BnfoldError(
            f"{p}: holds a pickled {found.group(1)}, which runs code when loaded; bnfold loads weights only "
            "(pass --unsafe-pickle, or unsafe_pickle=True, only for a file you trust)"
        ) from None
    except Exception as error:  # noqa: BLE001 - a damaged archive fails in the zip, pickle or storage layers
        first = first_line(error, 200)
        raise BnfoldError(f"{p}: not a readable PyTorch checkpoint ({first})") from None


def state_dict_from(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict in a loaded checkpoint: also nested under ``state_dict``/``model``, without DDP's ``module.``.

    Raises:
        BnfoldError: The object holds no state_dict.
    """
    state = _unwrap(obj)
    if state is None:
        raise BnfoldError(f"{path}: holds no state_dict (a dict of tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


@contextlib.contextmanager
def working_directory_importable() -> Iterator[None]:
    """Let ``import`` find modules in the working directory for the duration (the user's ``--arch mymodels:build``).

    Appended, not prepended, so it never shadows an installed package; removed afterwards.
    """
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def import_named(spec: str, flag: str) -> Any:  # noqa: ANN401 - whatever the user's module holds
    """The object ``package.module:attr.path`` names, the working directory importable while importing.

    Importing runs that module's code: only for code the user named on the command line.

    Raises:
        BnfoldError: A module that fails to import (whatever it raises), or a missing attribute.
    """
    module_name, _, attr = spec.partition(":")
    try:
        with working_directory_importable():
            target = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise BnfoldError(f"{flag} {spec}: {module_name} has no attribute {attr}") from None
    except Exception as error:  # noqa: BLE001 - importing runs the module, which may raise anything
        raise BnfoldError(f"{flag} {spec}: cannot import {module_name} ({_first_line(error)})") from None
    return target


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error)}"


def build_arch(arch: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build a model from a zoo name or ``package.module:callable``.

    Importing ``package.module`` runs that module's code: only call this with
    code the user named (see :func:`bnfold.model_io.recipe.choose_arch` for files).

    Raises:
        BnfoldError: Unknown zoo name, a module that fails to import, missing
            callable, a callable that fails or does not return an ``nn.Module``.
    """
    kwargs = kwargs or {}
    if arch in zoo.ZOO:
        factory = zoo.ZOO[arch].factory
    elif ":" in arch:
        factory = import_named(arch, "--arch")
    else:
        names = ", ".join(zoo.ZOO)
        raise BnfoldError(f"--arch {arch}: not a zoo name ({names}) nor package.module:callable")
    try:
        model = factory(**kwargs)
    except MemoryError:
        raise BnfoldError(f"--arch {arch}: building it with {kwargs} ran out of memory") from None
    except Exception as error:  # noqa: BLE001 - the factory decides what it accepts
        raise BnfoldError(f"--arch {arch}: building it failed ({_first_line(error)})") from None
    if not isinstance(model, nn.Module):
        raise BnfoldError(f"--arch {arch}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_for_state(
    arch: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor], source: str, replaced: Iterable[str] = ()
) -> nn.Module:
    """Build ``arch`` for ``state``; a zoo architecture is first built without memory (meta device) and checked.

    A file's keyword arguments could ask for a model of any size: the meta
    build costs no tensor memory, and its keys and shapes must match the
    file's weights before the real build allocates anything.

    Raises:
        BnfoldError: The architecture does not match the weights, or
            ``replaced`` names a module that is not a BatchNorm.
    """
    if arch in zoo.ZOO:
        with torch.device("meta"):
            skeleton = build_arch(arch, kwargs)
        check_state(skeleton, state, source, replaced=replaced)
    return build_arch(arch, kwargs)


def _replaced_modules(model: nn.Module, replaced: Iterable[str], source: str) -> dict[str, nn.Module]:
    """The modules a folded checkpoint says it replaced; each must exist and hold BN statistics."""
    found = {}
    for name in replaced:
        parent, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(parent) if parent else model
        except AttributeError:
            owner = None
        child = owner._modules.get(attr) if isinstance(owner, nn.Module) else None
        if not isinstance(child, nn.Module):
            raise BnfoldError(f"{source}: the recipe replaces {name}, which the architecture does not have")
        buffers = dict(child.named_buffers(recurse=False))
        if not isinstance(child, _BatchNorm) and not {"running_mean", "running_var"} <= set(buffers):
            raise BnfoldError(f"{source}: the recipe replaces {name}, which is not a BatchNorm module")
        found[name] = child
    return found


def _without(model: nn.Module, replaced: Iterable[str], source: str) -> nn.Module:
    """``model`` with the named BN modules replaced as a folded checkpoint records (refusing non-BN names)."""
    from bnfold.torch_fold.recognise import bn_module

    for name, child in _replaced_modules(model, replaced, source).items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        bn = bn_module(child)
        if bn is None:
            raise BnfoldError(f"{source}: the recipe replaces {name}, which is not a BatchNorm module")
        owner._modules[attr] = (bn.tail if bn.tail is not None else None) or nn.Identity()
    return model


def check_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, *, replaced: Iterable[str] = ()) -> None:
    """Refuse a state_dict whose keys or shapes differ from ``model``'s (a folded layer may gain a bias).

    Args:
        model: The architecture (tensors may be on the meta device).
        state: The file's weights.
        source: The file, for messages.
        replaced: BN modules a folded checkpoint removed: their own tensors are not expected.

    Raises:
        BnfoldError: Missing or unexpected keys, or a shape that differs; named.
    """
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, child in _replaced_modules(model, replaced, source).items():
        for leaf, _ in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
            own.pop(f"{name}.{leaf}", None)
    for key, value in state.items():
        owner_name, _, leaf = key.rpartition(".")
        if leaf == "bias" and key not in own and f"{owner_name}.weight" in own or key == "bias" and "weight" in own:
            try:
                owner = model.get_submodule(owner_name) if owner_name else model
            except AttributeError:
                continue
            if getattr(owner, "bias", False) is None and isinstance(value, torch.Tensor) and value.dim() == 1:
                own[key] = tuple(value.shape)  # folding gave this layer a bias
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[:3]}")
        raise BnfoldError(f"{source}: does not match the architecture: {'; '.join(parts)}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or tuple(v.shape) != own[k]]
    if bad:
        k = bad[0]
        found = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
        raise BnfoldError(f"{source}: {k} has shape {found}, the architecture wants {own[k]}")


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` strictly into ``model``, naming missing and unexpected keys on failure."""
    check_state(model, state, source)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise BnfoldError(f"{source}: the weights do not load into the architecture ({_first_line(error)})") from None
    return model


def trained_checkpoint(
    model: nn.Module, arch: str, arch_kwargs: dict[str, Any] | None, input_shape: tuple[int, ...], **extra: Any
) -> dict[str, Any]:
    """A self-describing, weights-only-loadable checkpoint of a model with population statistics.

    ``bnfold train`` and ``bnfold stats`` write it; ``bnfold fold`` rebuilds the model with no ``--arch``.

    Args:
        model: The model.
        arch: Its architecture (zoo name or ``package.module:callable``).
        arch_kwargs: The architecture's keyword arguments.
        input_shape: One example's shape, without the batch axis.
        **extra: More entries (how the statistics were computed, config, metrics).
    """
    return {
        "format": TRAINED_FORMAT,
        "arch": arch,
        "arch_kwargs": json.dumps(arch_kwargs or {}),
        "input_shape": list(input_shape),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def save_folded(
    path: str | os.PathLike,
    model: nn.Module,
    report: FoldReport,
    arch: str,
    arch_kwargs: dict[str, Any] | None,
) -> None:
    """Write a folded model as a weights-only checkpoint that :func:`load_folded` rebuilds.

    Raises:
        BnfoldError: The model was rewritten as an fx graph (a functional
            batch_norm was removed), which a state_dict cannot describe.
    """
    if isinstance(model, torch.fx.GraphModule):
        raise BnfoldError("this model was folded as an fx graph (functional batch_norm); write it as .onnx instead")
    replaced = {entry.name: entry.kind for entry in report.layers if entry.folded}
    payload = {
        "format": FOLDED_FORMAT,
        "arch": arch,
        "arch_kwargs": json.dumps(arch_kwargs or {}),
        "replaced": replaced,
        "report": report.to_json(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_folded(path: str | os.PathLike, **choice: Any) -> nn.Module:
    """Rebuild a model written by :func:`save_folded`: architecture, BN removal, weights.

    Args:
        path: The folded checkpoint.
        **choice: ``arch``, ``arch_kwargs``, ``trust_arch`` as for :func:`bnfold.model_io.recipe.choose_arch`.

    Raises:
        BnfoldError: Not a folded checkpoint, a malformed recipe, or one naming
            code the user did not name.
    """
    payload = read_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != FOLDED_FORMAT:
        raise BnfoldError(f"{path}: not a bnfold folded checkpoint")
    recipe = parse_recipe(payload, str(path))
    arch, kwargs = choose_arch(recipe, str(path), **choice)
    return rebuild_folded(arch, kwargs, recipe.replaced, state_dict_from(payload, path), str(path))


def rebuild_folded(
    arch: str, arch_kwargs: dict[str, Any], replaced: dict[str, str], state: dict[str, torch.Tensor], source: str
) -> nn.Module:
    """The architecture with its folded BNs removed (extra ops of BN subclasses kept) and the folded weights.

    ``arch`` must be one the caller may build (:func:`bnfold.model_io.recipe.choose_arch`);
    ``replaced`` must name BatchNorm modules of it.
    """
    model = _without(build_for_state(arch, arch_kwargs, state, source, replaced).eval(), replaced, source)
    for key, value in state.items():
        owner_name, _, leaf = key.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            continue  # load_into names the unexpected key
        if leaf == "bias" and getattr(owner, "bias", False) is None and isinstance(value, torch.Tensor):
            owner.bias = nn.Parameter(torch.zeros_like(value))  # folding gave this layer a bias
    return load_into(model, state, source).eval()
