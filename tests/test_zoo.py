"""Every zoo model folds every BN and keeps its function."""

import pytest
import torch
from conftest import assert_equivalent, bn_count

import bnfold
from bnfold import zoo


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_model_folds_completely(name):
    model = zoo.randomize_batchnorm(zoo.build(name), seed=3).eval()
    x = zoo.example_input(name, batch=4)
    folded, report = bnfold.fold(model, x)
    assert report.bn_total == bn_count(model) > 0
    assert report.bn_kept == 0, str(report)
    assert bn_count(folded) == 0
    assert_equivalent(model, folded, x)
    assert_equivalent(model, folded, x * 10 + 3)


@pytest.mark.parametrize("name", ["cnn-bn", "resnet-tiny", "deconv-groups", "concat-bn", "conv3d-bn"])
def test_zoo_conv_models_fold_without_example_inputs(name):
    model = zoo.randomize_batchnorm(zoo.build(name)).eval()
    folded, report = bnfold.fold(model)
    assert report.bn_kept == 0, str(report)
    assert_equivalent(model, folded, zoo.example_input(name))


def test_unknown_zoo_name():
    with pytest.raises(KeyError):
        zoo.build("nope")
    assert torch.is_tensor(zoo.example_input("mlp-bn"))
