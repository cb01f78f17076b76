"""The verifier itself under mutation: every planted real change is a MISMATCH, every rounding-level one a PASS."""

import numpy as np
import pytest
from conftest import randomized

import bnfold
from bnfold import zoo
from bnfold.deploy.mutations import REAL_KINDS, effect, plant, plant_rounding
from bnfold.deploy.verify import verify

MODELS = list(zoo.ZOO)


def _pair(name):
    model = randomized(zoo.build(name))
    folded, _ = bnfold.fold(model)
    return model, folded, [(4, *zoo.ZOO[name].input_shape)]


@pytest.mark.parametrize("name", MODELS)
def test_real_changes_are_caught(name):
    model, folded, shapes = _pair(name)
    rng = np.random.default_rng(0)
    planted = 0
    for kind in REAL_KINDS:
        target = model if kind == "bn-statistic" else folded  # a folded model has no BN left
        for size in (0.1, 0.01):
            mutation = plant(target, kind, rng, size)
            if mutation is None or effect(model, mutation.model, shapes) <= 2.0:
                continue  # no such layer, or the change is within rounding on these inputs
            planted += 1
            result = verify(model, mutation.model, input_shapes=shapes)
            assert not result.passed, (kind, mutation.layer, mutation.detail)
    assert planted >= 4


@pytest.mark.parametrize("name", MODELS)
def test_rounding_level_changes_pass(name):
    model, folded, shapes = _pair(name)
    rng = np.random.default_rng(1)
    for _ in range(3):
        mutation = plant_rounding(folded, rng)
        result = verify(model, mutation.model, input_shapes=shapes)
        assert result.passed, (mutation.layer, str(result))


def _exported(module, shapes):
    import torch

    from bnfold.deploy.export import export_keeping_bn

    example = torch.randn(shapes[0], generator=torch.Generator().manual_seed(0))
    return export_keeping_bn(module, (example,), dynamic_batch=False)


@pytest.mark.parametrize("name", ["cnn-bn", "resnet-tiny", "deconv-groups"])
def test_real_changes_in_an_onnx_candidate_are_caught_and_rounding_passes(name):
    """An exported candidate checked against the module on ONNX Runtime (``fold CKPT -o x.onnx --verify``)."""
    model, folded, shapes = _pair(name)
    assert verify(model, _exported(folded, shapes), input_shapes=shapes).passed
    rng = np.random.default_rng(2)
    planted = 0
    for kind in REAL_KINDS:
        mutation = plant(model if kind == "bn-statistic" else folded, kind, rng, 0.1)
        if mutation is None or effect(model, mutation.model, shapes) <= 2.0:
            continue
        planted += 1
        result = verify(model, _exported(mutation.model, shapes), input_shapes=shapes, power=False)
        assert not result.passed, (kind, mutation.layer, mutation.detail)
    assert planted >= 3
    mutation = plant_rounding(folded, rng)
    assert verify(model, _exported(mutation.model, shapes), input_shapes=shapes, power=False).passed
