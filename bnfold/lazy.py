"""Type tests that do not import torch: ONNX-only jobs never load it (it costs seconds and memory).

A value can only be a torch object when torch is imported already, so each test
looks torch up in ``sys.modules`` and answers False when it is not there.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["is_module", "is_script_module", "is_tensor", "torch_if_loaded"]


def torch_if_loaded() -> Any:  # noqa: ANN401 - the torch module, or None
    """The torch module if something imported it already, else None (never imports it)."""
    return sys.modules.get("torch")


def is_module(value: object) -> bool:
    """Whether ``value`` is a ``torch.nn.Module``."""
    torch = torch_if_loaded()
    return torch is not None and isinstance(value, torch.nn.Module)


def is_script_module(value: object) -> bool:
    """Whether ``value`` is a TorchScript module."""
    torch = torch_if_loaded()
    return torch is not None and isinstance(value, torch.jit.ScriptModule)


def is_tensor(value: object) -> bool:
    """Whether ``value`` is a ``torch.Tensor``."""
    torch = torch_if_loaded()
    return torch is not None and isinstance(value, torch.Tensor)
