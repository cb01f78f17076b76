"""Loading models from checkpoints without running their code, and saving folded ones."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold import zoo
from bnfold.errors import BnfoldError
from bnfold.io import atomic_write
from bnfold.report import FoldReport

__all__ = [
    "FOLDED_FORMAT",
    "rebuild_folded",
    "TRAINED_FORMAT",
    "build_arch",
    "load_folded",
    "save_folded",
    "state_dict_from",
]

FOLDED_FORMAT = "bnfold.folded/1"
TRAINED_FORMAT = "bnfold.trained/1"
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
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
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


def build_arch(arch: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build a model from a zoo name or ``package.module:callable``.

    Importing ``package.module`` runs that module's code: the user names it.

    Raises:
        BnfoldError: Unknown zoo name, unimportable module, missing callable,
            or a callable that does not return an ``nn.Module``.
    """
    kwargs = kwargs or {}
    if arch in zoo.ZOO:
        factory = zoo.ZOO[arch].factory
    elif ":" in arch:
        module_name, _, attr = arch.partition(":")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())  # `--arch mymodels:build` finds mymodels.py where the user runs bnfold
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except ImportError as error:
            raise BnfoldError(f"--arch {arch}: cannot import {module_name} ({error})") from None
        except AttributeError:
            raise BnfoldError(f"--arch {arch}: {module_name} has no attribute {attr}") from None
    else:
        names = ", ".join(zoo.ZOO)
        raise BnfoldError(f"--arch {arch}: not a zoo name ({names}) nor package.module:callable")
    try:
        model = factory(**kwargs)
    except TypeError as error:
        raise BnfoldError(f"--arch {arch}: {error}") from None
    if not isinstance(model, nn.Module):
        raise BnfoldError(f"--arch {arch}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` strictly into ``model``, naming missing and unexpected keys on failure."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[:3]}")
        raise BnfoldError(f"{source}: does not match the architecture: {'; '.join(parts)}")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise BnfoldError(
            f"{source}: {k} has shape {tuple(state[k].shape)}, the architecture wants {tuple(own[k].shape)}"
        )
    model.load_state_dict(state)
    return model


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


def load_folded(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by :func:`save_folded`: architecture, BN removal, weights."""
    payload = read_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != FOLDED_FORMAT:
        raise BnfoldError(f"{path}: not a bnfold folded checkpoint")
    return rebuild_folded(
        payload["arch"], json.loads(payload["arch_kwargs"]), payload["replaced"], payload["state_dict"], str(path)
    )


def rebuild_folded(
    arch: str, arch_kwargs: dict[str, Any], replaced: dict[str, str], state: dict[str, torch.Tensor], source: str
) -> nn.Module:
    """The architecture with its folded BNs removed (extra ops of BN subclasses kept) and the folded weights."""
    from bnfold.torch_fold.kinds import bn_module

    model = build_arch(arch, arch_kwargs).eval()
    for name in replaced:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        bn = bn_module(getattr(owner, attr))
        setattr(owner, attr, (bn.tail if bn is not None else None) or nn.Identity())
    for key, value in state.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if leaf == "bias" and getattr(owner, "bias", False) is None:
            owner.bias = nn.Parameter(torch.zeros_like(value))  # folding gave this layer a bias
    return load_into(model, state, source).eval()
