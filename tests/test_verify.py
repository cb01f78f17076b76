"""verify: passes right folds, catches a planted wrong one and names the layer, by dtype tolerances."""

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import randomized
from onnx import numpy_helper

import bnfold
from bnfold import zoo
from bnfold.cli import main
from bnfold.deploy.export import export_keeping_bn, export_onnx
from bnfold.deploy.verify import verify
from bnfold.errors import BnfoldError


def _folded(name="resnet-tiny"):
    model = randomized(zoo.build(name))
    folded, _ = bnfold.fold(model)
    return model, folded


def test_right_fold_passes_with_statistics():
    model, folded = _folded()
    result = verify(model, folded, input_shapes=[(2, 1, 8, 8)])
    assert result.passed and result.draws == 3 and result.dtype == "float32"
    out = result.runtimes[0].outputs[0]
    assert out.min_atol == out.stats.max_abs and out.stats.scaled_max < 1e-5
    assert result.reference_error[0].stats.scaled_max < 1e-5
    d = result.to_dict()
    assert {"passed", "runtimes", "reference_error", "rtol", "atol"} <= d.keys()


def test_planted_wrong_fold_is_caught_and_localised():
    model, folded = _folded()
    with torch.no_grad():
        folded.layers[1].conv2.weight[0, 0, 0, 0] += 0.5
    result = verify(model, folded, input_shapes=[(2, 1, 8, 8)])
    assert not result.passed
    assert "layers.1.conv2" in result.runtimes[0].first_divergence


def test_onnx_candidate_localised_by_node(tmp_path):
    model = randomized(zoo.build("cnn-bn"))
    x = zoo.example_input("cnn-bn")
    original = export_keeping_bn(model, x)
    folded, _ = bnfold.fold_onnx(original)
    assert verify(original, folded).passed
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    weight = next(t for t in folded.graph.initializer if t.name == conv.input[1])
    array = numpy_helper.to_array(weight).copy()
    array[0] *= 1.5
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    result = verify(original, folded)
    assert not result.passed
    assert f"({conv.op_type}, output '{conv.output[0]}')" in result.runtimes[0].first_divergence


def test_tolerances_follow_dtype():
    model = randomized(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    folded, _ = bnfold.fold(model.half())
    result = verify(model.float(), folded, input_shapes=[(2, 3, 6, 6)])
    assert result.dtype == "float16" and result.rtol == 1e-2 and result.passed
    strict = verify(model.float(), folded, input_shapes=[(2, 3, 6, 6)], rtol=1e-9, atol=1e-12)
    assert not strict.passed


def test_usage_errors():
    model, folded = _folded()
    with pytest.raises(BnfoldError, match="input shape"):
        verify(model, folded)
    with pytest.raises(BnfoldError, match="cannot run"):
        verify(model, folded, input_shapes=[(2, 1, 8, 8)], runtimes=("ort-cpu",))
    with pytest.raises(BnfoldError, match="choose from"):
        verify(model, folded, input_shapes=[(2, 1, 8, 8)], runtimes=("tpu",))


def test_cli_verify_exit_codes(tmp_path):
    model, folded = _folded("cnn-bn")
    x = zoo.example_input("cnn-bn")
    export_onnx(model, x, tmp_path / "orig.onnx", exporter="torchscript")
    export_onnx(folded, x, tmp_path / "fold.onnx")
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(tmp_path / "orig.onnx"), str(tmp_path / "fold.onnx"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["passed"] is True
    bad = onnx.load(tmp_path / "fold.onnx")
    init = max(bad.graph.initializer, key=lambda t: np.prod(t.dims))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.1, init.name))
    onnx.save(bad, tmp_path / "bad.onnx")
    mismatch = runner.invoke(main, ["verify", str(tmp_path / "orig.onnx"), str(tmp_path / "bad.onnx")])
    assert mismatch.exit_code == 1 and "MISMATCH" in mismatch.output
    np.save(tmp_path / "x.npy", x.numpy())
    own = runner.invoke(
        main, ["verify", str(tmp_path / "orig.onnx"), str(tmp_path / "fold.onnx"), "--inputs", str(tmp_path / "x.npy")]
    )
    assert own.exit_code == 0 and "1 input draw" in own.output
    usage = runner.invoke(main, ["verify", str(tmp_path / "orig.onnx"), str(tmp_path / "missing.onnx")])
    assert usage.exit_code == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_verify_on_cuda():
    model, folded = _folded()
    assert verify(model, folded, input_shapes=[(2, 1, 8, 8)], runtimes=("torch-cuda",)).passed


