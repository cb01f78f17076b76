"""The bnfold command line: fold, inspect, demo, and clean one-line errors."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import randomized

from bnfold import zoo
from bnfold.cli import main
from bnfold.model_io.checkpoint import load_folded


@pytest.fixture
def checkpoint(tmp_path):
    model = randomized(zoo.build("resnet-tiny"))
    path = tmp_path / "resnet.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return model, path


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def test_fold_writes_checkpoint_and_report(checkpoint, tmp_path):
    model, path = checkpoint
    out, report = tmp_path / "folded.pt", tmp_path / "fold.json"
    result = _run("fold", path, "--arch", "resnet-tiny", "-o", out, "--report", report, "--verify")
    assert result.exit_code == 0, result.output
    assert "6 folded, 0 kept" in result.output and "verify (torch): pass" in result.output
    data = json.loads(report.read_text())
    assert data["bn_total"] == 6 and data["bn_folded"] == 6 and len(data["layers"]) == 6
    rebuilt = load_folded(out)
    x = zoo.example_input("resnet-tiny")
    assert torch.allclose(rebuilt(x), model(x), atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in rebuilt.modules())


def test_fold_refuses_to_overwrite_without_force(checkpoint, tmp_path):
    _, path = checkpoint
    out = tmp_path / "folded.pt"
    out.write_text("keep me")
    result = _run("fold", path, "--arch", "resnet-tiny", "-o", out)
    assert result.exit_code == 2 and "--force" in result.output and out.read_text() == "keep me"
    assert _run("fold", path, "--arch", "resnet-tiny", "-o", out, "--force").exit_code == 0
    result = _run("fold", path, "--arch", "resnet-tiny", "-o", path, "--force")
    assert result.exit_code == 2 and "overwrite the input" in result.output


def test_inspect_json_lists_every_bn(checkpoint):
    _, path = checkpoint
    result = _run("inspect", path, "--arch", "resnet-tiny", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output)["bn_total"] == 6


@pytest.mark.parametrize(
    "args,message",
    [
        (["--arch", "mlp-bn"], "does not match the architecture"),
        ([], "needs --arch"),
        (["--arch", "nosuch"], "not a zoo name"),
        (["--arch", "resnet-tiny", "--input-shape", "1,x"], "--input-shape"),
        (["--arch", "resnet-tiny", "--arch-kwargs", "{bad"], "not JSON"),
        (["--arch", "resnet-tiny", "-o", "/nonexistent/dir/x.pt"], "does not exist"),
    ],
)
def test_user_mistakes_are_one_line_errors(checkpoint, args, message):
    _, path = checkpoint
    result = _run("fold", path, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("bnfold: error:")]
    assert len(errors) == 1 and errors[0] == result.output.strip().splitlines()[-1]


def test_corrupt_and_pickled_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    result = _run("fold", bad, "--arch", "cnn-bn")
    assert result.exit_code == 2 and "neither a PyTorch checkpoint" in result.output
    pickled = tmp_path / "module.pt"
    torch.save(zoo.build("cnn-bn"), pickled)
    result = _run("fold", pickled, "--arch", "cnn-bn")
    assert result.exit_code == 2 and "runs code when loaded" in result.output


def test_demo_and_zoo_commands():
    result = _run("demo", "--arch", "concat-bn", "--json")
    assert result.exit_code == 0
    row = json.loads(result.output)["models"][0]
    assert row["bn_folded"] == row["bn_total"] == 1 and row["folded_error"] < 1e-5
    assert "resnet-tiny" in _run("zoo").output


def test_fold_onnx_file(tmp_path):
    import onnx

    from bnfold.deploy.export import export_keeping_bn

    model = randomized(zoo.build("cnn-bn"))
    src = tmp_path / "model.bin"  # a misleading suffix: the content decides
    src.write_bytes(export_keeping_bn(model, zoo.example_input("cnn-bn")).SerializeToString())
    out, report = tmp_path / "folded.onnx", tmp_path / "r.json"
    result = _run("fold", src, "-o", out, "--report", report, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["bn_folded"] == 2 and payload["bn_kept"] == 0
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(out).graph.node)
    result = _run("fold", src, "-o", tmp_path / "x.pt")
    assert result.exit_code == 2 and "written as .onnx" in result.output
    assert _run("inspect", src).exit_code == 0


def test_user_architecture_from_the_working_directory(tmp_path):
    """`--arch mymodels:build` imports mymodels.py from where the console script runs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "def build(width=4):\n"
        "    return nn.Sequential(nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.ReLU())\n"
    )
    model = randomized(torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU()))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    script = Path(sys.executable).parent / "bnfold"
    if not script.exists():  # bnfold on PYTHONPATH, not installed: the script pip would write, outside the cwd
        (tmp_path / "bin").mkdir()
        script = tmp_path / "bin" / "bnfold"
        script.write_text("import sys\nfrom bnfold.cli import main\nsys.exit(main())\n")
    run = subprocess.run(
        [
            *([] if os.access(script, os.X_OK) else [sys.executable]),
            str(script),
            "fold",
            "w.pt",
            "--arch",
            "mymodels:build",
            "--arch-kwargs",
            '{"width": 6}',
            "--input-shape",
            "2,1,8,8",
            "-o",
            "out.onnx",
            "--verify",
            "-q",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out.onnx").exists()
