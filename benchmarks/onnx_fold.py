"""ONNX BN folding: bnfold vs onnxoptimizer, onnxsim, onnxscript and ONNX Runtime's basic level.

Usage: .venv/bin/python benchmarks/onnx_fold.py [--json benchmarks/onnx_fold.json] [--skip-resnet50]
For each model (the zoo, plus a ResNet-50-sized net built here), exported by torch.onnx with every BN kept
(TrainingMode.PRESERVE): BN nodes left, max error against the torch model run in float64 (the folded file
run by ONNX Runtime with its optimisations off), and time (median of 3; load + fold + save for every tool,
so the floor, onnx.load + onnx.save, is comparable). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from bnfold import zoo
from bnfold.deploy.export import export_keeping_bn
from bnfold.deploy.onnx_reference import run_ort
from bnfold.onnx_fold import fold_onnx

warnings.filterwarnings("ignore")


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))


def resnet50() -> nn.Module:
    """ResNet-50's layout (3-4-6-3 bottlenecks, 25.5 M parameters, 53 BN) without torchvision."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for i, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, 2 if i and b == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*layers)


def _bnfold(src: str, dst: str) -> None:
    folded, _ = fold_onnx(src)
    onnx.save(folded, dst)


def _onnxoptimizer(src: str, dst: str) -> None:
    import onnxoptimizer

    onnx.save(onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst)


def _onnxsim(src: str, dst: str) -> None:
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(src))
    onnx.save(model, dst)


def _onnxscript(src: str, dst: str) -> None:
    import onnxscript.optimizer
    import onnxscript.rewriter

    model = onnxscript.optimizer.optimize(onnx.load(src))
    onnx.save(onnxscript.rewriter.rewrite(model), dst)


def _ort_basic(src: str, dst: str) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = dst
    options.log_severity_level = 3
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])


def _floor(src: str, dst: str) -> None:
    onnx.save(onnx.load(src), dst)


TOOLS = {
    "bnfold": _bnfold,
    "onnxoptimizer": _onnxoptimizer,
    "onnxsim": _onnxsim,
    "onnxscript": _onnxscript,
    "ort-basic": _ort_basic,
    "floor (load+save)": _floor,
}


def _measure(tool, src: str, dst: str, x: np.ndarray, truth: np.ndarray, repeats: int) -> dict:
    times = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            tool(src, dst)
            times.append(time.perf_counter() - start)
        model = onnx.load(dst)
        left = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        got = run_ort(dst, {"input": x})[0]
        err = float(np.abs(got - truth).max() / np.abs(truth).max())
    except Exception as error:  # noqa: BLE001 - a tool failing is a result
        return {"error": f"{type(error).__name__}: {str(error)[:120]}"}
    return {"seconds": statistics.median(times), "bn_left": left, "err": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/onnx_fold.json")
    parser.add_argument("--skip-resnet50", action="store_true")
    args = parser.parse_args()
    models = [(name, zoo.build(name), zoo.example_input(name, batch=4)) for name in zoo.ZOO]
    if not args.skip_resnet50:
        models.append(
            ("resnet50-size", resnet50(), torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0)))
        )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, x in models:
            model = zoo.randomize_batchnorm(model, seed=2).eval()
            src = os.path.join(tmp, f"{name}.onnx")
            with open(src, "wb") as f:
                f.write(export_keeping_bn(model, x).SerializeToString())
            with torch.no_grad():
                truth = copy.deepcopy(model).double()(x.double()).numpy()
            bn = sum(n.op_type == "BatchNormalization" for n in onnx.load(src).graph.node)
            row = {
                "model": name,
                "bn": bn,
                "size_mb": os.path.getsize(src) / 2**20,
                "original_err": float(
                    np.abs(run_ort(src, {"input": x.numpy()})[0] - truth).max() / np.abs(truth).max()
                ),
            }
            for tool_name, tool in TOOLS.items():
                row[tool_name] = _measure(
                    tool, src, os.path.join(tmp, f"{name}.{tool_name[:6]}.onnx"), x.numpy(), truth, repeats=3
                )
            rows.append(row)
            print(f"done {name}", flush=True)
    print("cells: BN left / max error vs float64 torch (of output scale) / seconds")
    print(f"{'model':<14} {'BN':>3} " + " ".join(f"{t:>24}" for t in TOOLS))
    for row in rows:
        cells = []
        for tool_name in TOOLS:
            r = row[tool_name]
            cells.append(
                f"{'failed':>24}" if "error" in r else f"{r['bn_left']:>3} {r['err']:>8.1e} {r['seconds']:>9.3f}s"
            )
        print(f"{row['model']:<14} {row['bn']:>3} " + " ".join(f"{c:>24}" for c in cells))
    for row in rows:
        for tool_name in TOOLS:
            if "error" in row[tool_name]:
                print(f"{row['model']} / {tool_name}: {row[tool_name]['error']}")
    with open(args.json, "w") as f:
        json.dump({"torch": torch.__version__, "onnx": onnx.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
