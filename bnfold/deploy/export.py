"""ONNX export of a (folded) torch model, with a second ONNX fold sweep and optional simplification."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from bnfold.deploy.onnx_reference import run_ort
from bnfold.errors import BnfoldError, first_line
from bnfold.onnx_fold import fold_onnx, save_onnx
from bnfold.report import FoldReport

__all__ = ["ExportResult", "export_keeping_bn", "export_onnx"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how.

    Attributes:
        path: The ONNX file.
        exporter: ``dynamo`` or ``torchscript``: the exporter that produced it.
        opset: The default-domain opset of the file.
        simplified: Whether the onnxsim result was kept.
        onnx_report: The second sweep's fold report over the exported graph.
        notes: Why a fallback ran, why a simplification was dropped.
    """

    path: str
    exporter: str
    opset: int
    simplified: bool
    onnx_report: FoldReport
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "path": self.path,
            "exporter": self.exporter,
            "opset": self.opset,
            "simplified": self.simplified,
            "onnx_report": self.onnx_report.to_dict(),
            "notes": list(self.notes),
        }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _names(inputs: tuple[torch.Tensor, ...]) -> list[str]:
    return ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]


def _dynamo(
    model: nn.Module, inputs: tuple, opset: int | None, dynamic_batch: bool, optimize: bool = True
) -> onnx.ModelProto:
    """The dynamo exporter; ``optimize=False`` leaves its optimizer out (it would fold Conv+BN itself)."""
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} for _ in inputs)
    program = torch.onnx.export(
        model,
        inputs,
        dynamo=True,
        dynamic_shapes=dynamic,
        opset_version=opset,
        input_names=_names(inputs),
        optimize=optimize,
    )
    return program.model_proto


def _torchscript(
    model: nn.Module, inputs: tuple, opset: int | None, dynamic_batch: bool, keep_bn: bool = False
) -> onnx.ModelProto:
    names = _names(inputs)
    axes = {name: {0: "batch"} for name in names} if dynamic_batch else None
    buffer = io.BytesIO()
    # PRESERVE keeps every BatchNormalization node (the eval-mode export fuses Conv+BN itself)
    mode = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False} if keep_bn else {}
    torch.onnx.export(
        model, inputs, buffer, dynamo=False, opset_version=opset or 17, input_names=names, dynamic_axes=axes, **mode
    )
    return onnx.load_from_string(buffer.getvalue())


def export_keeping_bn(model: nn.Module, example_inputs: Any, *, dynamic_batch: bool = True) -> onnx.ModelProto:
    """Export ``model`` (in eval mode) to ONNX with every BN kept as a BatchNormalization node.

    The baseline for timing a fold in ONNX Runtime, and the input the ONNX pass's
    tests and benchmarks fold. Inputs are named ``input`` (``input_<i>`` for several).
    The TorchScript exporter first (it keeps BN by construction); where it cannot export
    the model (a kernel computed per input, an op it lacks), the dynamo exporter without
    its optimizer, which also keeps each BN as a BatchNormalization node.

    Raises:
        Exception: The TorchScript exporter's error, when the dynamo exporter fails too.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with _quiet(), torch.no_grad():
        if isinstance(model, torch.fx.GraphModule):  # a torch.export program's module: TorchScript cannot take it
            return _dynamo(model, inputs, None, dynamic_batch=False, optimize=False)
        try:
            return _torchscript(model.eval(), inputs, None, dynamic_batch, keep_bn=True)
        except Exception as error:  # noqa: BLE001 - the other exporter may take it
            try:  # at the example's batch: a per-input kernel (CondConv) reshapes by it
                return _dynamo(model, inputs, None, dynamic_batch=False, optimize=False)
            except Exception:  # noqa: BLE001 - neither: the first exporter's error says more
                raise error from None


def _feeds(model: onnx.ModelProto, inputs: tuple) -> dict[str, np.ndarray]:
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    return {name: x.detach().cpu().numpy() for name, x in zip(names, inputs, strict=False)}


def _simplify(model: onnx.ModelProto, inputs: tuple, notes: list[str]) -> onnx.ModelProto | None:
    try:
        import onnxsim
    except ImportError:
        notes.append("simplify skipped: onnxsim is not installed (pip install onnxsim)")
        return None
    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as error:  # noqa: BLE001 - a failed simplification keeps the unsimplified model
        notes.append(f"simplify dropped: onnxsim failed ({type(error).__name__})")
        return None
    feeds = _feeds(model, inputs)
    expected, got = run_ort(model, feeds), run_ort(simplified, feeds)
    if not ok or any(
        not np.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(a).max())))
        for a, b in zip(expected, got, strict=True)
    ):
        notes.append("simplify dropped: the simplified model did not verify")
        return None
    return simplified


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    simplify: bool = False,
    exporter: str = "auto",
    merge_branches: bool = True,
) -> ExportResult:
    """Export ``model`` to ONNX, fold what the export left, and write it atomically.

    Args:
        model: The (usually already folded) model.
        example_inputs: A tensor or tuple of tensors.
        path: The ONNX file to write.
        opset: Default-domain opset; the exporter's default when None.
        dynamic_batch: Make axis 0 of every input dynamic.
        simplify: Run onnx-simplifier and keep its result only if it verifies.
        exporter: ``auto`` (dynamo, falling back to TorchScript), ``dynamo`` or ``torchscript``.
        merge_branches: Merge parallel branches summed into one conv in the export
            (see :func:`bnfold.fold_onnx`).

    Returns:
        What was written and how.

    Raises:
        BnfoldError: Every exporter asked for failed.
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise BnfoldError(f"exporter {exporter!r}: use auto, dynamo or torchscript")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    model = model.eval()
    notes: list[str] = []
    proto, used = None, exporter
    if exporter in ("auto", "dynamo"):
        try:
            with _quiet(), torch.no_grad():
                proto, used = _dynamo(model, inputs, opset, dynamic_batch), "dynamo"
        except Exception as error:  # noqa: BLE001 - exporters fail in many ways
            first = first_line(error)
            if exporter == "dynamo":
                raise BnfoldError(f"the dynamo exporter failed: {first}") from None
            notes.append(f"dynamo exporter failed ({first}); used the TorchScript exporter")
    if proto is None:
        try:
            with _quiet(), torch.no_grad():
                proto, used = _torchscript(model, inputs, opset, dynamic_batch), "torchscript"
        except Exception as error:  # noqa: BLE001
            first = first_line(error)
            raise BnfoldError(f"ONNX export failed: {first}") from None
    proto, onnx_report = fold_onnx(proto, merge_branches=merge_branches)
    simplified = False
    if simplify:
        result = _simplify(proto, inputs, notes)
        if result is not None:
            proto, simplified = result, True
    onnx.checker.check_model(proto)
    save_onnx(proto, path)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    logger.info("exported %s with the %s exporter (opset %d)", path, used, opset_used)
    return ExportResult(str(Path(path)), used, opset_used, simplified, onnx_report, notes)
