"""bnfold: fold BatchNorm into neighbouring layers, verified and measured.

The public names are imported on first use, so ``import bnfold`` is cheap and an
ONNX-only job (``bnfold.fold_onnx``, the CLI on ``.onnx`` files) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnfold.deploy.bench import benchmark
    from bnfold.deploy.export import export_onnx
    from bnfold.deploy.verify import verify
    from bnfold.errors import BnfoldError
    from bnfold.model_io.loading import load
    from bnfold.onnx_fold import fold_onnx
    from bnfold.report import FoldReport, LayerEntry
    from bnfold.torch_fold import fold
    from bnfold.training import population_statistics

_WHERE = {
    "BnfoldError": "bnfold.errors",
    "FoldReport": "bnfold.report",
    "LayerEntry": "bnfold.report",
    "benchmark": "bnfold.deploy.bench",
    "export_onnx": "bnfold.deploy.export",
    "fold": "bnfold.torch_fold",
    "fold_onnx": "bnfold.onnx_fold",
    "load": "bnfold.model_io.loading",
    "population_statistics": "bnfold.training",
    "verify": "bnfold.deploy.verify",
}

__all__ = [
    "BnfoldError",
    "FoldReport",
    "LayerEntry",
    "benchmark",
    "export_onnx",
    "fold",
    "fold_onnx",
    "load",
    "population_statistics",
    "verify",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:  # noqa: ANN401 - any public object
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_WHERE))
