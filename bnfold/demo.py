"""The end-to-end demo on the built-in zoo: no arguments, no downloads."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from bnfold import zoo
from bnfold.deploy.error_stats import fold_error
from bnfold.errors import BnfoldError
from bnfold.torch_fold import fold

__all__ = ["DemoResult", "run_demo", "run_trained_demo"]


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


def run_trained_demo(checkpoint: str | None) -> DemoResult:
    """A real trained model end to end: load (or train briefly), fold, export ONNX, verify, held-out accuracy.

    Args:
        checkpoint: A bnfold trainer checkpoint; None trains resnet-tiny on digits for two epochs.
    """
    import tempfile

    import torch

    from bnfold.deploy.export import export_onnx
    from bnfold.deploy.runtimes import run_onnx
    from bnfold.deploy.verify import verify
    from bnfold.model_io.loading import load_detailed
    from bnfold.onnx_fold import load_onnx
    from bnfold.training.data import load_dataset
    from bnfold.training.trainer import TrainConfig, train

    if checkpoint:
        loaded = load_detailed(checkpoint)
        model, shape, source = loaded.model, loaded.input_shape[1:], checkpoint
    else:
        trained = train(TrainConfig(arch="resnet-tiny", epochs=2), progress=False)
        model, shape, source = trained.model, trained.input_shape, "resnet-tiny trained for 2 epochs"
    x, y = load_dataset("digits").tensors(tuple(shape), "test")
    folded, report = fold(model, x[:2])
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_onnx(folded, x[:2], f"{tmp}/model.onnx")
        proto = load_onnx(exported.path)
    torch_check = verify(model, folded, x)
    onnx_check = verify(model, proto, x)
    with torch.no_grad():
        before = float((model(x).argmax(1) == y).float().mean())
    after = float((torch.from_numpy(run_onnx(proto, [x.numpy()])[0]).argmax(1) == y).float().mean())
    worst = max(o.stats.scaled_max for c in (torch_check, onnx_check) for r in c.runtimes for o in r.outputs)
    row = {
        "model": source,
        "bn_total": report.bn_total,
        "bn_folded": report.bn_folded,
        "exporter": exported.exporter,
        "verify_passed": torch_check.passed and onnx_check.passed,
        "max_error": worst,
        "accuracy_original": before,
        "accuracy_folded_onnx": after,
    }
    text = (
        f"== {source}: fold, export ONNX ({exported.exporter} exporter), verify on the {len(x)} held-out digits\n"
        f"{report}\n"
        f"verify torch: {'pass' if torch_check.passed else 'MISMATCH'}, ONNX Runtime: "
        f"{'pass' if onnx_check.passed else 'MISMATCH'}; max error {worst:.3g} of the output scale vs float64\n"
        f"held-out accuracy: original {before:.4f}, folded ONNX {after:.4f}"
    )
    return DemoResult([row], text)
