"""``fold``: every foldable BatchNorm of a torch model folded into a neighbouring Conv/Linear.

The model's data flow is found by torch.fx tracing (or, where fx fails, by recording
one run on example inputs, :mod:`.dataflow`); the rules of :mod:`bnfold.rules` then run
over it as a :class:`~.module_view.ModuleView` until nothing changes. torch.export
programs go to :mod:`.aten`, which runs the same rules over aten calls.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

from bnfold.errors import BnfoldError, first_line
from bnfold.report import FoldReport, LayerEntry
from bnfold.rules import RULES, fold_graph
from bnfold.torch_fold.aten import fold_exported, has_aten_batch_norm
from bnfold.torch_fold.dataflow import DataFlow, record, trace
from bnfold.torch_fold.module_view import ModuleView
from bnfold.torch_fold.recognise import bn_module

__all__ = ["fold"]

logger = logging.getLogger(__name__)

_RECORDED_NOTE = (
    "torch.fx could not trace the model ({error}); the data flow was recorded from one run on the example "
    "inputs, so branches that run did not take were not seen"
)


def _as_tuple(example_inputs: Any) -> tuple | None:  # noqa: ANN401 - a tensor, tuple or list
    if example_inputs is None or isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _fold_flow(model: nn.Module, flow: DataFlow) -> tuple[nn.Module, list[LayerEntry]]:
    """Run every rule over the model's data flow; write the folded layers; list BN modules forward never calls."""
    view = ModuleView(model, flow)
    entries, _ = fold_graph(view, RULES)
    flushed = view.write_all()
    by_name = {name: id(m) for name, m in flow.modules.items()}
    for entry in entries:
        count = sum(flushed.get(by_name.get(t, -1), 0) for t in entry.targets)
        if count:
            entry.notes.append(f"{count} subnormal value(s) in the target flushed to zero")
    result: nn.Module = model
    if view.graph_changed:
        gm = flow.graph_module
        gm.graph.lint()
        gm.recompile()
        result = gm
    if flow.method == "torch.fx":
        called = {id(flow.modules[c.target]) for c in flow.calls if c.op == "module"}
        called |= {id(s.state.module) for s in view.all_sites if s.state.module is not None}
        entries += [
            LayerEntry(
                name,
                bn.kind,
                reason="not called by forward as a module of its own (unused, or run inside another module)",
            )
            for name, m in model.named_modules()
            if id(m) not in called and (bn := bn_module(m)) is not None and not isinstance(m, nn.Identity)
        ]
    return result.eval(), entries


def _memory_note(weight_bytes: int, inplace: bool) -> str:
    """The process's peak resident memory beside the model's parameter bytes (for models of 1 GB and more)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    copy = "folded in place" if inplace else "folded in a copy (inplace=True avoids it)"
    return f"peak resident memory {peak:,.0f} MB for {weight_bytes / 2**20:,.0f} MB of parameters, {copy}"


def fold(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    merge_branches: bool = True,
) -> tuple[nn.Module, FoldReport]:
    """Fold every foldable BatchNorm of ``model`` into a neighbouring Conv/Linear.

    Args:
        model: Any ``torch.nn.Module``. Its eval-mode function is preserved.
        example_inputs: A tensor or tuple of tensors ``model`` accepts. Optional
            for models torch.fx can trace; it also proves channel axes where only
            shapes can (Linear next to BatchNorm1d).
        inplace: Modify ``model`` itself instead of a deep copy.
        merge_branches: For a torch.export program, also merge parallel branches summed into
            one convolution (RepVGG-style blocks). Modules do not merge yet.

    Returns:
        ``(folded, report)``: the folded model in eval mode (a
        ``torch.fx.GraphModule`` only when a functional ``batch_norm`` call was
        removed from the traced graph, or for a torch.export program, folded at
        the aten level; otherwise the model's own class, with folded BN modules
        replaced by ``nn.Identity``), and one report entry per BN.

    Raises:
        BnfoldError: The model cannot be traced and no example inputs were
            given, or the example inputs are rejected by the model.
    """
    try:
        work = model if inplace else copy.deepcopy(model)
    except RuntimeError as error:
        first = first_line(error)
        raise BnfoldError(
            f"cannot copy {type(model).__name__} ({first}); run its last forward under torch.no_grad(), "
            "or pass inplace=True"
        ) from None
    if has_aten_batch_norm(work):  # a torch.export program: aten functions, not modules
        return fold_exported(work, merge_branches=merge_branches)
    work.eval()
    inputs = _as_tuple(example_inputs)
    notes: list[str] = []
    try:
        flow = trace(work, None)
    except Exception as error:  # noqa: BLE001 - fx fails in many ways on user code
        reason = first_line(error)
        if inputs is None:
            raise BnfoldError(
                f"torch.fx cannot trace {type(model).__name__} ({reason}); pass example_inputs "
                "(CLI: --input-shape) so bnfold can record the data flow from one run"
            ) from None
        notes.append(_RECORDED_NOTE.format(error=reason))
        try:
            flow = record(work, inputs)
        except Exception as run_error:  # noqa: BLE001
            raise BnfoldError(f"the model rejected the example inputs: {run_error}") from None
    else:
        if inputs is not None:
            try:
                flow = trace(work, inputs)
            except Exception as run_error:  # noqa: BLE001
                raise BnfoldError(f"the model rejected the example inputs: {run_error}") from None
    folded, entries = _fold_flow(work, flow)
    weight_bytes = sum(p.numel() * p.element_size() for p in work.parameters())
    if weight_bytes >= 2**30:
        notes.append(_memory_note(weight_bytes, inplace))
    report = FoldReport(flow.method, entries, notes)
    logger.info("folded %d of %d BatchNorm(s)", report.bn_folded, report.bn_total)
    return folded, report
