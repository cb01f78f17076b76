"""bnfold: fold BatchNorm into neighbouring layers, verified and measured."""

from bnfold.bench import benchmark
from bnfold.errors import BnfoldError
from bnfold.export import export_onnx
from bnfold.loading import load
from bnfold.onnx_fold import fold_onnx
from bnfold.report import FoldReport, LayerEntry
from bnfold.torch_fold import fold
from bnfold.training import population_statistics
from bnfold.verify import verify

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
