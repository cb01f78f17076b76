"""Wall time and peak memory of folding against model bytes and graph size: bnfold beside ONNX Runtime and onnxsim.

Usage: .venv/bin/python benchmarks/scale.py [--sizes 100,500,2300] [--blocks 100,1000,10000]
       [--tools bnfold,ort,onnxsim] [--folder DIR] [--json benchmarks/scale.json]

Models are built here with onnx and numpy (no torch): Conv CxC 3x3 + BatchNormalization + Relu blocks,
random weights, randomised BN statistics, weights as external data (one ``.data`` file beside the model).
By bytes: C = 1024 and as many blocks as the size needs (37.7 MB of weights each). By graph size: C = 8.
Each tool runs as its own process; peak RSS comes from ``wait4`` on that process:

* ``bnfold``: ``bnfold fold in.onnx -o out.onnx`` (load, fold, check, save);
* ``ort``: ONNX Runtime's basic level (which folds Conv+BN) writing the optimised model, external data included;
* ``onnxsim``: ``onnxsim in.onnx out.onnx`` (its default: constant folding and fusions).

Afterwards the input and bnfold's output are run by ONNX Runtime (optimiser off) on one seeded input and
compared; ``match`` is the largest difference relative to the output's largest magnitude.

Also measured: a ResNet-50-sized net with inline weights (``--skip-resnet50`` skips it and the torch case);
each tool's peak on a 2-block model (its fixed cost: interpreter and libraries), from which "above
baseline" is counted; start-up (``bnfold fold small.onnx`` beside ``python -c "import onnx, onnxruntime"``,
median of 5); and the PyTorch path, ``bnfold.fold(model, inplace=True)`` on 1.1 GB of Linear + BatchNorm1d
blocks, its peak RSS above the RSS before folding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from peak_rss import LAUNCH

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("bnfold", "ort", "onnxsim")
BLOCK_BYTES = 1024 * 1024 * 9 * 4


ORT_BASIC = """
import os, sys, time, onnxruntime as ort
start = time.perf_counter()
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
options.optimized_model_filepath = sys.argv[2]
data = os.path.basename(sys.argv[2]) + ".data"
options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data)
options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
print(time.perf_counter() - start)  # the work, imports excluded
"""


def build(path: Path, blocks: int, channels: int, spatial: int = 8, seed: int = 0) -> int:
    """Write a Conv+BN+Relu chain with external data; return its weight bytes."""
    rng = np.random.default_rng(seed)
    data = path.with_name(path.name + ".data")
    nodes, inits = [], []
    offset = 0
    with open(data, "wb") as handle:

        def external(name: str, array: np.ndarray) -> None:
            nonlocal offset
            raw = np.ascontiguousarray(array, dtype=np.float32).tobytes()
            handle.write(raw)
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                tensor.external_data.add(key=key, value=value)
            inits.append(tensor)
            offset += len(raw)

        previous = "x"
        for b in range(blocks):
            fan_in = channels * 9
            external(f"w{b}", rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) / np.sqrt(fan_in))
            for name, values in (
                ("g", rng.uniform(0.5, 1.5, channels)),
                ("b", rng.uniform(-0.2, 0.2, channels)),
                ("m", rng.uniform(-0.2, 0.2, channels)),
                ("v", rng.uniform(0.5, 1.5, channels)),
            ):
                external(f"{name}{b}", values.astype(np.float32))
            nodes.append(helper.make_node("Conv", [previous, f"w{b}"], [f"c{b}"], pads=[1, 1, 1, 1], name=f"conv{b}"))
            nodes.append(
                helper.make_node(
                    "BatchNormalization", [f"c{b}", f"g{b}", f"b{b}", f"m{b}", f"v{b}"], [f"n{b}"], name=f"bn{b}"
                )
            )
            nodes.append(helper.make_node("Relu", [f"n{b}"], [f"r{b}"], name=f"relu{b}"))
            previous = f"r{b}"
    graph = helper.make_graph(
        nodes,
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, spatial, spatial])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1, channels, spatial, spatial])],
        inits,
    )
    model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return offset


def run(command: list[str], cwd: Path, timeout: float) -> dict:
    """Run ``command``; its exit status, seconds, peak RSS in MB (wait4, in a small launcher) and last line."""
    log, peak = cwd / ".log", cwd / ".peak"
    peak.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            code = subprocess.run(
                [sys.executable, "-c", LAUNCH, str(peak), *command],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            code = -9
    seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    peak_kb = int(peak.read_text()) if peak.exists() else 0
    return {"exit": code, "seconds": round(seconds, 2), "peak_mb": round(peak_kb / 1024, 1), "last_line": tail[0][:200]}


def tool_command(tool: str, source: Path, out: Path) -> list[str]:
    if tool == "bnfold":
        return [sys.executable, "-m", "bnfold", "fold", str(source), "-o", str(out), "--force", "--quiet"]
    if tool == "ort":
        return [sys.executable, "-c", ORT_BASIC, str(source), str(out)]
    return [sys.executable, "-m", "onnxsim", str(source), str(out)]


def match(source: Path, folded: Path, channels: int, spatial: int = 8) -> float:
    """Largest output difference between two files (run by ONNX Runtime, optimiser off), relative to the output."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = np.random.default_rng(1).standard_normal((1, channels, spatial, spatial)).astype(np.float32)
    outs = []
    for path in (source, folded):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outs.append(session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64))
        del session
    scale = float(np.abs(outs[0]).max()) or 1.0
    return float(np.abs(outs[0] - outs[1]).max()) / scale


