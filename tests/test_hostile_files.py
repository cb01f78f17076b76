"""Hostile and malformed files through the real CLI: exit status, one line, bounded memory and time, inputs intact.

The cases are built by benchmarks/hostile_files.py (which also prints the table for the README).
"""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import hostile_files  # noqa: E402

from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.limits import LIMITS  # noqa: E402
from bnfold.onnx_fold import fold_onnx  # noqa: E402
from bnfold.onnx_fold.tensors import check_tensor  # noqa: E402

PEAK_MB = 1536  # ~1.5 GB: the bound for files of a few MB
SECONDS = 60  # generous for a loaded CI machine; each case takes 2-3 s here (mostly `import torch`)


@pytest.mark.parametrize("case", hostile_files.CASES, ids=lambda c: c.name)
def test_hostile_file(case, tmp_path):
    row = hostile_files.run_isolated(case, tmp_path / "case", timeout=SECONDS)
    output = row["output"]
    assert row["exit"] == case.expect_exit, output
    assert "Traceback" not in output
    assert case.expect_text in output, output
    if case.expect_exit == 2:
        errors = [line for line in output.splitlines() if line.startswith("bnfold: error:")]
        assert len(errors) == 1, output
    assert row["peak_mb"] < PEAK_MB, row
    assert row["seconds"] < SECONDS, row
    assert row["inputs_unchanged"], row


def _tensor(name, dtype, dims, raw=None, **fields):
    tensor = onnx.TensorProto()
    tensor.name, tensor.data_type = name, dtype
    tensor.dims.extend(dims)
    if raw is not None:
        tensor.raw_data = raw
    for key, values in fields.items():
        getattr(tensor, key).extend(values)
    return tensor


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (_tensor("a", onnx.TensorProto.FLOAT, [3], raw=b"abc"), "holds 3 bytes"),
        (_tensor("b", onnx.TensorProto.FLOAT, [3], raw=b"\0" * 16), "holds 16 bytes"),
        (_tensor("c", onnx.TensorProto.FLOAT, [3], float_data=[1.0, 2.0]), "holds 2 values"),
        (_tensor("d", onnx.TensorProto.INT64, [2, 2], int64_data=[1, 2, 3, 4, 5]), "holds 5 values"),
        (_tensor("e", onnx.TensorProto.FLOAT16, [4]), "holds 0 bytes"),
        (_tensor("f", onnx.TensorProto.FLOAT, [-1]), "negative dimension"),
        (_tensor("g", 999, [1], raw=b"\0"), "unknown element type"),
    ],
)
def test_tensor_data_must_match_its_declaration(tensor, message):
    with pytest.raises(BnfoldError, match=message):
        check_tensor(tensor, "initializer")


@pytest.mark.parametrize(
    "array",
    [np.ones((2, 3), np.float32), np.ones(4, np.float16), np.arange(5, dtype=np.int64), np.ones(3, bool), np.ones(0)],
)
def test_well_formed_tensors_pass(array):
    assert check_tensor(numpy_helper.from_array(array, "t")) == array.size


def test_typed_fields_pass():
    assert check_tensor(helper.make_tensor("t", onnx.TensorProto.FLOAT, [2], [1.0, 2.0])) == 2
    assert check_tensor(helper.make_tensor("t", onnx.TensorProto.FLOAT16, [3], np.ones(3, np.float16))) == 3


def _decomposed(const_shape_values):
    """Conv then Mul by a per-channel constant computed by ConstantOfShape(shape)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(const_shape_values, np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("ConstantOfShape", ["shape"], ["k"], value=helper.make_tensor("v", 1, [1], [2.0])),
        helper.make_node("Mul", ["c", "k"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", 1, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", 1, [1, 4, 4, 4])],
        initializer=inits,
    )
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_constant_budget_is_a_setting(monkeypatch):
    """A computed constant within the budget folds; lower the budget and the same fold is left alone."""
    model = _decomposed([1, 4, 1, 1])
    folded, _ = fold_onnx(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    monkeypatch.setattr(LIMITS, "max_constant_elements", 3)
    kept, _ = fold_onnx(model)
    assert "Mul" in [n.op_type for n in kept.graph.node]
