"""Structural reparameterization: bnfold's branch merge beside each family's own ``reparameterize``.

Usage (needs .venv-zoo, made by scripts/zoo_env.sh: torch 2.14 + timm):

    .venv-zoo/bin/python benchmarks/reparam.py                 # every RepVGG and MobileOne variant in timm
    .venv-zoo/bin/python benchmarks/reparam.py --models repvgg_a0,mobileone_s0 --size 64

Per model, in its training-time form (random weights, randomised BN statistics): the ONNX export
with every BN kept (TorchScript exporter), then ``bnfold.fold_onnx`` on it, beside timm's
``reparameterize_model`` exported the same way. Columns: BN and Conv count of the training
form, of bnfold's result and of timm's; max error of each against the float64 training-form
model (over 4 independent inputs), beside the training form's own float32 error; bnfold's
fold seconds; and ONNX Runtime (CPU, its default optimisations, 2 threads) latency of bnfold's
result against timm's, as a
ratio with its 95% interval from interleaved rounds (``bnfold.deploy.ab``). Then the PyTorch
path: ``bnfold.fold`` on the module beside timm's reparameterized module: BN left, conv count,
whether the model keeps its class, error, and eager CPU latency (timm's / bnfold's). Writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bnfold  # noqa: E402
from bnfold.deploy.ab import compare_models  # noqa: E402
from bnfold.deploy.export import export_keeping_bn  # noqa: E402
from bnfold.deploy.onnx_reference import run_ort  # noqa: E402
from bnfold.onnx_fold import fold_onnx  # noqa: E402
from bnfold.zoo import randomize_batchnorm  # noqa: E402

DRAWS = 4  # independent inputs the errors are the max over


def _count(model, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


def _error(model, xs: list[np.ndarray], truths: list[np.ndarray]) -> float:
    """Max error over the input draws, relative to the output's scale."""
    worst = 0.0
    for x, truth in zip(xs, truths, strict=True):
        got = run_ort(model, {"input": x})[0]
        worst = max(worst, float(np.abs(got - truth).max() / np.abs(truth).max()))
    return worst


def run_one(name: str, size: int, rounds: int, iterations: int) -> dict:
    """One model: export, fold, timm's reparameterization, errors and latency."""
    import timm
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model(name, pretrained=False), seed=1).eval()
    x = torch.randn(1, 3, size, size)
    draws = [torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(s)) for s in range(DRAWS)]
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        truths = [reference(d.double()).numpy() for d in draws]
    trained = export_keeping_bn(model, x, dynamic_batch=False)
    start = time.perf_counter()
    folded, report = fold_onnx(trained)
    fold_s = time.perf_counter() - start
    theirs = export_keeping_bn(reparameterize_model(copy.deepcopy(model)), x, dynamic_batch=False)
    xs = [d.numpy() for d in draws]
    row = {
        "model": name,
        "input": [1, 3, size, size],
        "bn_train": _count(trained, "BatchNormalization"),
        "conv_train": _count(trained, "Conv"),
        "bn_bnfold": _count(folded, "BatchNormalization"),
        "conv_bnfold": _count(folded, "Conv"),
        "bn_timm": _count(theirs, "BatchNormalization"),
        "conv_timm": _count(theirs, "Conv"),
        "merges": len(report.merges),
        "err_own": _error(trained, xs, truths),
        "err_bnfold": _error(folded, xs, truths),
        "err_timm": _error(theirs, xs, truths),
        "fold_s": round(fold_s, 3),
    }
    ab = compare_models(theirs, folded, runtimes=("ort-cpu-opt",), iterations=iterations, rounds=rounds, threads=2)
    row["latency"] = ab.rows[0].to_dict()
    # the PyTorch path: bnfold.fold on the module (merged blocks become GraphModules in the model's class)
    timm_module = reparameterize_model(copy.deepcopy(model)).eval()
    start = time.perf_counter()
    module, module_report = bnfold.fold(model, x)
    row["fold_module_s"] = round(time.perf_counter() - start, 3)
    row["bn_module"] = module_report.bn_kept
    row["conv_module"] = sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    row["conv_timm_module"] = sum(isinstance(m, torch.nn.Conv2d) for m in timm_module.modules())
    row["class_kept"] = type(module).__name__ == type(model).__name__
    with torch.no_grad():
        row["err_module_own"] = max(  # the training-form module in eager float32: the module path's floor
            float((model(d).double() - torch.from_numpy(t)).abs().max() / abs(t).max())
            for d, t in zip(draws, truths, strict=True)
        )
        row["err_module"] = max(
            float((module(d).double() - torch.from_numpy(t)).abs().max() / abs(t).max())
            for d, t in zip(draws, truths, strict=True)
        )
    eager = compare_models(
        timm_module,
        module,
        input_shape=tuple(x.shape),
        runtimes=("torch-cpu",),
        iterations=iterations,
        rounds=rounds,
        threads=2,
    )
    row["latency_eager"] = eager.rows[0].to_dict()
    return row