def _match_isolated(source: Path, folded: Path, channels: int, spatial: int = 8) -> float:
    """:func:`match` in its own process, so this process stays small (its size would show in later forks)."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import scale, pathlib; "
    code += (
        "print(scale.match(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))"
    )
    args = [str(Path(__file__).parent), str(source), str(folded), str(channels), str(spatial)]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def bn_left(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


WORK_CASES = ("2300 MB", "resnet50-size")


def _work_row(label: str, source: Path, folder: Path) -> dict:
    row = {"case": label}
    for tool in ("bnfold", "ort"):
        row[tool] = round(work_seconds(tool, source, folder / f"work-{tool}.onnx"), 2)
    print(f"work only (imports excluded, median of 3): {label}: bnfold {row['bnfold']} s, ort {row['ort']} s")
    return row


WORK: list[dict] = []


def sweep(label: str, blocks: int, channels: int, tools: list[str], folder: Path, timeout: float) -> list[dict]:
    case = folder / label
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    source = case / "in.onnx"
    weight_bytes = build(source, blocks, channels)
    rows = []
    for tool in tools:
        out = case / f"{tool}.onnx"
        result = run(tool_command(tool, source, out), case, timeout)
        row = {"case": label, "blocks": blocks, "channels": channels, "weight_mb": round(weight_bytes / 2**20, 1)}
        row |= {"tool": tool, **result}
        row["memory_x_model"] = round(result["peak_mb"] / (weight_bytes / 2**20), 2)
        if result["exit"] == 0 and out.exists():
            row["bn_left"] = bn_left(out)
            row["match"] = _match_isolated(source, out, channels) if tool == "bnfold" else None
        rows.append(row)
        print(_line(row), flush=True)
        for leftover in case.glob(f"{tool}.onnx*"):
            leftover.unlink()
    if label in WORK_CASES:
        WORK.append(_work_row(label, source, case))
    shutil.rmtree(case, ignore_errors=True)
    return rows


def _line(row: dict) -> str:
    match_text = f"{row['match']:.1e}" if row.get("match") is not None else "-"
    return (
        f"{row['case']:<14} {row['tool']:<8} {row['weight_mb']:>9.1f} {row['blocks']:>6} {row['exit']:>4} "
        f"{row['seconds']:>8.2f} {row['peak_mb']:>9.0f} {row['memory_x_model']:>6.2f} "
        f"{row.get('bn_left', '-')!s:>7} {match_text:>8}"
    )


def resnet50_case(tools: list[str], folder: Path, timeout: float) -> list[dict]:
    """A ResNet-50-sized net (53 BN, 25.5 M parameters) exported with every BN kept, inline weights."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from onnx_fold import resnet50

    from bnfold.deploy.export import export_keeping_bn

    case = folder / "resnet50"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    source = case / "in.onnx"
    model = resnet50()
    source.write_bytes(export_keeping_bn(model, (torch.zeros(1, 3, 112, 112),)).SerializeToString())
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    rows = []
    for tool in tools:
        out = case / f"{tool}.onnx"
        result = run(tool_command(tool, source, out), case, timeout)
        row = {"case": "resnet50-size", "blocks": 53, "channels": 0, "weight_mb": round(weight_bytes / 2**20, 1)}
        row |= {"tool": tool, **result, "memory_x_model": round(result["peak_mb"] / (weight_bytes / 2**20), 2)}
        if result["exit"] == 0 and out.exists():
            row["bn_left"] = bn_left(out)
            row["match"] = _match_isolated(source, out, 3, 112) if tool == "bnfold" else None
        rows.append(row)
        print(_line(row), flush=True)
    WORK.append(_work_row("resnet50-size", source, case))
    shutil.rmtree(case, ignore_errors=True)
    return rows


