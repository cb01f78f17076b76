"""A/B timing: two copies of one model are never called different; a model with half the layers is faster."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnfold.cli import main
from bnfold.deploy.ab import ab_compare
from bnfold.deploy.export import export_keeping_bn


def _mlp(depth):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(384, 384), nn.ReLU()) for _ in range(depth)]).eval()


@pytest.mark.parametrize("attempt", range(3))
def test_a_model_against_its_copy_is_no_significant_difference(attempt):
    model = _mlp(6)
    result = ab_compare(
        model,
        _mlp(6),
        runtimes=("torch-cpu",),
        batch_sizes=(32,),
        input_shape=(32, 384),
        rounds=8,
        per_round=8,
        seed=attempt,
    )
    row = result.rows[0]
    assert row.verdict == "no significant difference", row
    assert row.low <= row.high


def test_half_the_layers_is_faster():
    result = ab_compare(
        _mlp(12), _mlp(3), runtimes=("torch-cpu",), batch_sizes=(32,), input_shape=(32, 384), rounds=8, per_round=8
    )
    row = result.rows[0]
    assert row.verdict == "faster" and row.low > 1.03, row
    assert "faster" in str(result)


def test_cli_bench_pair_json_carries_interval_and_verdict(tmp_path):
    x = torch.randn(4, 384)
    for name, depth in (("a.onnx", 6), ("b.onnx", 6)):
        (tmp_path / name).write_bytes(export_keeping_bn(_mlp(depth), (x,)).SerializeToString())
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(tmp_path / "a.onnx"),
            str(tmp_path / "b.onnx"),
            "--iterations",
            "40",
            "--rounds",
            "4",
            "--json",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["ab"]["threads"] == 1 and payload["ab"]["rounds"] == 4
    for row in payload["compare"]:
        assert {"low", "high", "verdict", "speedup"} <= row.keys()
        assert row["verdict"] == "no significant difference"


def test_rounds_must_be_two_or_more():
    result = CliRunner().invoke(main, ["bench", "a.onnx", "b.onnx", "--rounds", "1"])
    assert result.exit_code == 2