def _latency_text(row: dict, key: str = "latency") -> str:
    lat = row.get(key) or {}
    if "speedup" not in lat:
        return "-"
    text = f"{lat['speedup']:.2f}x [{lat['low']:.2f}, {lat['high']:.2f}] {lat['verdict']}"
    return text + (f" (noisy: {lat['noisy']})" if lat.get("noisy") else "")


def main() -> None:
    """Run the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated timm names (default: every repvgg* and mobileone*)")
    parser.add_argument("--size", type=int, default=96, help="input height and width")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--json", default=str(Path(__file__).with_name("reparam.json")))
    args = parser.parse_args()
    import timm

    names = args.models.split(",") if args.models else timm.list_models("repvgg*") + timm.list_models("mobileone*")
    warnings.filterwarnings("ignore")
    rows = []
    header = (
        f"{'model':<16} {'BN':>4} {'conv':>5} | {'bnfold BN':>9} {'conv':>5} | {'timm BN':>7} {'conv':>5} | "
        f"{'err own':>9} {'bnfold':>9} {'timm':>9} | {'fold s':>6} | ORT latency, timm's time / bnfold's"
    )
    print(header)
    for name in names:
        try:
            row = run_one(name, args.size, args.rounds, args.iterations)
        except Exception as error:  # noqa: BLE001 - one model's failure is a row, not the end of the table
            row = {"model": name, "error": f"{type(error).__name__}: {error}"[:200]}
            print(f"{name:<16} failed: {row['error']}", flush=True)
            rows.append(row)
            continue
        rows.append(row)
        print(
            f"{name:<16} {row['bn_train']:>4} {row['conv_train']:>5} | {row['bn_bnfold']:>9} {row['conv_bnfold']:>5} | "
            f"{row['bn_timm']:>7} {row['conv_timm']:>5} | {row['err_own']:>9.2e} {row['err_bnfold']:>9.2e} "
            f"{row['err_timm']:>9.2e} | {row['fold_s']:>6.2f} | {_latency_text(row)}\n"
            f"{'':<16} module path: BN {row['bn_module']}, conv {row['conv_module']} (timm {row['conv_timm_module']}), "
            f"own class {row['class_kept']}, error {row['err_module']:.2e} (own {row['err_module_own']:.2e}), "
            f"fold {row['fold_module_s']:.2f} s, "
            f"eager latency timm / bnfold {_latency_text(row, 'latency_eager')}",
            flush=True,
        )
    Path(args.json).write_text(json.dumps({"size": args.size, "rows": rows}, indent=2))
    ok = [r for r in rows if "error" not in r]
    same = sum(r["bn_bnfold"] == r["bn_timm"] == 0 and r["conv_bnfold"] == r["conv_timm"] for r in ok)
    same_module = sum(r["bn_module"] == 0 and r["conv_module"] == r["conv_timm_module"] and r["class_kept"] for r in ok)
    print(f"\n{len(ok)} of {len(rows)} ran; ONNX: {same} reach 0 BN and timm's conv count; modules: {same_module}")
    print(
        f"worst bnfold error / own error: {max((r['err_bnfold'] / r['err_own'] for r in ok), default=0):.2f} (ONNX), "
        f"{max((r['err_module'] / r['err_module_own'] for r in ok), default=0):.2f} (modules, against eager's own)"
    )


if __name__ == "__main__":
    main()
