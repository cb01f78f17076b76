"""verify states its power (the smallest single-layer change it catches) and warns on input-independent outputs."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnfold.cli import main
from bnfold.deploy.verify import verify
from bnfold.deploy.verify_power import LADDER, _perturbed, input_dependence, weight_layers

SHAPE = (4, 3, 8, 8)


def _net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    return model.eval()


def _constant_net() -> nn.Module:
    """Output dominated by a BN shift: conv weights 1e-7 of the usual size, so the input barely matters."""
    model = _net()
    with torch.no_grad():
        model[0].weight.mul_(1e-7)
        model[1].bias.fill_(5.0)
    return model


def test_power_is_stated_and_holds():
    model = _net()
    result = verify(model, copy.deepcopy(model), input_shapes=[SHAPE])
    assert result.passed
    power = result.power
    assert power is not None and len(power.layers) == 3
    assert power.smallest_caught is not None and power.smallest_caught <= 1e-3
    assert power.input_dependence > 0.1
    assert not any("hardly depends" in n for n in result.notes)
    assert "power: a change of" in str(result)
    # the claim holds: a change of the stated size to the worst probed layer fails verification
    worst = max(power.layers, key=lambda item: item[1])
    position = [name for name, _ in power.layers].index(worst[0])
    changed = _perturbed(model, worst[0], worst[1], position)
    assert not verify(model, changed, input_shapes=[SHAPE], power=False).passed
    # one ladder step below it is not caught on the draw the power is measured on (the others may catch more)
    below = _perturbed(model, worst[0], LADDER[LADDER.index(worst[1]) + 1], position)
    assert verify(model, below, input_shapes=[SHAPE], power=False, draws=1).passed


def test_input_independent_output_warns():
    model = _constant_net()
    candidate = copy.deepcopy(model)
    with torch.no_grad():
        candidate[0].weight.mul_(1.01)
    result = verify(model, candidate, input_shapes=[SHAPE])
    # this change cannot show on any input: the output does not depend on the input
    assert result.passed
    assert result.power.input_dependence < 1e-3
    assert any("hardly depends on the input" in n and "--inputs" in n for n in result.notes)
    first = dict(result.power.layers)["0.weight"]
    assert first is None or first > 0.01
    assert "NOT caught" in str(result) or result.power.smallest_caught > 0.01


def test_no_power_skips_it():
    model = _net()
    result = verify(model, model, input_shapes=[SHAPE], power=False)
    assert result.power is None and result.to_dict()["power"] is None


def test_power_on_onnx_reference(cnn_files):
    model = onnx.load(str(cnn_files / "good.onnx"))
    names = weight_layers(model)
    assert names and all(n in {t.name for t in model.graph.initializer} for n in names)
    result = verify(model, model)
    assert result.passed and result.power.smallest_caught is not None and result.power.smallest_caught <= 1e-2
    # the planted copy is a copy: the reference is untouched
    again = onnx.load(str(cnn_files / "good.onnx"))
    assert [t.raw_data for t in again.graph.initializer] == [t.raw_data for t in model.graph.initializer]


def test_weight_layers_picks_first_middle_last():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(7)])
    assert weight_layers(model) == ["0.weight", "3.weight", "6.weight"]
    assert weight_layers(nn.Sequential(nn.ReLU())) == []


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [([np.ones(4)], [np.ones(4)], 0.0), ([np.ones(4)], [np.zeros(4)], 1.0), ([np.zeros(3)], [np.zeros(3)], 0.0)],
)
def test_input_dependence(a, b, expected):
    assert input_dependence(a, b) == pytest.approx(expected)


def test_cli_verify_json_has_power(cnn_files):
    path = str(cnn_files / "good.onnx")
    runner = CliRunner()
    result = runner.invoke(main, ["verify", path, path, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["power"]["smallest_relative_change_caught"] <= 1e-2
    assert data["power"]["input_dependence"] > 0.01
    result = runner.invoke(main, ["verify", path, path, "--json", "--no-power"])
    assert result.exit_code == 0 and json.loads(result.output)["power"] is None