WORK_ONLY = {  # the same jobs timed inside the process, after the imports: the work itself
    "bnfold": (
        "import sys, time\nfrom bnfold.onnx_fold import fold_onnx, load_onnx, save_onnx\n"
        "from bnfold.onnx_fold.files import Scratch, keeps_data_apart, uses_external_data\n"
        "start = time.perf_counter()\n"
        "model = load_onnx(sys.argv[1], lazy=True); external = keeps_data_apart(model)\n"
        "from pathlib import Path\nout = Path(sys.argv[2])\n"
        "scratch = Scratch(out.parent, out.name) if uses_external_data(model) else None\n"
        "folded, _ = fold_onnx(model, copy=False, scratch=scratch)\n"
        "save_onnx(folded, out, external_data=True if external else None, scratch=scratch)\n"
        "print(time.perf_counter() - start)\n"
    ),
    "ort": ORT_BASIC,
}


def work_seconds(tool: str, source: Path, out: Path, repeats: int = 3) -> float:
    """Median seconds of the job inside its process (interpreter start and imports excluded)."""
    times = []
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, "-c", WORK_ONLY[tool], str(source), str(out)], capture_output=True, text=True
        )
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
        times.append(float(done.stdout.strip().splitlines()[-1]))
    for leftover in out.parent.glob(out.name + "*"):
        leftover.unlink()
    return sorted(times)[len(times) // 2]


TORCH_INPLACE = """
import json, resource, sys, time, torch
from torch import nn
import bnfold
blocks = int(sys.argv[1])
torch.manual_seed(0)
layers = []
for _ in range(blocks):
    bn = nn.BatchNorm1d(4096)
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    layers += [nn.Linear(4096, 4096), bn, nn.ReLU()]
model = nn.Sequential(*layers).eval()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
folded, report = bnfold.fold(model, torch.randn(2, 4096), inplace=True)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"weight_mb": round(weights, 1), "rss_before_fold_mb": round(before, 1), "peak_mb": round(peak, 1),
                  "extra_x_model": round((peak - before) / weights, 3), "seconds": round(seconds, 2),
                  "bn_folded": report.bn_folded, "note": (report.notes or [""])[-1]}))
"""


def torch_inplace(blocks: int = 17) -> dict:
    """``bnfold.fold(model, inplace=True)`` on Linear 4096x4096 + BatchNorm1d blocks (17: 1.1 GB of weights)."""
    done = subprocess.run([sys.executable, "-c", TORCH_INPLACE, str(blocks)], capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_up(folder: Path, repeats: int = 5) -> dict:
    """Median seconds of ``bnfold fold small.onnx`` beside ``python -c 'import onnx, onnxruntime'``."""
    case = folder / "start-up"
    case.mkdir(parents=True, exist_ok=True)
    source = case / "small.onnx"
    build(source, 2, 8)
    fold = [sys.executable, "-m", "bnfold", "fold", str(source), "-o", str(case / "out.onnx"), "--force", "--quiet"]
    imports = [sys.executable, "-c", "import onnx, onnxruntime"]
    times = {"bnfold fold small.onnx": [], "python -c 'import onnx, onnxruntime'": []}
    for _ in range(repeats):
        for label, command in zip(times, (fold, imports), strict=True):
            times[label].append(run(command, case, 60)["seconds"])
    medians = {label: sorted(values)[len(values) // 2] for label, values in times.items()}
    baselines = {tool: run(tool_command(tool, source, case / f"{tool}.onnx"), case, 60)["peak_mb"] for tool in TOOLS}
    shutil.rmtree(case, ignore_errors=True)
    return {"seconds": medians, "baseline_peak_mb": baselines}


def main() -> None:
    """Build the models, run each tool, print the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,500,2300", help="model sizes in MB (C=1024 blocks)")
    parser.add_argument("--blocks", default="100,1000,10000", help="graph sizes in blocks (C=8)")
    parser.add_argument("--tools", default="bnfold,ort,onnxsim")
    parser.add_argument("--folder", default=None, help="where the models are built (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--skip-resnet50", action="store_true", help="skip the ResNet-50-sized case (needs torch)")
    parser.add_argument("--json", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    tools = [t for t in args.tools.split(",") if t]
    folder = Path(args.folder or tempfile.mkdtemp(prefix="bnfold-scale-"))
    print(
        f"{'case':<14} {'tool':<8} {'weight MB':>9} {'blocks':>6} {'exit':>4} {'seconds':>8} {'peak MB':>9} "
        f"{'x model':>6} {'BN left':>7} {'match':>8}"
    )
    rows = []
    for size in [int(s) for s in args.sizes.split(",") if s]:
        blocks = max(1, round(size * 2**20 / BLOCK_BYTES))
        rows += sweep(f"{size} MB", blocks, 1024, tools, folder, args.timeout)
    for blocks in [int(b) for b in args.blocks.split(",") if b]:
        rows += sweep(f"{blocks} blocks", blocks, 8, tools, folder, args.timeout)
    if not args.skip_resnet50:
        rows += resnet50_case(tools, folder, args.timeout)
    inplace = torch_inplace() if not args.skip_resnet50 else None
    if inplace:
        print(f"PyTorch path, bnfold.fold(inplace=True): {inplace}")
    startup = start_up(folder)
    for label, seconds in startup["seconds"].items():
        print(f"start-up: {label}: {seconds:.2f} s (median of 5)")
    for row in rows:  # memory above what the tool's process takes for a tiny model (interpreter, libraries)
        base = startup["baseline_peak_mb"].get(row["tool"], 0.0)
        row["baseline_mb"] = base
        row["above_baseline_x_model"] = round(max(0.0, row["peak_mb"] - base) / row["weight_mb"], 2)
    print("peak RSS of each tool on a 2-block model (its fixed cost):", startup["baseline_peak_mb"])
    print(f"{'case':<14} {'tool':<8} {'x model above that':>18}")
    for row in rows:
        print(f"{row['case']:<14} {row['tool']:<8} {row['above_baseline_x_model']:>18.2f}")
    if not args.folder:
        shutil.rmtree(folder, ignore_errors=True)
    import onnxruntime

    meta = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "cpus": os.cpu_count()}
    Path(args.json).write_text(
        json.dumps({**meta, "rows": rows, "work_only": WORK, "start_up": startup, "torch_inplace": inplace}, indent=2)
        + "\n"
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
