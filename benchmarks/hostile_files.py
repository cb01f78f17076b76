"""Small hostile and malformed files through the CLI: exit status, peak memory and time of each.

Usage: python benchmarks/hostile_files.py [--json benchmarks/hostile_files.json]

Each case is a file of at most a few MB that an attacker or a careless colleague
could hand over; each runs as a real `bnfold` subprocess whose peak resident
memory comes from wait4(). tests/test_hostile_files.py runs the same cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from peak_rss import LAUNCH

ROOT = Path(__file__).resolve().parents[1]
BNFOLD = [sys.executable, "-m", "bnfold"]


@dataclasses.dataclass
class Case:
    """One hostile input: how to build it and the command that reads it."""

    name: str
    build: Callable[[Path], list[str]]  # writes the files into a folder, returns the bnfold arguments
    expect_exit: int
    expect_text: str  # in the error line (exit 2) or the output (exit 0)
    protected: tuple[str, ...] = ()  # files that must be unchanged afterwards


def _model(nodes, outputs, inits=(), inputs=()):
    graph = helper.make_graph(nodes, "g", list(inputs), outputs, initializer=list(inits))
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(model, path: Path) -> None:
    path.write_bytes(model.SerializeToString())


def constant_of_shape(folder: Path) -> list[str]:
    shape = numpy_helper.from_array(np.array([40000, 40000], np.int64), "shape")
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", 1, [1], [1.0])),
        helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0),
    ]
    _save(_model(nodes, [helper.make_tensor_value_info("y", 1, [])], [shape]), folder / "cos.onnx")
    return ["inspect", str(folder / "cos.onnx")]


def expand(folder: Path) -> list[str]:
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array([30000, 30000], np.int64), "shape"),
    ]
    nodes = [helper.make_node("Expand", ["one", "shape"], ["y"])]
    _save(_model(nodes, [helper.make_tensor_value_info("y", 1, [30000, 30000])], inits), folder / "expand.onnx")
    return ["inspect", str(folder / "expand.onnx")]


def bn_through_big_constant(folder: Path) -> list[str]:
    """A Conv whose bias is computed from an Expand to 4x4x60000x60000 (230 GB), then a BN the fold must refuse."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array([4, 4, 60000, 60000], np.int64), "shape"),
        *[numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), n) for n in ("s", "b", "m", "v")],
    ]
    nodes = [
        helper.make_node("Expand", ["zero", "shape"], ["huge"]),
        helper.make_node("Shape", ["huge"], ["dims"]),
        helper.make_node("Cast", ["dims"], ["fdims"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["fdims", "zero"], ["bias"]),
        helper.make_node("Conv", ["x", "w", "bias"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", 1, [1, 4, 6, 6])
    _save(_model(nodes, [y], inits, [x]), folder / "bigbias.onnx")
    return ["inspect", str(folder / "bigbias.onnx")]


def deflate_bomb(folder: Path, inflated: int = 400 * 2**20) -> list[str]:
    """A .pt whose weight entry inflates from ~400 KB to 400 MB (1000:1)."""
    torch.save({"w": torch.zeros(4)}, folder / "small.pt")
    out = folder / "bomb.pt"
    with zipfile.ZipFile(folder / "small.pt") as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if info.filename.endswith("data/0"):
                with target.open(info.filename, "w", force_zip64=True) as handle:
                    chunk = b"\0" * 2**22
                    for _ in range(inflated // len(chunk)):
                        handle.write(chunk)
            else:
                target.writestr(info.filename, source.read(info.filename))
    return ["inspect", str(out), "--arch", "cnn-bn"]


def dead_chain(folder: Path, length: int = 8000) -> list[str]:
    """8,000 Identity nodes nothing reads, beside one Relu."""
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    nodes += [helper.make_node("Identity", ["x" if i == 0 else f"d{i - 1}"], [f"d{i}"]) for i in range(length)]
    x = helper.make_tensor_value_info("x", 1, [1, 4])
    _save(_model(nodes, [helper.make_tensor_value_info("y", 1, [1, 4])], [], [x]), folder / "dead.onnx")
    return ["fold", str(folder / "dead.onnx"), "-o", str(folder / "dead.out.onnx")]


def many_bn(folder: Path, blocks: int = 1000) -> list[str]:
    """1,000 Conv+BN blocks (1 channel): the fold must be linear in the graph."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    value = "x"
    for i in range(blocks):
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, 1, 1, 1)).astype(np.float32), f"w{i}"))
        for p in ("s", "b", "m", "v"):
            inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, 1).astype(np.float32), f"{p}{i}"))
        nodes.append(helper.make_node("Conv", [value, f"w{i}"], [f"c{i}"]))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"y{i}"]))
        value = f"y{i}"
    x = helper.make_tensor_value_info("x", 1, [1, 1, 4, 4])
    y = helper.make_tensor_value_info(value, 1, [1, 1, 4, 4])
    _save(_model(nodes, [y], inits, [x]), folder / "many.onnx")
    return ["fold", str(folder / "many.onnx"), "-o", str(folder / "many.out.onnx")]


def _bn_model(var: onnx.TensorProto | None = None, weight: onnx.TensorProto | None = None, extra=()):
    rng = np.random.default_rng(0)
    inits = [
        weight or numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        *[numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), n) for n in ("s", "b", "m")],
        var or numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "v"),
        *extra,
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])
    return _model(nodes, [helper.make_tensor_value_info("y", 1, [1, 4, 6, 6])], inits, [x])


def short_variance(folder: Path) -> list[str]:
    var = numpy_helper.from_array(np.ones(4, np.float32), "v")
    var.raw_data = b"abc"
    _save(_bn_model(var=var), folder / "shortvar.onnx")
    return ["fold", str(folder / "shortvar.onnx"), "-o", str(folder / "o.onnx")]


def short_weight(folder: Path) -> list[str]:
    weight = numpy_helper.from_array(np.ones((256, 3, 3, 3), np.float32), "w")
    weight.raw_data = weight.raw_data[:100]
    _save(_bn_model(weight=weight), folder / "shortw.onnx")
    return ["fold", str(folder / "shortw.onnx"), "-o", str(folder / "o.onnx")]


def phantom_initializer(folder: Path) -> list[str]:
    phantom = onnx.TensorProto()
    phantom.name, phantom.data_type = "phantom", onnx.TensorProto.FLOAT
    phantom.dims.extend([2**20, 2**20])
    _save(_bn_model(extra=[phantom]), folder / "phantom.onnx")
    return ["inspect", str(folder / "phantom.onnx")]


def chart_over_input(folder: Path) -> list[str]:
    _save(_bn_model(), folder / "a.onnx")
    _save(_bn_model(), folder / "b.onnx")
    return ["bench", str(folder / "a.onnx"), str(folder / "b.onnx"), "--chart", str(folder / "a.onnx"), "--force"]


def report_over_output(folder: Path) -> list[str]:
    _save(_bn_model(), folder / "in.onnx")
    same = str(folder / "same.onnx")
    return ["fold", str(folder / "in.onnx"), "-o", same, "--report", same]


def output_over_external_data(folder: Path) -> list[str]:
    model = _bn_model()
    onnx.save_model(model, str(folder / "ext.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    return ["fold", str(folder / "ext.onnx"), "-o", str(folder / "w.bin"), "--force"]


CASES = [
    Case("ConstantOfShape 40000x40000 -> ReduceSum", constant_of_shape, 0, "BN"),
    Case("Expand scalar to 30000x30000", expand, 0, "BN"),
    Case("Conv bias from Expand 60000x60000, then BN", bn_through_big_constant, 0, "BNFOLD_MAX_CONSTANT_ELEMENTS"),
    Case(".pt deflate bomb 400 KB -> 400 MB", deflate_bomb, 2, "decompression bomb"),
    Case("8,000 dead Identity nodes", dead_chain, 0, "wrote"),
    Case("1,000 Conv+BN blocks", many_bn, 0, "1000 folded"),
    Case("BN variance with 3 bytes of data", short_variance, 2, "holds 3 bytes"),
    Case("Conv weight with short data", short_weight, 2, "holds 100 bytes"),
    Case("unused [2^20, 2^20] initializer, no data", phantom_initializer, 2, "holds 0 values"),
    Case("bench --chart over an input", chart_over_input, 2, "would overwrite the input", ("a.onnx", "b.onnx")),
    Case("fold -o X --report X", report_over_output, 2, "name the same file", ("in.onnx",)),
    Case("fold -o over the input's external data", output_over_external_data, 2, "external data", ("w.bin",)),
]


def run_case(case: Case, folder: Path, timeout: float = 120.0) -> dict:
    """Build ``case`` in ``folder`` and run it; exit status, output, peak RSS (MB) and seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    args = case.build(folder)
    digests = {name: (folder / name).read_bytes() for name in case.protected}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    peak = folder / ".peak"
    peak.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, str(peak), *BNFOLD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=folder,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    seconds = time.perf_counter() - start
    return {
        "peak_mb": round(int(peak.read_text()) / 1024, 1) if peak.exists() else None,
        "case": case.name,
        "exit": process.returncode,
        "output": output,
        "seconds": round(seconds, 2),
        "inputs_unchanged": all((folder / n).read_bytes() == d for n, d in digests.items()),
        "file_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
    }


def run_isolated(case: Case, folder: Path, timeout: float = 120.0) -> dict:
    """:func:`run_case` in a fresh helper process, so that its children's peak RSS is this case's alone."""
    code = (
        "import sys, json, resource, pathlib; sys.path.insert(0, sys.argv[1]);"
        "import hostile_files as h; case = next(c for c in h.CASES if c.name == sys.argv[2]);"
        "r = h.run_case(case, pathlib.Path(sys.argv[3]), float(sys.argv[4]));"
        "print(json.dumps(r))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), case.name, str(folder), str(timeout)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Print the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(CASES):
            row = run_isolated(case, Path(tmp) / f"case{i}")
            lines = [line for line in row["output"].splitlines() if line.strip()]
            row["last_line"] = lines[-1][:100] if lines else ""
            rows.append(row)
            print(
                f"{case.name:<46} exit {row['exit']}  {row['peak_mb']:>7.0f} MB  {row['seconds']:>6.2f} s  "
                f"{row['file_bytes'] / 1e6:>6.2f} MB of files  {row['last_line'][:70]}",
                flush=True,
            )
    Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