def _wide_net() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for i in range(6):
        layers += [torch.nn.Conv2d(3 if i == 0 else 256, 256, 3, padding=1), torch.nn.BatchNorm2d(256), torch.nn.ReLU()]
    return randomized(torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_verify_on_cuda_with_tf32_convolutions(monkeypatch):
    """On an H200, TF32 convolutions put a ResNet-50-sized fold 1.3e-4 off float64: the original is as far off."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    model = _wide_net()
    folded, _ = bnfold.fold(model)
    result = verify(model, folded, input_shapes=[(2, 3, 32, 32)], runtimes=("torch-cuda",), power=False)
    assert result.passed, str(result)
    assert result.runtimes[0].reference_error  # the original's own error on the GPU was measured and counted
    with torch.no_grad():  # a real 1% error is still caught on the GPU: the last conv's outputs 1% too large
        folded[15].weight *= 1.01
        folded[15].bias *= 1.01
    assert not verify(model, folded, input_shapes=[(2, 3, 32, 32)], runtimes=("torch-cuda",), power=False).passed


def _tf32_like(outputs):
    """Outputs rounded to TF32's 10-bit mantissa, the way a GPU's TF32 convolutions round them."""
    return [(np.asarray(o, np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32) for o in outputs]


@pytest.mark.parametrize("reference_rounds_too", [True, False])
def test_reference_noise_on_the_candidates_runtime_counts(monkeypatch, reference_rounds_too):
    """A runtime that rounds both models alike passes; the same rounding in the candidate alone is a mismatch."""
    import bnfold.deploy.verify as verify_module

    model, folded = _folded()
    run = verify_module._run

    def fake_run(m, inputs, runtime):
        if runtime != "torch-cuda":
            return run(m, inputs, runtime)
        out = run(m, inputs, "torch-cpu")
        return _tf32_like(out) if (m is folded or reference_rounds_too) else out

    monkeypatch.setattr(verify_module, "_run", fake_run)
    monkeypatch.setattr(verify_module, "check_available", lambda runtime: None)
    result = verify(model, folded, input_shapes=[(2, 1, 8, 8)], runtimes=("torch-cuda",), power=False)
    assert result.passed is reference_rounds_too
    here = result.runtimes[0].reference_error
    assert here and (here[0].stats.scaled_max > 1e-5) is reference_rounds_too
    assert "ref torch-cuda" in str(result)


class _MixedScale(torch.nn.Module):
    """One output column scaled by 1e4 beside nine scaled by 1e-2 (a detection or multi-task head)."""

    def __init__(self):
        super().__init__()
        self.big, self.small = torch.nn.Linear(8, 1), torch.nn.Linear(8, 9)

    def forward(self, x):
        return torch.cat([self.big(x) * 1e4, self.small(x) * 1e-2], dim=1)


def _mixed_pair():
    torch.manual_seed(0)
    reference = _MixedScale().eval()
    candidate = _MixedScale().eval()
    candidate.load_state_dict(reference.state_dict())
    return reference, candidate


def test_mixed_scale_output_names_the_wrong_small_columns(tmp_path):
    reference, candidate = _mixed_pair()
    with torch.no_grad():
        candidate.small.weight.mul_(1.5)  # the nine small columns 50% wrong
    result = verify(reference, candidate, input_shapes=[(16, 8)])
    assert not result.passed
    check = result.runtimes[0].outputs[0]
    assert check.channels == (1, list(range(1, 10)))
    assert check.failing > 0 and all(index[1] >= 1 for index, *_ in check.worst)
    assert "channels 1, 2, 3, 4, 5, 6, 7, 8, 9" in str(result)
    # through the CLI on ONNX files: exit 1
    ref_path, cand_path = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    x = torch.randn(4, 8)
    for model, path in ((reference, ref_path), (candidate, cand_path)):
        torch.onnx.export(model, (x,), str(path), dynamo=False)
    cli = CliRunner().invoke(main, ["verify", str(ref_path), str(cand_path)])
    assert cli.exit_code == 1, cli.output
    assert "channels 1, 2, 3, 4, 5, 6, 7, 8, 9" in cli.output


def test_mixed_scale_output_with_rounding_level_change_passes():
    reference, candidate = _mixed_pair()
    with torch.no_grad():
        candidate.small.weight.mul_(1 + 2**-23)  # one float32 ulp: rounding, not a change
        candidate.big.bias.add_(candidate.big.bias.abs() * 2**-23)
    assert verify(reference, candidate, input_shapes=[(16, 8)]).passed


def test_small_change_in_one_column_is_caught():
    reference, candidate = _mixed_pair()
    with torch.no_grad():
        candidate.small.weight[4].mul_(1.001)  # 0.1% in one small column
    result = verify(reference, candidate, input_shapes=[(16, 8)])
    assert not result.passed and result.runtimes[0].outputs[0].channels == (1, [5])


class _Cancelling(torch.nn.Module):
    """(1e8 x + 1) - 1e8 x: exactly 1 in float64, rounding noise in float32."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        with torch.no_grad():
            self.a.weight.copy_(torch.eye(4) * 1e8)
            self.a.bias.fill_(1.0)
            self.b.weight.copy_(torch.eye(4) * 1e8)
            self.b.bias.zero_()

    def forward(self, x):
        return self.a(x) - self.b(x)


def test_a_reference_dominated_by_rounding_is_named():
    model = _Cancelling().eval()
    result = verify(model, copy.deepcopy(model), input_shapes=[(8, 4)], power=False)
    assert any("dominated by rounding" in n for n in result.notes), result.notes
    model, folded = _folded()  # a well-conditioned model: no such note
    result = verify(model, folded, input_shapes=[(2, 1, 8, 8)], power=False)
    assert not any("dominated by rounding" in n for n in result.notes)


class _Step(torch.nn.Module):
    """A layer that turns float32 rounding of its input into whole steps of its output (the parity of x * 2^22)."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return x.mul_(2**22).floor_().remainder_(2)
        return torch.remainder(torch.floor(x * 2**22), 2)


def _nudged(model, name, relative):
    """A copy of ``model`` with parameter ``name`` scaled by 1 + relative * (random signs)."""
    out = copy.deepcopy(model)
    weight = dict(out.named_parameters())[name]
    signs = torch.randint(0, 2, weight.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        weight.mul_(1 + relative * signs)
    return out


@pytest.mark.parametrize(
    ("last", "relative", "ill"),
    [
        (_Step(), 2**-22, True),  # a rounding-sized change upstream, amplified by the layer: ill-conditioned
        (_Step(), 1e-2, False),  # a real change upstream (a wrong fold) is never excused, however steep the layer
        (torch.nn.ReLU(), 2**-22, False),
        (_Step(inplace=True), 2**-22, True),  # judged on what it was given, not on what it overwrote
    ],
)
def test_an_ill_conditioned_layer_is_named_as_such(last, relative, ill):
    from bnfold.deploy.verify import _conditioning, _torch_intermediates

    torch.manual_seed(0)
    x = [np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)]
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), last).eval()
    candidate = _nudged(model, "1.weight", relative)
    truth = _torch_intermediates(model, x, float64=True)["2"]
    own = _torch_intermediates(model, x, float64=False)["2"]
    said = _conditioning(model, candidate, "2", x, truth, own, 1e-3, (1e-4, 1e-5))
    assert ("ill-conditioned there" in said) is ill, said


def test_a_wrong_fold_is_not_called_ill_conditioned():
    model, folded = _folded()
    with torch.no_grad():
        folded.layers[1].conv2.weight[0, 0, 0, 0] += 0.5
    result = verify(model, folded, input_shapes=[(2, 1, 8, 8)], power=False)
    assert not result.passed and "ill-conditioned" not in result.runtimes[0].first_divergence


@pytest.mark.parametrize(
    ("op", "relative", "ill"), [("Sin", 2**-22, True), ("Sin", 1e-2, False), ("Relu", 2**-22, False)]
)
def test_an_ill_conditioned_onnx_node_is_named_as_such(op, relative, ill):
    from bnfold.deploy.verify import _onnx_conditioning, _onnx_intermediates

    rng = np.random.default_rng(0)
    x = [rng.standard_normal((4, 8)).astype(np.float32)]
    w1 = rng.standard_normal((8, 16)).astype(np.float32) * 1e3
    w2 = rng.standard_normal((16, 16)).astype(np.float32) * 1e3

    def graph(second):  # sin of values near 1e6 turns their rounding into O(1)
        return onnx.helper.make_model_gen_version(
            onnx.helper.make_graph(
                [
                    onnx.helper.make_node("MatMul", ["x", "w1"], ["h1"]),
                    onnx.helper.make_node("MatMul", ["h1", "w2"], ["h2"]),
                    onnx.helper.make_node(op, ["h2"], ["y"], name="last"),
                ],
                "g",
                [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 8])],
                [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 16])],
                [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(second, "w2")],
            ),
            opset_imports=[onnx.helper.make_opsetid("", 17)],
        )

    signs = rng.integers(0, 2, w2.shape) * 2 - 1
    candidate = graph((w2 * (1 + relative * signs)).astype(np.float32))
    own = _onnx_intermediates(graph(w2), ["y"], x, False, "ort-cpu")["y"]
    said = _onnx_conditioning(graph(w2), candidate, "y", x, "ort-cpu", own, 1e-3, (1e-4, 1e-5))
    assert ("ill-conditioned there: the candidate's input to it is within" in said) is ill, said


class _Pooled(torch.nn.Module):
    """A block ending in an Identity of its own (timm's HaloAttn: ``self.pool(out)``), no fold's."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.full((1, 8, 1, 1), 2.0))
        self.pool = torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x * self.gain)


class _DeepStem(torch.nn.Module):
    """timm's deep stem: a Sequential ending in a conv whose BN lies outside it (folded into that conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 8, 3))
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.act1 = torch.nn.ReLU(inplace=True)
        self.pooled = _Pooled()
        self.conv2 = torch.nn.Conv2d(8, 8, 3)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.act2 = torch.nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.bn2(self.conv2(self.pooled(self.act1(self.bn1(self.stem(x)))))))


def test_a_container_ending_in_a_folded_layer_is_not_called_divergent():
    model = randomized(_DeepStem()).eval()
    folded, report = bnfold.fold(model)
    assert report.bn_kept == 0
    assert verify(model, folded, input_shapes=[(2, 3, 12, 12)], power=False).passed
    with torch.no_grad():
        folded.conv2.weight[0] *= 1.01  # wrong after the stem: the stem's output must not be named
    divergence = verify(model, folded, input_shapes=[(2, 3, 12, 12)], power=False).runtimes[0].first_divergence
    assert divergence.startswith("module 'act2' (ReLU) after 'pooled'"), divergence
    with torch.no_grad():
        folded.pooled.gain[0, 0] = 2.5  # wrong in a block ending in its own Identity: that block is named
    divergence = verify(model, folded, input_shapes=[(2, 3, 12, 12)], power=False).runtimes[0].first_divergence
    assert divergence.startswith("module 'pooled' (_Pooled) after 'act1'"), divergence


def test_an_exact_layer_within_the_originals_rounding_is_not_called_ill_conditioned():
    """The exact layer's error must fail the same element-wise check, not merely be as large as the divergence."""
    from bnfold.deploy.verify import _amplified

    rng = np.random.default_rng(0)
    truth = rng.standard_normal((2, 4, 5, 5))
    rounding = truth * (1 + rng.uniform(-1, 1, truth.shape) * 2**-23)  # what the original's float32 shows
    inputs = [truth[:, :2]], [truth[:, :2].astype(np.float32)], [truth[:, :2].astype(np.float32)]
    assert _amplified("x", *inputs, (rounding, rounding, ""), truth, rounding, 1e-9, (1e-4, 1e-5)) == ""
    wrong = truth.copy()
    wrong[:, 1] *= 1.01  # one channel 1% off: fails the check, and is as large as the divergence
    said = _amplified("x", *inputs, (wrong, None, ""), truth, rounding, 1e-3, (1e-4, 1e-5))
    assert "ill-conditioned there" in said


def test_a_layers_own_rounding_on_the_runtime_is_named_as_such():
    """Exact on the candidate's input it passes, on the runtime it fails: the layer's rounding there, not the fold."""
    from bnfold.deploy.verify import _amplified

    rng = np.random.default_rng(0)
    truth = rng.standard_normal((2, 4, 5, 5))
    inputs = [truth[:, :2]], [truth[:, :2].astype(np.float32)], [truth[:, :2].astype(np.float32)]
    coarse = truth.copy()
    coarse[:, 1] += 1e-2  # what a coarse kernel makes of it
    said = _amplified("x", *inputs, (truth, coarse, "on ort-cpu"), truth, truth, 1e-3, (1e-4, 1e-5))
    assert "its own rounding there" in said and "run alone on ort-cpu" in said and "ill-conditioned" not in said
    assert _amplified("x", *inputs, (truth, truth, "on ort-cpu"), truth, truth, 1e-3, (1e-4, 1e-5)) == ""
    assert _amplified("x", *inputs, (truth, None, "on ort-cpu"), truth, truth, 1e-3, (1e-4, 1e-5)) == ""
    moved = [inputs[0], inputs[1], [(truth[:, :2] * 1.01).astype(np.float32)]]  # a real change upstream
    assert _amplified("x", *moved, (truth, coarse, "on ort-cpu"), truth, truth, 1e-3, (1e-4, 1e-5)) == ""


@pytest.mark.parametrize(
    ("op", "relative", "named"), [("Sigmoid", 2**-22, True), ("Sigmoid", 1e-2, False), ("Relu", 2**-22, False)]
)
def test_an_onnx_runtimes_inaccurate_kernel_is_named(op, relative, named):
    """ONNX Runtime's CPU Sigmoid is off by up to ~1e-7 absolute, several % of outputs near 1e-6 (timm's
    lambda_resnet50ts: a channel of such values); the float64 truth is not. Where the original's own run happened to
    be exact there, the candidate's rounding-sized input change shows the kernel's error, which is no fold's."""
    from bnfold.deploy.error_stats import error_stats
    from bnfold.deploy.verify import _onnx_conditioning, _onnx_intermediates

    rng = np.random.default_rng(0)
    x = [rng.uniform(1.4, 1.6, (64, 8)).astype(np.float32)]
    w1 = rng.uniform(-1.2, -1.05, (8, 16)).astype(np.float32)  # h near -13.5: sigmoid near 1.4e-6

    def graph(first):
        return onnx.helper.make_model_gen_version(
            onnx.helper.make_graph(
                [onnx.helper.make_node("MatMul", ["x", "w1"], ["h"]), onnx.helper.make_node(op, ["h"], ["y"])],
                "g",
                [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64, 8])],
                [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 16])],
                [numpy_helper.from_array(first, "w1")],
            ),
            opset_imports=[onnx.helper.make_opsetid("", 17)],
        )

    signs = rng.integers(0, 2, w1.shape) * 2 - 1
    candidate = graph((w1 * (1 + relative * signs)).astype(np.float32))
    truth = _onnx_intermediates(graph(w1), ["y"], x, True, "ort-cpu")["y"]
    got = _onnx_intermediates(candidate, ["y"], x, False, "ort-cpu")["y"]
    diverged = error_stats(got, truth).scaled_max
    lucky = truth.astype(np.float32)  # the original's own run, as if exact there
    said = _onnx_conditioning(graph(w1), candidate, "y", x, "ort-cpu", lucky, diverged, (1e-4, 1e-5))
    assert ("its own rounding there" in said) is named, said
    assert "ill-conditioned" not in said


