"""Type tests that do not import torch: ONNX-only jobs never load it (it costs seconds and memory).

A value can only be a torch object when torch is imported already, so each test
looks torch up in ``sys.modules`` and answers False when it is not there.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["is_module", "is_script_module", "is_tensor"]


def _torch() -> Any:  # noqa: ANN401 - the torch module, or None
    return sys.modules.get("torch")


def is_module(value: object) -> bool:
    """Whether ``value`` is a ``torch.nn.Module``."""
    torch = _torch()
    return torch is not None and isinstance(value, torch.nn.Module)


def is_script_module(value: object) -> bool:
    """Whether ``value`` is a TorchScript module."""
    torch = _torch()
    return torch is not None and isinstance(value, torch.jit.ScriptModule)


def is_tensor(value: object) -> bool:
    """Whether ``value`` is a ``torch.Tensor``."""
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)
