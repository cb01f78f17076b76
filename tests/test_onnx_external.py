"""External data: read lazily and checked, written tensor by tensor, kept external when the input was."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from test_no_torch import conv_bn_model

from bnfold.errors import BnfoldError
from bnfold.onnx_fold import fold_onnx, load_onnx, save_onnx
from bnfold.onnx_fold.files import session_source, uses_external_data
from bnfold.pipeline import run_pipeline


def _save_external(model: onnx.ModelProto, path) -> None:
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin", size_threshold=0
    )


def _run(path_or_model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(path_or_model) if not isinstance(path_or_model, onnx.ModelProto) else session_source(path_or_model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_fold_keeps_external_data_external_and_matches(tmp_path):
    _save_external(conv_bn_model(channels=8), tmp_path / "in.onnx")
    model = load_onnx(tmp_path / "in.onnx")
    assert uses_external_data(model)  # loaded lazily: the data stays in w.bin
    folded, report = fold_onnx(model)
    assert report.bn_folded == 2
    out = tmp_path / "out.onnx"
    result = run_pipeline(tmp_path / "in.onnx", out)
    assert result.report.bn_folded == 2
    assert (tmp_path / "out.onnx.data").stat().st_size > 0  # the input used external data: so does the output
    written = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in written.graph.initializer if len(t.dims) == 4)
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 8, 6, 6)).astype(np.float32)
    expected = _run(tmp_path / "in.onnx", x)
    np.testing.assert_allclose(_run(out, x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_run(folded, x), expected, rtol=1e-5, atol=1e-5)  # in memory too
    # saving again (the model now reads from in.onnx's data) and inline both work
    inline = save_onnx(folded, tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    np.testing.assert_allclose(_run(inline, x), expected, rtol=1e-5, atol=1e-5)


def test_inline_model_written_with_external_data_round_trips(tmp_path):
    model = conv_bn_model(channels=8)
    out = save_onnx(model, tmp_path / "big.onnx", external_data=True)
    loaded = load_onnx(out)
    for a, b in zip(model.graph.initializer, loaded.graph.initializer, strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), np.asarray(_decode(b)))


def _decode(tensor):
    from bnfold.onnx_fold.tensors import decode

    return decode(tensor)


def _tamper(path, key, value):
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == key:
            entry.value = value
    onnx.save(model, str(path))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("location", "/etc/passwd", "absolute path"),
        ("location", "../outside.bin", "outside the model's folder"),
        ("location", "missing.bin", "does not exist"),
        ("offset", "999999999", "past the end"),
        ("length", "12", "external length is 12"),
        ("offset", "-4", "negative"),
        ("offset", "x", "non-integer"),
    ],
)
def test_hostile_external_data_is_refused_in_one_line(tmp_path, key, value, message):
    folder = tmp_path / "m"
    folder.mkdir()
    _save_external(conv_bn_model(), folder / "in.onnx")
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    _tamper(folder / "in.onnx", key, value)
    with pytest.raises(BnfoldError, match=message):
        load_onnx(folder / "in.onnx")
    done = subprocess.run(
        [sys.executable, "-m", "bnfold", "inspect", str(folder / "in.onnx")], capture_output=True, text=True
    )
    assert done.returncode == 2 and message.split()[0] in done.stderr and "Traceback" not in done.stderr


def test_link_out_of_the_folder_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    _save_external(conv_bn_model(), folder / "in.onnx")
    (tmp_path / "secret.bin").write_bytes((folder / "w.bin").read_bytes())
    (folder / "w.bin").unlink()
    (folder / "w.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(BnfoldError, match="outside the model's folder"):
        load_onnx(folder / "in.onnx")


def test_typed_fields_strings_and_subgraph_tensors_survive_streamed_writes(tmp_path):
    """float_data (not raw) tensors, strings, and an If branch's initializer, written inline and external."""
    from onnx import helper, numpy_helper

    big = helper.make_tensor("big", TensorProto.FLOAT, [64, 64], np.arange(4096, dtype=np.float32).tolist())
    words = helper.make_tensor("words", TensorProto.STRING, [2], [b"a", b"bc"])
    inner = numpy_helper.from_array(np.full((40, 40), 2.0, np.float32), "inner")
    branch = helper.make_graph(
        [helper.make_node("Add", ["x", "inner"], ["y_then"])],
        "then",
        [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [40, 40])],
        [inner],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [40, 40])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
        "g",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [40, 40]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [40, 40])],
        [big, words],
    )
    model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 17)])
    for external in (False, True):
        out = save_onnx(model, tmp_path / f"m{external}.onnx", external_data=external)
        back = onnx.load(str(out))
        onnx.checker.check_model(back)
        np.testing.assert_array_equal(numpy_helper.to_array(back.graph.initializer[0]), numpy_helper.to_array(big))
        assert [str(w) for w in numpy_helper.to_array(back.graph.initializer[1])] == ["a", "bc"]
        assert (tmp_path / f"m{external}.onnx.data").exists() == external
        x = np.ones((40, 40), np.float32)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(session.run(None, {"c": np.array(True), "x": x})[0], x + 2)


