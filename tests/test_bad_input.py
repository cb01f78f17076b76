"""Bad input: a one-line error naming the file and the problem, exit 2, nothing written, no input changed."""

import hashlib
import os

import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import randomized
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnfold import zoo
from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.model_io.loading import load_detailed
from bnfold.model_io.outputs import atomic_write
from bnfold.onnx_fold import fold_onnx


@pytest.fixture
def files(cnn_files):
    return cnn_files


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _bad(args, message, directory):
    before = _digest(directory)
    result = CliRunner().invoke(main, ["fold", *map(str, args)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("bnfold: error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert _digest(directory) == before  # nothing written, nothing changed
    return errors[0]


def test_truncated_and_corrupt_files(files, tmp_path):
    data = (files / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    _bad([tmp_path / "trunc.pt", "--arch", "cnn-bn", "-o", tmp_path / "o.pt"], "trunc.pt", tmp_path)
    onnx_bytes = (files / "good.onnx").read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(onnx_bytes[: len(onnx_bytes) // 3])
    _bad([tmp_path / "trunc.onnx", "-o", tmp_path / "o.onnx"], "trunc.onnx", tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    _bad([tmp_path / "empty.pt", "--arch", "cnn-bn"], "is empty", tmp_path)


def test_misleading_suffix(files, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    _bad([tmp_path / "model.onnx", "-o", tmp_path / "o.onnx"], "neither a PyTorch checkpoint", tmp_path)


def test_state_dict_against_the_wrong_arch(files, tmp_path):
    _bad(
        [files / "good.pt", "--arch", "resnet-tiny", "-o", tmp_path / "o.pt"],
        "does not match the architecture",
        tmp_path,
    )


@pytest.mark.parametrize("value,message", [(float("nan"), "non-finite running_var"), (-1.0, "negative running_var")])
def test_bad_statistics(tmp_path, value, message):
    model = randomized(zoo.build("cnn-bn"))
    model[1].running_var[0] = value
    torch.save(model.state_dict(), tmp_path / "bad.pt")
    line = _bad([tmp_path / "bad.pt", "--arch", "cnn-bn", "-o", tmp_path / "o.onnx"], message, tmp_path)
    assert "bad.pt" in line and "1" in line


def test_onnx_failing_the_checker(files, tmp_path):
    model = onnx.load(files / "good.onnx")
    model.graph.node[0].input[0] = "does_not_exist"
    onnx.save(model, tmp_path / "broken.onnx")
    _bad([tmp_path / "broken.onnx", "-o", tmp_path / "o.onnx"], "fails onnx.checker", tmp_path)


def test_input_shape_the_model_rejects(files, tmp_path):
    _bad(
        [files / "good.pt", "--arch", "cnn-bn", "--input-shape", "2,3,8,8", "-o", tmp_path / "o.onnx"],
        "rejects input shape 2,3,8,8",
        tmp_path,
    )
    _bad([files / "good.pt", "--arch", "cnn-bn", "--input-shape", "2,x,8"], "--input-shape", tmp_path)


def test_output_paths(files, tmp_path, monkeypatch):
    _bad([files / "good.pt", "--arch", "cnn-bn", "-o", tmp_path / "missing" / "o.pt"], "does not exist", tmp_path)
    (tmp_path / "exists.pt").write_text("mine")
    _bad([files / "good.pt", "--arch", "cnn-bn", "-o", tmp_path / "exists.pt"], "--force", tmp_path)
    _bad([files / "good.pt", "--arch", "cnn-bn", "-o", files / "good.pt", "--force"], "overwrite the input", files)
    _bad([files / "good.pt", "--arch", "cnn-bn", "-o", tmp_path / "o.txt"], "unsupported output suffix", tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    _bad([files / "good.pt", "--arch", "cnn-bn", "-o", tmp_path / "o.pt"], "not writable", tmp_path)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_atomic_write_leaves_nothing_when_interrupted(tmp_path, error):
    def writer(path):
        path.write_bytes(b"partial")
        raise error("stop")

    with pytest.raises(error):
        atomic_write(tmp_path / "out.onnx", writer)
    assert list(tmp_path.iterdir()) == []


def _mutate(data, positions, values, cut):
    buf = bytearray(data[:cut] if cut else data)
    for p, v in zip(positions, values, strict=False):
        if buf:
            buf[p % len(buf)] = v
    return bytes(buf)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    positions=st.lists(st.integers(0, 10**6), max_size=8),
    values=st.lists(st.integers(0, 255), max_size=8),
    cut=st.one_of(st.none(), st.integers(1, 4000)),
    which=st.sampled_from(["good.pt", "good.onnx"]),
)
def test_fuzzed_files_fail_only_cleanly(files, tmp_path_factory, positions, values, cut, which):
    path = tmp_path_factory.mktemp("fuzz") / which
    path.write_bytes(_mutate((files / which).read_bytes(), positions, values, cut))
    try:
        loaded = load_detailed(path, arch="cnn-bn")
        if isinstance(loaded.model, onnx.ModelProto):
            fold_onnx(loaded.model)
    except BnfoldError as error:
        assert str(error)


def test_onnx_runtime_refusing_a_file_says_why_in_one_line(files):
    """ORT's refusal keeps its reason, not the C++ source line and signature that fill the first 200 characters."""
    from bnfold.deploy.onnx_reference import run_ort

    model = onnx.load(files / "good.onnx")
    model.ir_version = 99  # newer than any onnxruntime: a file written by a newer onnx than the runtime
    with pytest.raises(BnfoldError) as error:
        run_ort(model, {})
    message = str(error.value)
    assert "Unsupported model IR version: 99" in message and "upgrade onnxruntime" in message, message
    assert "onnxruntime_src" not in message and "::" not in message and len(message.splitlines()) == 1


def test_onnx_runtime_messages_lose_only_their_cpp_source_lines():
    from bnfold.deploy.onnx_reference import ort_message

    seen = (  # onnxruntime 1.30.0 on the H200, for a file with IR version 14
        "[ONNXRuntimeError] : 1 : FAIL : Load model from /tmp/m.onnx failed:/onnxruntime_src/onnxruntime/core/graph/"
        "model.cc:202 onnxruntime::Model::Model(onnx::ModelProto&&, const onnxruntime::PathString&, const "
        "onnxruntime::IOnnxRuntimeOpSchemaRegistryList*, const onnxruntime::logging::Logger&, const "
        "onnxruntime::ModelOptions&) Unsupported model IR version: 14, max supported IR version: 13"
    )
    assert ort_message(seen) == (
        "Load model from /tmp/m.onnx failed: Unsupported model IR version: 14, max supported IR version: 13"
    )
    kernel = (
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. "
        "Name:'c' Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/nn/conv.cc:100 virtual "
        "onnxruntime::common::Status onnxruntime::Conv<float>::Compute(onnxruntime::OpKernelContext*) const "
        "X num_dims does not match W num_dims"
    )
    assert ort_message(kernel).endswith("Status Message: X num_dims does not match W num_dims")
    plain = "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: x"
    assert ort_message(plain) == "Got invalid dimensions for input: x"  # nothing else is cut
