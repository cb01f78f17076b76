"""Every input format bnfold fold/inspect/verify accept, each written by the test itself, and every output format."""

import collections

import pytest
import torch
from click.testing import CliRunner
from conftest import randomized
from safetensors.torch import save_file

import bnfold
from bnfold import zoo
from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.model_io.formats import detect_format
from bnfold.testing import assert_folded_equivalent


@pytest.fixture
def model():
    return randomized(zoo.build("resnet-tiny"))


def _fold(*args):
    return CliRunner().invoke(main, ["fold", *map(str, args), "--json", "-q"])


def test_state_dict_nested_and_ddp_prefixed(tmp_path, model):
    sd = model.state_dict()
    for i, payload in enumerate(
        [sd, {"model": sd}, {"state_dict": collections.OrderedDict(("module." + k, v) for k, v in sd.items())}]
    ):
        path = tmp_path / f"ckpt{i}.bin"
        torch.save(payload, path)
        assert detect_format(path) == "torch"
        loaded = bnfold.load(path, arch="resnet-tiny")
        x = zoo.example_input("resnet-tiny")
        assert torch.equal(loaded(x), model(x))


def test_safetensors_with_arch(tmp_path, model):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert detect_format(path) == "safetensors"
    result = _fold(path, "--arch", "resnet-tiny", "-o", tmp_path / "out.onnx", "--verify")
    assert result.exit_code == 0, result.output
    with pytest.raises(BnfoldError, match="needs --arch"):
        bnfold.load(path)


def test_torchscript_archive_is_folded_by_freezing(tmp_path, model):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    assert detect_format(path) == "torchscript"
    out = tmp_path / "frozen.pt"
    refused = _fold(path, "-o", out, "--input-shape", "2,1,8,8")
    assert refused.exit_code == 2 and "--unsafe-pickle" in refused.output and not out.exists()
    result = _fold(path, "-o", out, "--input-shape", "2,1,8,8", "--verify", "--unsafe-pickle")
    assert result.exit_code == 0, result.output
    x = zoo.example_input("resnet-tiny")
    frozen = torch.jit.load(str(out))
    assert torch.allclose(frozen(x), model(x), atol=1e-5)
    assert "aten::batch_norm" not in str(frozen.graph)


def test_torch_export_program_to_onnx_and_pt2(tmp_path, model):
    path = tmp_path / "prog.pt2"
    torch.export.save(torch.export.export(model, (zoo.example_input("resnet-tiny"),)), str(path))
    assert detect_format(path) == "torch-export"
    import json

    refused = _fold(path, "-o", tmp_path / "m.onnx")
    assert refused.exit_code == 2 and "unpickles" in refused.output and "--unsafe-pickle" in refused.output
    result = _fold(path, "-o", tmp_path / "m.onnx", "--verify", "--unsafe-pickle")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["bn_left_in_output"] == 0 and summary["verify"]["passed"]
    assert summary["method"] == "torch.export" and summary["bn_folded"] == 6
    pt2 = _fold(path, "-o", tmp_path / "m.pt2", "--verify", "--unsafe-pickle")
    assert pt2.exit_code == 0, pt2.output
    program = torch.export.load(str(tmp_path / "m.pt2"))
    assert "batch_norm" not in str(program.graph)
    x = zoo.example_input("resnet-tiny")
    assert torch.allclose(program.module()(x), model(x), atol=1e-5)


def test_pickled_module_needs_the_flag(tmp_path, model):
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    refused = CliRunner().invoke(main, ["fold", str(path), "-q"])
    assert refused.exit_code == 2 and "runs code when loaded" in refused.output and "--unsafe-pickle" in refused.output
    ok = _fold(path, "--unsafe-pickle", "--input-shape", "2,1,8,8", "--verify")
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_folded_outputs_reload(tmp_path, model, suffix):
    ckpt = tmp_path / "c.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / f"folded{suffix}"
    assert _fold(ckpt, "--arch", "resnet-tiny", "-o", out).exit_code == 0
    loaded = bnfold.load(out)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    x = zoo.example_input("resnet-tiny")
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_assert_folded_equivalent_helper(model):
    folded, report = assert_folded_equivalent(model, zoo.example_input("resnet-tiny"), require_all_folded=True)
    assert report.bn_folded == 6
    bad = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.BatchNorm2d(4),
        torch.nn.Conv2d(4, 4, 3, padding=1),
    )
    randomized(bad)
    with pytest.raises(AssertionError, match="not folded"):
        assert_folded_equivalent(bad, torch.randn(2, 3, 5, 5), require_all_folded=True)