def test_save_is_canonical_protobuf(tmp_path):
    """The streamed writer gives the bytes protobuf itself gives (one graph field, fields in order)."""
    model = conv_bn_model(channels=8)
    out = save_onnx(model, tmp_path / "m.onnx")
    assert out.read_bytes() == model.SerializeToString()


def _lazy_everything(monkeypatch):
    """Every file read with its weights left in it, every folded weight spilled to the scratch file."""
    import bnfold.onnx_fold.files as files
    import bnfold.onnx_fold.graph as graph

    monkeypatch.setattr(files, "_LAZY_MIN_BYTES", 0)
    monkeypatch.setattr(graph, "SCRATCH_FROM_BYTES", 0)
    appended = []
    original = files.Scratch.append

    def counting(self, data):
        appended.append(len(data))
        return original(self, data)

    monkeypatch.setattr(files.Scratch, "append", counting)
    return appended


def test_an_inline_file_read_with_its_weights_left_in_it_folds_and_saves_inline(tmp_path, monkeypatch):
    from bnfold.onnx_fold.files import Scratch, keeps_data_apart

    appended = _lazy_everything(monkeypatch)
    source = tmp_path / "in.onnx"
    onnx.save(conv_bn_model(channels=8), str(source))
    model = load_onnx(source, lazy=True)
    weights = [t for t in model.graph.initializer if t.name in ("w0", "w1")]
    assert [t.data_location for t in weights] == [TensorProto.EXTERNAL] * 2  # left in the file
    assert uses_external_data(model) and not keeps_data_apart(model)  # ... which is still an inline file
    full = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(source)).graph.initializer}
    for tensor in model.graph.initializer:
        np.testing.assert_array_equal(_decode(tensor), full[tensor.name])
    scratch = Scratch()
    folded, report = fold_onnx(model, copy=False, scratch=scratch)
    assert report.bn_folded == 2 and appended and scratch.path.stat().st_size >= sum(appended)
    out = tmp_path / "out.onnx"
    save_onnx(folded, out)
    assert not (tmp_path / "out.onnx.data").exists()
    assert not uses_external_data(onnx.load(str(out), load_external_data=False))  # written inline, as the input
    x = np.random.default_rng(0).standard_normal((2, 8, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(source, x), rtol=1e-4, atol=1e-5)


def test_the_cli_pipeline_reads_lazily_and_spills_to_scratch(tmp_path, monkeypatch):
    appended = _lazy_everything(monkeypatch)
    source = tmp_path / "in.onnx"
    onnx.save(conv_bn_model(channels=8), str(source))
    result = run_pipeline(source, output=tmp_path / "out.onnx")
    assert result.report.bn_folded == 2 and len(appended) >= 2
    assert not (tmp_path / "out.onnx.data").exists()
    x = np.random.default_rng(1).standard_normal((2, 8, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "out.onnx", x), _run(source, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("damage", ["truncated", "length-past-end"])
def test_a_damaged_inline_file_read_lazily_is_one_line(tmp_path, monkeypatch, damage):
    _lazy_everything(monkeypatch)
    data = conv_bn_model(channels=8).SerializeToString()
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # the first raw_data length made larger than the file
        raw = onnx.numpy_helper.to_array(conv_bn_model(channels=8).graph.initializer[0]).tobytes()
        at = data.index(raw)
        data = data[: at - 2] + bytes([0x80 | 0x7F, 0x7F]) + data[at:]
    (tmp_path / "bad.onnx").write_bytes(data)
    with pytest.raises(BnfoldError, match="not a readable ONNX model|declares|external data"):
        load_onnx(tmp_path / "bad.onnx", lazy=True)


def test_cli_on_a_large_inline_file_leaves_no_scratch_file(tmp_path):
    """17 MB of inline weights: read lazily and folded through a scratch file that is gone afterwards."""
    source, out = tmp_path / "big.onnx", tmp_path / "out" / "out.onnx"
    onnx.save(conv_bn_model(channels=490), str(source))
    out.parent.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "bnfold", "fold", str(source), "-o", str(out)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-1500:]
    assert [p.name for p in out.parent.iterdir()] == ["out.onnx"]  # inline, as the input; the scratch file gone
    x = np.random.default_rng(2).standard_normal((2, 490, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(source, x), rtol=1e-4, atol=1e-4)


def test_external_output_takes_over_the_scratch_file(tmp_path, monkeypatch):
    """Folded weights are written once: the scratch file beside the output becomes its data file."""
    import bnfold.onnx_fold.graph as graph
    from bnfold.onnx_fold.files import Scratch

    _lazy_everything(monkeypatch)
    monkeypatch.setattr(graph, "SCRATCH_FROM_BYTES", 2000)  # the 2,304-byte weights go there, the biases do not
    _save_external(conv_bn_model(channels=8), tmp_path / "in.onnx")
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    scratch = Scratch(out.parent, out.name)
    folded, report = fold_onnx(load_onnx(tmp_path / "in.onnx"), copy=False, scratch=scratch)
    moved = scratch.path
    assert report.bn_folded == 2 and moved.parent == out.parent.resolve()
    save_onnx(folded, out, external_data=True, scratch=scratch)
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"] and not moved.exists()
    assert (out.parent / "o.onnx.data").stat().st_mode == out.stat().st_mode  # not a private temporary file
    x = np.random.default_rng(3).standard_normal((2, 8, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(tmp_path / "in.onnx", x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_run(folded, x), _run(out, x), rtol=0, atol=0)  # the proto reads the moved bytes


def test_a_scratch_file_with_a_layer_folded_twice_is_copied_not_taken_over(tmp_path, monkeypatch):
    """Bytes no tensor uses any more (a layer folded again) would bloat the output: the data is copied instead."""
    from bnfold.onnx_fold.files import Scratch

    _lazy_everything(monkeypatch)
    _save_external(conv_bn_model(channels=8), tmp_path / "in.onnx")
    scratch = Scratch(tmp_path, "o.onnx")
    folded, _ = fold_onnx(load_onnx(tmp_path / "in.onnx"), copy=False, scratch=scratch)
    scratch.append(b"unused")  # as if a folded layer had been replaced by a second fold
    save_onnx(folded, tmp_path / "o.onnx", external_data=True, scratch=scratch)
    assert scratch.path is not None and scratch.path.exists()  # not taken over; removed at exit
    assert b"unused" not in (tmp_path / "o.onnx.data").read_bytes()
    x = np.random.default_rng(4).standard_normal((2, 8, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "o.onnx", x), _run(tmp_path / "in.onnx", x), rtol=1e-4, atol=1e-5)


def test_copying_without_copy_file_range_writes_the_same_bytes(tmp_path, monkeypatch):
    """Where the kernel cannot copy between the files (another file system), bytes go through memory."""
    import errno
    import os

    _save_external(conv_bn_model(channels=8), tmp_path / "in.onnx")
    model = load_onnx(tmp_path / "in.onnx")
    save_onnx(model, tmp_path / "fast.onnx", external_data=False)

    def cross_device(*args):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", cross_device, raising=False)
    save_onnx(model, tmp_path / "slow.onnx", external_data=False)
    assert (tmp_path / "fast.onnx").read_bytes() == (tmp_path / "slow.onnx").read_bytes()
    assert not uses_external_data(onnx.load(str(tmp_path / "slow.onnx"), load_external_data=False))


def test_a_file_with_too_many_fields_to_walk_is_parsed_as_usual(tmp_path, monkeypatch):
    """A file built to make the wire walk slow (a field per byte) is read by protobuf instead, with its data."""
    import bnfold.onnx_fold.files as files

    _lazy_everything(monkeypatch)
    walk = files._wire_fields
    monkeypatch.setattr(files, "_wire_fields", lambda data, start, end, limit: walk(data, start, end, min(limit, 3)))
    onnx.save(conv_bn_model(channels=8), str(tmp_path / "in.onnx"))
    model = load_onnx(tmp_path / "in.onnx", lazy=True)
    assert not uses_external_data(model)  # parsed whole: no tensor left in the file
    assert model.SerializeToString() == onnx.load(str(tmp_path / "in.onnx")).SerializeToString()


def test_an_in_memory_model_over_the_protobuf_limit_runs_from_a_file(monkeypatch):
    # a folded or exported model held in memory, inline, over 2 GB: it cannot be serialized to bytes
    from bnfold.deploy.runtimes import run_onnx
    from bnfold.onnx_fold import files

    model = conv_bn_model(channels=8)
    assert not uses_external_data(model)
    x = np.random.default_rng(0).standard_normal((2, 8, 6, 6)).astype(np.float32)
    expected = run_onnx(model, [x])[0]
    monkeypatch.setattr(files, "PROTOBUF_LIMIT", 64)  # stands for 2 GB
    source = session_source(model)
    assert isinstance(source, str) and source.endswith(".onnx")  # a temporary file with external data
    np.testing.assert_array_equal(run_onnx(model, [x])[0], expected)
