"""The end-to-end demo on the built-in zoo: no arguments, no downloads."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from bnfold import zoo
from bnfold.compare import fold_error
from bnfold.errors import BnfoldError
from bnfold.torch_fold import fold

__all__ = ["DemoResult", "run_demo"]


@dataclasses.dataclass
class DemoResult:
    """What the demo measured, as rows and as text."""

    rows: list[dict[str, Any]]
    text: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"models": self.rows}


def run_demo(names: list[str]) -> DemoResult:
    """Build each zoo model, give its BNs non-trivial statistics, fold it and measure the error.

    Raises:
        BnfoldError: An unknown zoo name.
    """
    rows, blocks = [], []
    for name in names:
        if name not in zoo.ZOO:
            raise BnfoldError(f"--arch {name}: not a zoo model ({', '.join(zoo.ZOO)})")
        model = zoo.randomize_batchnorm(zoo.build(name), seed=1).eval()
        inputs = (zoo.example_input(name, batch=8),)
        start = time.perf_counter()
        folded, report = fold(model, inputs)
        seconds = time.perf_counter() - start
        stats = fold_error(model, folded, inputs)
        original_stats = fold_error(model, model, inputs)
        rows.append(
            {
                "model": name,
                "bn_total": report.bn_total,
                "bn_folded": report.bn_folded,
                "fold_seconds": round(seconds, 4),
                "folded_error": stats.scaled_max,
                "original_fp32_error": original_stats.scaled_max,
                "report": report.to_dict(),
            }
        )
        blocks.append(f"== {name}: {zoo.ZOO[name].description}\n{report}")
    header = f"{'model':<15} {'BN':>3} {'folded':>6} {'fold ms':>8} {'err folded':>11} {'err fp32 orig':>13}"
    table = [header, "-" * len(header)]
    for row in rows:
        table.append(
            f"{row['model']:<15} {row['bn_total']:>3} {row['bn_folded']:>6} {1000 * row['fold_seconds']:>8.1f} "
            f"{row['folded_error']:>11.2e} {row['original_fp32_error']:>13.2e}"
        )
    table.append("errors: max |y - y64| / max |y64| against the original model run in float64")
    return DemoResult(rows, "\n\n".join(blocks) + "\n\n" + "\n".join(table))
