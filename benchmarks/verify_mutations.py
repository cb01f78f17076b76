"""Mutation testing of `verify`: detection rate of planted real changes, passes of rounding-level ones, power.

Usage: python benchmarks/verify_mutations.py [--per-kind 12] [--onnx] [--json benchmarks/verify_mutations.json]

For each zoo model (random BN statistics, folded by bnfold): changes of each kind in
bnfold.deploy.mutations.REAL_KINDS, in random layers, with relative sizes drawn log-uniformly
from 1e-5 to 1e-1, plus rounding-level changes (every weight of a layer moved by one ulp).
A change is "real" when its exact (float64) effect exceeds verify's bound by 2x somewhere
on verify's inputs; those must be MISMATCH, rounding-level ones PASS. "smallest caught" is
the smallest relative size verify flagged: its power on these inputs. "excused" counts real
changes caught whose localisation carries a verdict that clears the fold (ill-conditioned
layer, a layer's own rounding, the candidate's float32 arithmetic): it must be 0. With ``--onnx``
each candidate is the mutated module's ONNX export (BN kept), checked on ONNX Runtime against
the module, as ``bnfold fold CKPT -o x.onnx --verify`` checks a fold
(``benchmarks/verify_mutations_onnx.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bnfold  # noqa: E402
from bnfold import zoo  # noqa: E402
from bnfold.deploy.mutations import REAL_KINDS, effect, plant, plant_rounding  # noqa: E402
from bnfold.deploy.verify import verify  # noqa: E402

# the localisation verdicts that say the divergence is not the fold's
EXCUSES = ("ill-conditioned there", "its own rounding there", "its weights are right there")


def _candidate(model: object, shapes: list[tuple[int, ...]], onnx: bool) -> object:
    """The module itself, or with ``onnx`` its ONNX export (BN kept, at the check's input shape)."""
    if not onnx:
        return model
    import torch

    from bnfold.deploy.export import export_keeping_bn

    example = torch.randn(shapes[0], generator=torch.Generator().manual_seed(0))  # the global RNG stays untouched
    return export_keeping_bn(model, (example,), dynamic_batch=False)


def main() -> None:
    """Print the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-kind", type=int, default=12)
    parser.add_argument("--onnx", action="store_true", help="Candidates are the mutated modules' ONNX exports.")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.json is None:
        args.json = str(
            Path(__file__).with_name("verify_mutations_onnx.json" if args.onnx else "verify_mutations.json")
        )
    rows = []
    print(
        f"{'model':<15} {'real':>5} {'caught':>6} {'excused':>7} {'rounding':>8} {'passed':>6} {'between':>7}  "
        "smallest caught"
    )
    for name in zoo.ZOO:
        model = zoo.randomize_batchnorm(zoo.build(name)).eval()
        folded, _ = bnfold.fold(model)
        shapes = [(4, *zoo.ZOO[name].input_shape)]
        rng = np.random.default_rng(0)
        real = caught = excused = rounding = passed = between = 0
        smallest: dict[str, float] = {}
        for kind in REAL_KINDS:
            for _ in range(args.per_kind):
                size = float(10 ** rng.uniform(-5, -1))
                mutation = plant(model if kind == "bn-statistic" else folded, kind, rng, size)
                if mutation is None:
                    continue
                result = verify(model, _candidate(mutation.model, shapes, args.onnx), input_shapes=shapes)
                flagged = not result.passed
                said = " ".join(r.first_divergence or "" for r in result.runtimes)
                if flagged and kind not in ("sign-flip", "transposed-kernel"):
                    smallest[kind] = min(smallest.get(kind, 1.0), size)
                if effect(model, mutation.model, shapes) > 2.0:
                    real += 1
                    caught += flagged
                    excused += flagged and any(e in said for e in EXCUSES)
                else:
                    between += 1
        for _ in range(args.per_kind):
            mutation = plant_rounding(folded, rng)
            rounding += 1
            passed += verify(model, _candidate(mutation.model, shapes, args.onnx), input_shapes=shapes).passed
        power = ", ".join(f"{k} {v:.1e}" for k, v in sorted(smallest.items()))
        print(
            f"{name:<15} {real:>5} {caught:>6} {excused:>7} {rounding:>8} {passed:>6} {between:>7}  {power}", flush=True
        )
        rows.append(
            {
                "model": name,
                "real": real,
                "caught": caught,
                "excused": excused,
                "rounding": rounding,
                "rounding_passed": passed,
                "within_bound_not_counted": between,
                "smallest_caught": smallest,
            }
        )
    total_real, total_caught = sum(r["real"] for r in rows), sum(r["caught"] for r in rows)
    total_round, total_pass = sum(r["rounding"] for r in rows), sum(r["rounding_passed"] for r in rows)
    total_excused = sum(r["excused"] for r in rows)
    print(
        f"detection {total_caught}/{total_real} real changes ({total_excused} of them excused as not the fold's); "
        f"{total_pass}/{total_round} rounding-level passed"
    )
    Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
