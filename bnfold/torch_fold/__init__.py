"""The PyTorch fold pass: BatchNorm modules folded into neighbouring Conv/Linear layers."""

from bnfold.torch_fold.fold_module import fold

__all__ = ["fold"]
