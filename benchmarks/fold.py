"""Fold time, BN left and error for bnfold vs torch.fx's fuse, and eager CPU latency before/after.

Usage: .venv/bin/python benchmarks/fold.py [--batch 32] [--iterations 200] [--json benchmarks/fold.json]
Prints a table and writes JSON. Latency: torch eager on CPU, median of ``--iterations`` runs after warm-up;
"floor" is the same model with every BN replaced by nn.Identity (the best a fold can do).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import bnfold
from bnfold import zoo
from bnfold.deploy.error_stats import fold_error


def _bn_left(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _timed(fn, repeats: int = 5) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _latency_ms(model: nn.Module, x: torch.Tensor, iterations: int) -> float:
    with torch.inference_mode():
        for _ in range(max(10, iterations // 10)):
            model(x)
        samples = []
        for _ in range(iterations):
            start = time.perf_counter()
            model(x)
            samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


def _floor(model: nn.Module) -> nn.Module:
    floor = copy.deepcopy(model)
    for name, module in list(floor.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent, _, attr = name.rpartition(".")
            setattr(floor.get_submodule(parent) if parent else floor, attr, nn.Identity())
    return floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--json", default="benchmarks/fold.json")
    args = parser.parse_args()
    rows = []
    for name in zoo.ZOO:
        model = zoo.randomize_batchnorm(zoo.build(name), seed=1).eval()
        x = zoo.example_input(name, batch=args.batch)
        t_bnfold, (folded, report) = _timed(lambda m=model, x=x: bnfold.fold(m, x))
        t_fuse, fused = _timed(lambda m=model: fuse(m))
        rows.append(
            {
                "model": name,
                "bn": report.bn_total,
                "bnfold_ms": 1000 * t_bnfold,
                "bnfold_bn_left": _bn_left(folded),
                "bnfold_err": fold_error(model, folded, (x,)).scaled_max,
                "fx_fuse_ms": 1000 * t_fuse,
                "fx_fuse_bn_left": _bn_left(fused),
                "fx_fuse_err": fold_error(model, fused, (x,)).scaled_max,
                "original_ms": _latency_ms(model, x, args.iterations),
                "folded_ms": _latency_ms(folded, x, args.iterations),
                "floor_ms": _latency_ms(_floor(model), x, args.iterations),
            }
        )
    header = (
        f"{'model':<14} {'BN':>3} | {'bnfold ms':>9} {'left':>4} {'err':>8} | {'fx.fuse ms':>10} {'left':>4} "
        f"{'err':>8} | {'orig ms':>8} {'folded ms':>9} {'floor ms':>8} {'speed-up':>8}"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {platform.processor()}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<14} {r['bn']:>3} | {r['bnfold_ms']:>9.1f} {r['bnfold_bn_left']:>4} "
            f"{r['bnfold_err']:>8.1e} | "
            f"{r['fx_fuse_ms']:>10.1f} {r['fx_fuse_bn_left']:>4} {r['fx_fuse_err']:>8.1e} | {r['original_ms']:>8.3f} "
            f"{r['folded_ms']:>9.3f} {r['floor_ms']:>8.3f} {r['original_ms'] / r['folded_ms']:>7.2f}x"
        )
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.json}; err = max |y - y64| / max |y64| vs the original in float64")


if __name__ == "__main__":
    main()
