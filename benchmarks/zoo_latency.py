"""Original vs folded latency of every zoo model on CPU runtimes, A/B interleaved, with 95% intervals.

Usage: .venv/bin/python benchmarks/zoo_latency.py [--iterations 1000] [--rounds 20] [--json benchmarks/zoo_latency.json]
The original runs with every BN: in torch as built, in ONNX Runtime from an export that keeps each BN
(TrainingMode.PRESERVE). The folded model is bnfold's fold, exported with the same
(TorchScript) exporter at a fixed batch, so the two graphs differ only by the BNs. Both run in interleaved rounds
(bnfold.deploy.ab.compare_models, the machinery of `bnfold bench A B`): p50 in ms, the speed-up and its bootstrap
95% interval; a row whose interval does not clear +-3% reads "no significant difference".
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

import bnfold
from bnfold import zoo
from bnfold.deploy.ab import compare_models, default_threads
from bnfold.deploy.export import export_keeping_bn

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=400, help="timed calls of each model per runtime and batch")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default="benchmarks/zoo_latency.json")
    args = parser.parse_args()
    threads = args.threads or default_threads()
    rows = []
    for name in zoo.ZOO:
        model = zoo.randomize_batchnorm(zoo.build(name), seed=1).eval()
        x = zoo.example_input(name, batch=2)
        folded, _ = bnfold.fold(model, x)
        shape = tuple(x.shape)
        for batch in (1, 32):
            kw = {
                "batch_sizes": (batch,),
                "iterations": args.iterations,
                "rounds": args.rounds,
                "threads": threads,
                "warmup": 20,
                "input_shape": (batch, *shape[1:]),
            }
            original_onnx = export_keeping_bn(model, (torch.zeros(batch, *shape[1:]),))
            folded_onnx = export_keeping_bn(folded, (torch.zeros(batch, *shape[1:]),))
            results = [  # ONNX Runtime first: torch's OpenMP threads keep spinning a while after torch runs
                compare_models(original_onnx, folded_onnx, runtimes=("ort-cpu", "ort-cpu-opt"), **kw),
                compare_models(model, folded, runtimes=("torch-cpu",), **kw),
            ]
            for result in results:
                rows += [{"model": name, **r.to_dict()} for r in result.rows]
        print(f"done {name}", flush=True)
    print(
        f"torch {torch.__version__}, {threads} thread(s); p50 latency in ms; {args.iterations} calls of each model "
        f"in {args.rounds} interleaved rounds; speed-up = original p50 / folded p50 with its 95% bootstrap interval"
    )
    header = f"{'model':<14} {'runtime':<12} {'batch':>5} {'original':>9} {'folded':>9}  speed-up (95% interval)"
    print(header)
    print("-" * (len(header) + 10))
    for r in rows:
        if r["verdict"] == "no significant difference":
            ratio = f"no significant difference ({r['low']:.2f}-{r['high']:.2f})"
        else:
            ratio = f"{r['speedup']:.2f}x ({r['low']:.2f}-{r['high']:.2f})"
        noisy = "  noisy" if r["noisy"] else ""
        print(
            f"{r['model']:<14} {r['runtime']:<12} {r['batch_size']:>5} {r['original_p50']:>9.3f} "
            f"{r['folded_p50']:>9.3f}  {ratio}{noisy}"
        )
    with open(args.json, "w") as f:
        json.dump(
            {"torch": torch.__version__, "threads": threads, "iterations": args.iterations, "rows": rows}, f, indent=2
        )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
