"""ONNX-only commands run with torch made unimportable, and start without its import cost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

# torch made unimportable: `import torch` raises ImportError inside the child
BLOCKED = (
    "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['bnfold', *sys.argv[1:]]; "
    "runpy.run_module('bnfold', run_name='__main__')"
)


def conv_bn_model(channels: int = 4, blocks: int = 2, seed: int = 0) -> onnx.ModelProto:
    """Conv + BatchNormalization + Relu blocks, built with onnx alone."""
    rng = np.random.default_rng(seed)
    nodes, inits, previous = [], [], "x"
    for b in range(blocks):
        w = (rng.standard_normal((channels, channels, 3, 3)) / 6).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{b}"))
        for name, values in (
            ("g", rng.uniform(0.5, 1.5, channels)),
            ("b", rng.uniform(-0.2, 0.2, channels)),
            ("m", rng.uniform(-0.2, 0.2, channels)),
            ("v", rng.uniform(0.5, 1.5, channels)),
        ):
            inits.append(numpy_helper.from_array(values.astype(np.float32), f"{name}{b}"))
        nodes += [
            helper.make_node("Conv", [previous, f"w{b}"], [f"c{b}"], pads=[1, 1, 1, 1], name=f"conv{b}"),
            helper.make_node("BatchNormalization", [f"c{b}", f"g{b}", f"b{b}", f"m{b}", f"v{b}"], [f"n{b}"]),
            helper.make_node("Relu", [f"n{b}"], [f"r{b}"]),
        ]
        previous = f"r{b}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, channels, 6, 6])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [2, channels, 6, 6])],
        inits,
    )
    model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args",
    [
        ["fold", "in.onnx", "-o", "out.onnx", "--verify", "--json"],
        ["inspect", "in.onnx"],
        ["verify", "in.onnx", "in.onnx"],
        ["bench", "in.onnx", "in.onnx", "--iterations", "4", "--rounds", "2", "--warmup", "1"],
    ],
    ids=["fold", "inspect", "verify", "bench"],
)
def test_onnx_commands_never_import_torch(tmp_path, args):
    onnx.save(conv_bn_model(), tmp_path / "in.onnx")
    done = _run(args, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    if args[0] == "fold":
        result = json.loads(done.stdout)
        assert result["bn_total"] == 2 and result["bn_folded"] == 2 and result["verify"]["passed"]
        assert (tmp_path / "out.onnx").exists()


def test_a_torch_job_says_torch_is_needed(tmp_path):
    """The block is real: a job that needs torch fails with an import error, not silently."""
    (tmp_path / "w.pt").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    done = _run(["inspect", "w.pt", "--arch", "cnn-bn"], tmp_path)
    assert done.returncode != 0


def test_import_bnfold_is_lazy():
    code = "import sys, bnfold; print('torch' in sys.modules); bnfold.fold_onnx; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
