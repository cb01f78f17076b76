"""export_onnx and benchmark: every field present, the second sweep, GPU paths where a GPU exists."""

import io
import json

import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import randomized

import bnfold
from bnfold import zoo
from bnfold.cli import main
from bnfold.deploy.bench import benchmark, compare
from bnfold.deploy.export import export_keeping_bn, export_onnx
from bnfold.deploy.verify import verify
from bnfold.errors import BnfoldError


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_checks_dynamic_batch_and_verifies(tmp_path, exporter):
    model = randomized(zoo.build("deconv-groups"))
    folded, _ = bnfold.fold(model)
    result = export_onnx(folded, zoo.example_input("deconv-groups"), tmp_path / "m.onnx", exporter=exporter)
    proto = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert result.exporter == exporter and result.onnx_report.bn_kept == 0
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert verify(model, proto, input_shapes=[(5, 1, 8, 8)]).passed


class _PerInputKernel(torch.nn.Module):
    """A conv whose kernel is computed from each input (timm's CondConv): TorchScript cannot export it."""

    def __init__(self) -> None:
        super().__init__()
        self.bank = torch.nn.Parameter(torch.randn(2, 4 * 3 * 3 * 3))
        self.route = torch.nn.Linear(3, 2)
        self.bn = torch.nn.BatchNorm2d(4)  # after the per-input conv's view: must stay
        self.conv = torch.nn.Conv2d(4, 4, 1)
        self.bn2 = torch.nn.BatchNorm2d(4)  # after a plain conv: folds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        weight = (torch.sigmoid(self.route(x.mean((2, 3)))) @ self.bank).view(b * 4, 3, 3, 3)
        y = torch.nn.functional.conv2d(x.reshape(1, b * c, h, w), weight, padding=1, groups=b).view(b, 4, h, w)
        return self.bn2(self.conv(torch.relu(self.bn(y))))


def test_bn_keeping_export_falls_back_to_dynamo_where_torchscript_cannot():
    model = randomized(_PerInputKernel()).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(Exception, match="kernel of unknown shape"):  # the reason the fallback exists
        torch.onnx.export(model, (x,), io.BytesIO(), dynamo=False, dynamic_axes={"x": {0: "b"}}, input_names=["x"])
    proto = export_keeping_bn(model, (x,))
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == 2
    folded, report = bnfold.fold_onnx(proto)
    assert [e.folded for e in report.layers] == [False, True]  # the BN after the per-input conv is refused
    assert "Reshape" in report.layers[0].reason
    assert verify(model, folded, input_shapes=[(2, 3, 8, 8)]).passed


def test_export_keeps_simplified_model_only_if_it_verifies(tmp_path):
    model = randomized(zoo.build("concat-bn"))
    result = export_onnx(model, zoo.example_input("concat-bn"), tmp_path / "m.onnx", simplify=True)
    assert result.simplified and not result.notes
    assert result.to_dict()["exporter"] in ("dynamo", "torchscript")


def test_benchmark_fields_on_cpu_and_comparison_chart(tmp_path):
    model = randomized(zoo.build("cnn-bn"))
    folded, _ = bnfold.fold(model)
    a = benchmark(model, input_shape=(1, 1, 8, 8), batch_sizes=(1, 4), warmup=2, iterations=5, progress=False)
    b = benchmark(folded, input_shape=(1, 1, 8, 8), batch_sizes=(1, 4), warmup=2, iterations=5, progress=False)
    for row in a.to_dict()["rows"]:
        assert {"p50", "p90", "p99", "mean", "throughput", "session_ms", "batch_size", "runtime"} <= row.keys()
        assert 0 < row["p50"] <= row["p90"] <= row["p99"]
    cmp = compare(a, b, tmp_path / "chart.png")
    assert len(cmp["rows"]) == 2 and all(r["speedup"] > 0 for r in cmp["rows"])
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_onnx_both_ort_levels(tmp_path):
    model = randomized(zoo.build("cnn-bn"))
    export_onnx(model, zoo.example_input("cnn-bn"), tmp_path / "m.onnx")
    result = benchmark(str(tmp_path / "m.onnx"), batch_sizes=(1, 3), warmup=1, iterations=3, progress=False)
    assert {r.runtime for r in result.rows} == {"ort-cpu", "ort-cpu-opt"} and result.file_mb > 0


def test_benchmark_skips_runtimes_that_cannot_run_the_model(tmp_path):
    model = randomized(zoo.build("cnn-bn"))
    export_onnx(model, zoo.example_input("cnn-bn"), tmp_path / "m.onnx")
    result = benchmark(str(tmp_path / "m.onnx"), runtimes=("ort-cpu", "torch-cpu"), iterations=2, progress=False)
    assert [r.runtime for r in result.rows] == ["ort-cpu"] and "torch-cpu skipped" in result.notes[0]
    with pytest.raises(BnfoldError, match="cannot run an ONNX model"):
        benchmark(str(tmp_path / "m.onnx"), runtimes=("torch-cpu",))


def test_benchmark_errors():
    model = randomized(zoo.build("cnn-bn"))
    with pytest.raises(BnfoldError, match="input shape"):
        benchmark(model)
    if not torch.cuda.is_available():
        with pytest.raises(BnfoldError, match="CUDA"):
            benchmark(model, runtimes=("torch-cuda",), input_shape=(1, 1, 8, 8))


def test_one_command_fold_export_verify_bench(tmp_path):
    model = randomized(zoo.build("resnet-tiny"))
    ckpt = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), ckpt)
    out, report = tmp_path / "model.onnx", tmp_path / "out.json"
    result = CliRunner().invoke(
        main,
        [
            "fold",
            str(ckpt),
            "--arch",
            "resnet-tiny",
            "-o",
            str(out),
            "--verify",
            "--bench",
            "--report",
            str(report),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["bn_folded"] == 6 and summary["verify"]["passed"]
    assert summary["verify"]["onnx"]["runtimes"][0]["runtime"] == "ort-cpu"
    assert {r["runtime"] for r in summary["bench"]["compare"]["rows"]} == {"ort-cpu", "ort-cpu-opt"}
    assert json.loads(report.read_text())["output"] == str(out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_benchmark_cuda_paths(tmp_path):
    model = randomized(zoo.build("resnet-tiny"))
    result = benchmark(model, runtimes=("torch-cuda",), input_shape=(1, 1, 8, 8), iterations=5, progress=False)
    assert result.rows[0].p50 > 0
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        export_onnx(model, zoo.example_input("resnet-tiny"), tmp_path / "m.onnx")
        rows = benchmark(str(tmp_path / "m.onnx"), runtimes=("ort-cuda",), iterations=5, progress=False).rows
        assert rows[0].p50 > 0
