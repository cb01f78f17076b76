"""Zoo models exported by torch.onnx with every BN kept, then folded by the ONNX pass."""

import numpy as np
import onnx
import pytest
import torch

from bnfold import zoo
from bnfold.deploy.export import export_keeping_bn
from bnfold.deploy.onnx_reference import reference_float64, run_ort
from bnfold.onnx_fold import fold_onnx


def _export(name):
    model = zoo.randomize_batchnorm(zoo.build(name), seed=5).eval()
    x = zoo.example_input(name, batch=3)
    return export_keeping_bn(model, x), x.numpy()


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_exported_zoo_model_folds_every_bn(name):
    model, x = _export(name)
    bn_nodes = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert bn_nodes > 0
    folded, report = fold_onnx(model)
    onnx.checker.check_model(folded, full_check=True)
    assert report.bn_total == bn_nodes and report.bn_kept == 0, str(report)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    truth = reference_float64(model, {"input": x})[0]
    own = np.abs(run_ort(model, {"input": x})[0] - truth).max()
    err = np.abs(run_ort(folded, {"input": x})[0] - truth).max()
    assert err <= max(2e-5 * np.abs(truth).max(), 3 * own)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_dynamo_export_without_its_optimiser_folds_every_bn(name):
    """The dynamo exporter writes bias-free convs with a bias computed by Shape/CastLike/Expand chains."""
    import logging
    import warnings

    model = zoo.randomize_batchnorm(zoo.build(name), seed=6).eval()
    x = zoo.example_input(name, batch=3)
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proto = torch.onnx.export(model, (x,), dynamo=True, optimize=False).model_proto
    finally:
        logging.disable(logging.NOTSET)
    folded, report = fold_onnx(proto)
    assert report.bn_kept == 0 and report.bn_folded > 0, str(report)
    onnx.checker.check_model(folded, full_check=True)
    name_in = folded.graph.input[0].name
    truth = reference_float64(proto, {name_in: x.numpy()})[0]
    err = np.abs(run_ort(folded, {name_in: x.numpy()})[0] - truth).max()
    assert err <= 2e-5 * np.abs(truth).max()
