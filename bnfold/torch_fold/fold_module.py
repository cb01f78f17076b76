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

import torch
from torch import nn

from bnfold.errors import BnfoldError, first_line, innermost_line
from bnfold.report import FoldReport, LayerEntry, MergeEntry
from bnfold.rules import RULES, fold_graph
from bnfold.rules.driver import merge_all, record_merge
from bnfold.rules.merge_branches import IDENTITY_LABEL, MergePlan, merge_plans
from bnfold.torch_fold.aten import fold_exported, has_aten_batch_norm
from bnfold.torch_fold.dataflow import DataFlow, record, trace
from bnfold.torch_fold.module_view import ModuleView, set_submodule
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


def _owner(plan: MergePlan) -> str:
    """The deepest module whose forward holds every node of a merge (from fx's module stack); '' is the model."""
    stacks = [list(call.fx_node.meta.get("nn_module_stack", {})) for call in [plan.keep.node, *plan.removed]]
    stacks.append(list(plan.total.node.fx_node.meta.get("nn_module_stack", {})))
    owner = ""
    for paths in zip(*stacks, strict=False):
        if len(set(paths)) != 1:
            break
        owner = paths[0]
    return owner


def _merge_blocks(model: nn.Module, flow: DataFlow, entries: list[LayerEntry]) -> tuple[nn.Module, list[MergeEntry]]:
    """Merge parallel branches block by block: a block with a merge becomes a GraphModule in the model's own class."""
    view = ModuleView(model, flow)
    owners = {_owner(plan) for _, plan in merge_plans(view)}
    by_name = {entry.name: entry for entry in entries}
    merges: list[MergeEntry] = []
    for owner in sorted(owners, key=lambda name: (-name.count(".") if name else 1, name)):
        block = model.get_submodule(owner) if owner else model
        block_view = ModuleView(block, trace(block, None))
        prefix = f"{owner}." if owner else ""
        for total, plan in merge_all(block_view):
            for call in plan.bn_nodes:
                entry = by_name.get(prefix + call.target)
                if entry is not None:
                    record_merge(entry, total, prefix + plan.keep.name)
            branches = [b if b.startswith(IDENTITY_LABEL) else prefix + b for b in plan.branches]
            merges.append(MergeEntry(prefix + total.label, branches, prefix + plan.keep.name))
        if block_view.graph_changed:
            gm = block_view.flow.graph_module
            gm.graph.lint()
            gm.recompile()
            gm.delete_all_unused_submodules()
            if not owner:
                return gm.eval(), merges
            set_submodule(model, owner, gm.eval())
    return model, merges


def _fold_flow(
    model: nn.Module, flow: DataFlow, merge_branches: bool = False
) -> tuple[nn.Module, list[LayerEntry], list[MergeEntry]]:
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
    merges: list[MergeEntry] = []
    if merge_branches and flow.method == "torch.fx" and not view.graph_changed:
        result, merges = _merge_blocks(result, flow, entries)
    return result.eval(), entries, merges


def _fold_merged(
    model: nn.Module, inputs: tuple | None, entries: list[LayerEntry], merges: list[MergeEntry]
) -> tuple[nn.Module, list[MergeEntry]]:
    """Fold again after merging branches, until a round merges nothing: a BN after a merged sum now follows a conv.

    ``entries`` is updated in place: a BN kept before and folded (or re-judged) now takes its new entry.
    """
    new = merges
    while new and any(not entry.folded for entry in entries):
        try:
            flow = trace(model, inputs)
        except Exception as error:  # noqa: BLE001 - the merged model is complete; only the extra round is lost
            logger.debug("no fold after merging: the merged model does not trace (%s)", first_line(error))
            break
        model, again, new = _fold_flow(model, flow, merge_branches=True)
        by_name = {entry.name: entry for entry in again}
        for i, entry in enumerate(entries):
            if not entry.folded and entry.name in by_name:
                entries[i] = by_name[entry.name]
        merges = merges + new
    return model, merges


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
        model: Any ``torch.nn.Module``, or a ``torch.export.ExportedProgram`` (its ``module()`` is
            folded; the program itself is not changed). Its eval-mode function is preserved.
        example_inputs: A tensor or tuple of tensors ``model`` accepts. Optional
            for models torch.fx can trace; it also proves channel axes where only
            shapes can (Linear next to BatchNorm1d).
        inplace: Modify ``model`` itself instead of a deep copy.
        merge_branches: Also merge parallel branches summed into one convolution (RepVGG-style
            blocks). A module's block with a merge becomes a ``torch.fx.GraphModule`` inside the
            model's own class (the model itself only when the sum is in its own forward); needs a
            model torch.fx can trace.

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
    if isinstance(model, torch.export.ExportedProgram):  # its module is what runs; the program is left as it is
        model, inplace = model.module(), True
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
            raise BnfoldError(f"the model rejected the example inputs: {innermost_line(run_error)}") from None
    else:
        if inputs is not None:
            try:
                flow = trace(work, inputs)
            except Exception as run_error:  # noqa: BLE001
                raise BnfoldError(f"the model rejected the example inputs: {innermost_line(run_error)}") from None
    folded, entries, merges = _fold_flow(work, flow, merge_branches)
    if merges:
        folded, merges = _fold_merged(folded, inputs, entries, merges)
    weight_bytes = sum(p.numel() * p.element_size() for p in work.parameters())
    if weight_bytes >= 2**30:
        notes.append(_memory_note(weight_bytes, inplace))
    report = FoldReport(flow.method, entries, notes, merges)
    logger.info("folded %d of %d BatchNorm(s)", report.bn_folded, report.bn_total)
    return folded, report
