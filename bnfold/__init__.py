"""bnfold: fold BatchNorm into neighbouring layers, verified and measured."""

from bnfold.errors import BnfoldError
from bnfold.onnx_fold import fold_onnx
from bnfold.report import FoldReport, LayerEntry
from bnfold.torch_fold import fold

__all__ = ["BnfoldError", "FoldReport", "LayerEntry", "fold", "fold_onnx"]
__version__ = "0.1.0"