class _Parallel(torch.nn.Module):
    """Both convs run before either activation: run order cannot tell which one feeds ``act1``."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.act1 = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()
        self.c2, self.b2, self.act2 = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()

    def forward(self, x):
        u, v = self.b1(self.c1(x)), self.b2(self.c2(x))
        return self.act1(u) + self.act2(v)


class _Gated(torch.nn.Module):
    """A block's output times a gate computed after it (an SE): the block ran before the gate's last module."""

    def __init__(self):
        super().__init__()
        self.c, self.b, self.act = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()
        self.pool, self.g, self.gate = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(3, 4, 1), torch.nn.Sigmoid()

    def forward(self, x):
        y = self.b(self.c(x))
        return self.act(y * self.gate(self.g(self.pool(x))))


@pytest.mark.parametrize(
    ("module", "wrong", "named", "not_named"), [(_Parallel, "c1", "c1", "c2"), (_Gated, "c", "c", "g")]
)
def test_divergence_names_the_layers_feeding_it_not_those_run_beside_it(module, wrong, named, not_named):
    model = randomized(module())
    folded, _ = bnfold.fold(model)
    with torch.no_grad():
        getattr(folded, wrong).weight[0, 0, 0, 0] += 0.5
    divergence = verify(model, folded, input_shapes=[(2, 3, 8, 8)], power=False).runtimes[0].first_divergence
    feeding = divergence.split("layers feeding it since the last matching values: ")[1].split(";")[0].split(", ")
    assert feeding == [named], divergence
    assert not_named not in feeding


class _Shifted(torch.nn.Module):
    """``2 x``, computed as ``((x + shift) - shift) * 2``: exact in float64, float32 loses the low bits."""

    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.shift = shift

    def forward(self, x):
        return ((x + self.shift) - self.shift) * 2


@pytest.mark.parametrize(("shift", "relative", "named"), [(1e4, 0.0, True), (0.0, 1e-2, False), (1e4, 1e-2, False)])
def test_a_candidates_own_float32_arithmetic_is_told_from_a_wrong_weight(shift, relative, named):
    """Right weights that round worse in float32 (a merged block sums in another order) diverge, and the candidate
    in float64 on its stored weights passes there: named as its float32 arithmetic. A wrong weight is wrong in
    float64 too: never named so."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), _Shifted()).eval()
    candidate = _nudged(model, "0.weight", relative) if relative else copy.deepcopy(model)
    candidate[1].shift = shift
    result = verify(model, candidate, input_shapes=[(4, 8)], power=False)
    said = result.runtimes[0].first_divergence
    assert not result.passed and said.startswith("module '1' (_Shifted)"), said
    assert ("its weights are right there: the candidate computed in float64" in said) is named, said
    assert "ill-conditioned" not in said


