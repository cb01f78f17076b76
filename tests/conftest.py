"""Shared helpers: random BN statistics and a float64 equivalence check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnfold.deploy.error_stats import fold_error
from bnfold.zoo import randomize_batchnorm

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 6e-3, torch.bfloat16: 5e-2}


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_batchnorm(model, seed).eval()


def assert_equivalent(original: nn.Module, folded: nn.Module, *inputs: torch.Tensor, tolerance: float | None = None):
    dtype = next(p.dtype for p in folded.parameters())
    stats = fold_error(original, folded, inputs)
    limit = tolerance if tolerance is not None else TOLERANCE[dtype]
    # the original, run in its own dtype, sets the floor a fold can be held to
    floor = fold_error(original, original, inputs).scaled_max
    assert stats.scaled_max <= max(limit, 3 * floor), (stats, floor)
    return stats


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.fixture(scope="session")
def cnn_files(tmp_path_factory):
    """A cnn-bn with random BN statistics as a state_dict (good.pt) and a BN-keeping ONNX export (good.onnx)."""
    from bnfold import zoo
    from bnfold.deploy.export import export_keeping_bn

    d = tmp_path_factory.mktemp("cnn")
    model = randomized(zoo.build("cnn-bn"))
    torch.save(model.state_dict(), d / "good.pt")
    (d / "good.onnx").write_bytes(export_keeping_bn(model, zoo.example_input("cnn-bn")).SerializeToString())
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
