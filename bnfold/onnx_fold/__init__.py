"""The ONNX fold pass: BatchNormalization folded into Conv/ConvTranspose/Gemm/MatMul of any producer's graph."""

from bnfold.onnx_fold.files import load_onnx, save_onnx
from bnfold.onnx_fold.fold_model import fold_onnx

__all__ = ["fold_onnx", "load_onnx", "save_onnx"]