@pytest.mark.parametrize(("shift", "relative", "named"), [(1e4, 0.0, True), (0.0, 1e-2, False)])
def test_an_onnx_candidates_own_float32_arithmetic_is_told_from_a_wrong_weight(shift, relative, named):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 16)).astype(np.float32)

    def graph(weight, shift):  # the candidate computes 2 h as (h + shift - shift) * 2, the reference as h * 2
        shifted = [
            onnx.helper.make_node("Add", ["h", "shift"], ["up"]),
            onnx.helper.make_node("Sub", ["up", "shift"], ["down"]),
            onnx.helper.make_node("Mul", ["down", "two"], ["y"]),
        ]
        if shift is None:
            shifted = [onnx.helper.make_node("Mul", ["h", "two"], ["y"])]
        return onnx.helper.make_model_gen_version(
            onnx.helper.make_graph(
                [onnx.helper.make_node("MatMul", ["x", "w"], ["h"]), *shifted],
                "g",
                [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 8])],
                [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 16])],
                [
                    numpy_helper.from_array(weight, "w"),
                    *([] if shift is None else [numpy_helper.from_array(np.array(shift, np.float32), "shift")]),
                    numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                ],
            ),
            opset_imports=[onnx.helper.make_opsetid("", 17)],
        )

    signs = rng.integers(0, 2, w.shape) * 2 - 1
    candidate = graph((w * (1 + relative * signs)).astype(np.float32), shift)
    result = verify(graph(w, None), candidate, power=False)
    said = result.runtimes[0].first_divergence
    assert not result.passed and said, said
    assert ("its weights are right there: the candidate computed in float64" in said) is named, said


