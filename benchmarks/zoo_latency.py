"""Original vs folded latency of every zoo model on CPU runtimes (torch eager, ORT without and with its optimiser).

Usage: .venv/bin/python benchmarks/zoo_latency.py [--iterations 200] [--json benchmarks/zoo_latency.json]
The original runs with every BN: in torch as built, in ONNX Runtime from an export that keeps each BN
(TrainingMode.PRESERVE). The folded model is bnfold's fold, exported by bnfold.export_onnx with the same
(TorchScript) exporter, so the two graphs differ only by the BNs. p50 in ms.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

import bnfold
from bnfold import zoo
from bnfold.bench import benchmark, compare
from bnfold.export import export_keeping_bn

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--json", default="benchmarks/zoo_latency.json")
    args = parser.parse_args()
    import tempfile

    rows = []
    warm = zoo.build("resnet-tiny").eval()  # a throwaway round: the first timings of a process run slow
    benchmark(warm, input_shape=(2, 1, 8, 8), iterations=300, progress=False)
    benchmark(export_keeping_bn(warm, (zoo.example_input("resnet-tiny"),)), iterations=300, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        for name in zoo.ZOO:
            model = zoo.randomize_batchnorm(zoo.build(name), seed=1).eval()
            x = zoo.example_input(name, batch=2)
            folded, _ = bnfold.fold(model, x)
            path = f"{tmp}/{name}.onnx"
            bnfold.export_onnx(folded, x, path, exporter="torchscript")  # the same exporter as the original
            shape = tuple(x.shape)
            kw = {
                "batch_sizes": (1, 32),
                "iterations": args.iterations,
                "warmup": 20,
                "input_shape": shape,
                "progress": False,
            }
            pairs = [  # ONNX Runtime first: torch's OpenMP threads keep spinning a while after torch runs
                (
                    benchmark(export_keeping_bn(model, (x,)), runtimes=("ort-cpu", "ort-cpu-opt"), **kw),
                    benchmark(path, runtimes=("ort-cpu", "ort-cpu-opt"), **kw),
                ),
                (benchmark(model, **kw), benchmark(folded, **kw)),
            ]
            for before, after in pairs:
                for row in compare(before, after)["rows"]:
                    rows.append({"model": name, **row})
            print(f"done {name}", flush=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; p50 latency in ms, median of {args.iterations}"
    )
    header = f"{'model':<14} {'runtime':<12} {'batch':>5} {'original':>9} {'folded':>9} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<14} {r['runtime']:<12} {r['batch_size']:>5} {r['original_p50']:>9.3f} "
            f"{r['folded_p50']:>9.3f} {r['speedup']:>8.2f}x"
        )
    with open(args.json, "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
