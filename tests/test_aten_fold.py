"""BN in torch.export programs: folded into the aten conv/linear before it, with the twins that must not fold."""

import pytest
import torch
from conftest import randomized
from test_torch_fold import Residual

import bnfold
from bnfold import zoo


def _exported(model, x):
    return torch.export.export(randomized(model), (x,)).module()


@pytest.mark.parametrize("name", ["mlp-bn", "cnn-bn", "resnet-tiny", "conv1d-bn", "conv3d-bn", "deconv-groups"])
def test_exported_zoo_models_fold(name):
    x = zoo.example_input(name)
    gm = _exported(zoo.build(name), x)
    expected = gm(x)
    folded, report = bnfold.fold(gm)
    assert report.method == "torch.export" and report.bn_kept == 0 and report.bn_total > 0
    assert "batch_norm" not in folded.code
    assert torch.allclose(folded(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert "batch_norm" in gm.code  # the input program is untouched


def test_an_exported_program_itself_folds_and_is_left_unchanged():
    """``bnfold.fold(torch.export.export(...))``: the program's module is folded, the program keeps its BN."""
    x = zoo.example_input("cnn-bn")
    program = torch.export.export(randomized(zoo.build("cnn-bn")), (x,))
    expected = program.module()(x)
    folded, report = bnfold.fold(program)
    assert report.method == "torch.export" and report.bn_kept == 0 and report.bn_total > 0
    assert "batch_norm" not in folded.code
    assert torch.allclose(folded(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    again = program.module()
    assert "batch_norm" in again.code and torch.equal(again(x), expected)  # weights and graph untouched


def test_exported_negative_cases():
    x = zoo.example_input("mlp-bn-before")
    gm = _exported(zoo.build("mlp-bn-before"), x)
    expected = gm(x)
    folded, report = bnfold.fold(gm)  # BN before a Linear: into the following layer (every rule runs on aten)
    assert report.bn_kept == 0 and {e.action for e in report.layers} == {"folded into following"}
    assert torch.allclose(folded(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    x = torch.randn(2, 4, 6, 6)
    gm = _exported(Residual(), x)
    expected = gm(x)
    folded, report = bnfold.fold(gm)
    assert report.bn_kept == 1 and "also read by" in report.layers[0].reason
    assert torch.allclose(folded(x), expected)


def test_exported_linear_on_3d_input_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5))
    x = torch.randn(4, 5, 6)
    gm = _exported(model, x)
    expected = gm(x)
    folded, report = bnfold.fold(gm)
    assert report.bn_kept == 1 and "axis 2" in report.layers[0].reason
    assert torch.allclose(folded(x), expected)


class _CatBN(torch.nn.Module):
    """Two convs concatenated (along ``dim``), then one BN over the result."""

    def __init__(self, dim: int = 1, third: bool = False):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 2, 1, bias=False)
        self.dim, self.third = dim, third
        self.bn = torch.nn.BatchNorm2d(6 if dim == 1 else 4)

    def forward(self, x):
        if self.dim == 1:
            parts = [self.a(x), self.b(x)] if not self.third else [self.a(x), torch.relu(self.b(x))]
        else:
            parts = [self.a(x), self.a(x).neg()]
        return self.bn(torch.cat(parts, dim=self.dim))


def test_exported_concat_folds_into_each_producer():
    x = torch.randn(2, 3, 5, 5)
    gm = _exported(_CatBN(), x)
    expected = gm(x)
    folded, report = bnfold.fold(gm)
    assert report.bn_kept == 0 and report.layers[0].action == "folded into producers"
    assert len(report.layers[0].targets) == 2 and "batch_norm" not in folded.code
    assert torch.allclose(folded(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize(
    ("model", "reason"),
    [(_CatBN(dim=2), "read elsewhere"), (_CatBN(third=True), "not a Conv/Linear")],
    ids=["spatial-concat-of-one-conv", "non-layer-producer"],
)
def test_exported_concat_twins_are_refused(model, reason):
    x = torch.randn(2, 3, 5, 5)
    gm = _exported(model, x)
    expected = gm(x)
    folded, report = bnfold.fold(gm)
    assert report.bn_kept == 1 and reason in report.layers[0].reason, report.layers[0].reason
    assert torch.allclose(folded(x), expected)