def test_a_wrong_fold_is_not_called_float32_arithmetic():
    model, folded = _folded()
    with torch.no_grad():
        folded.layers[1].conv2.weight[0, 0, 0, 0] += 0.5
    said = verify(model, folded, input_shapes=[(2, 1, 8, 8)], power=False).runtimes[0].first_divergence
    assert said and "its weights are right there" not in said


def test_an_onnx_candidate_is_allowed_the_rounding_of_the_references_own_export():
    """A module reference of an ONNX candidate also runs as its own export on the candidate's runtime."""
    model, folded = _folded()
    candidate = export_keeping_bn(folded, (torch.randn(2, 1, 8, 8),), dynamic_batch=False)
    result = verify(model, candidate, input_shapes=[(2, 1, 8, 8)], power=False)
    assert result.passed and result.runtimes[0].reference_error, str(result)
    assert any("as its own ONNX export" in n for n in result.notes)
    with torch.no_grad():
        folded.layers[1].conv2.weight[0] *= 1.01  # a wrong fold is still caught beside the wider allowance
    wrong = export_keeping_bn(folded, (torch.randn(2, 1, 8, 8),), dynamic_batch=False)
    assert not verify(model, wrong, input_shapes=[(2, 1, 8, 8)], power=False).passed


class _Branchy(torch.nn.Module):
    """A data-dependent branch: a trace freezes the one its example took."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if x.mean() > 0.25 else -y


def test_a_references_export_that_is_off_the_module_does_not_widen_the_allowance():
    """The export froze the branch of verify's first draw, so it is wrong on the others; a candidate frozen the
    same way is as wrong there. Counted as noise, the export's error would let that candidate pass."""
    from bnfold.deploy.verify import _draws

    model = randomized(_Branchy()).eval()
    first = torch.from_numpy(_draws([((2, 3, 8, 8), np.float32)], 3)[0][0])
    assert first.mean() < 0.25  # the first draw takes the other branch than the two after it
    frozen = export_keeping_bn(model, (first,), dynamic_batch=False)
    result = verify(model, frozen, input_shapes=[(2, 3, 8, 8)], power=False)
    assert not result.passed, str(result)
    assert any("the export itself is off the module" in n for n in result.notes), result.notes
