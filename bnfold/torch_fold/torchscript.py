"""TorchScript archives: folded by TorchScript's own frozen Conv+BN pass, every BN accounted for."""

from __future__ import annotations

import torch

from bnfold.report import FOLDED_INTO_PRECEDING, FoldReport, LayerEntry

__all__ = ["fold_torchscript"]

_KEPT_REASON = (
    "TorchScript's frozen-graph folding removes BN only right after a Conv whose output nothing else reads; "
    "load the weights with --arch (or fold the ONNX export) for bnfold's own passes"
)
_BN_KINDS = ("aten::batch_norm", "aten::_native_batch_norm_legit_no_training")


def _bn_nodes(graph: torch.Graph) -> list[torch.Node]:
    found = []
    stack = [graph.nodes()]
    while stack:
        for node in stack.pop():
            if node.kind() in _BN_KINDS:
                found.append(node)
            stack.extend(block.nodes() for block in node.blocks())
    return found


def fold_torchscript(module: torch.jit.ScriptModule) -> tuple[torch.jit.ScriptModule, FoldReport]:
    """Freeze ``module`` (TorchScript folds Conv+BN while freezing) and report each BN module.

    A BN is reported kept when a batch_norm with its running mean survives freezing.

    Returns:
        The frozen module and the report.
    """
    module = module.eval()
    bn_modules = [
        (name, sub) for name, sub in module.named_modules() if "BatchNorm" in getattr(sub, "original_name", "")
    ]
    frozen = torch.jit.freeze(module)
    surviving = []
    for node in _bn_nodes(frozen.graph):
        value = node.inputsAt(3).toIValue()
        if isinstance(value, torch.Tensor):
            surviving.append(value)
    entries, matched = [], 0
    for name, sub in bn_modules:
        entry = LayerEntry(name, sub.original_name)
        mean = getattr(sub, "running_mean", None)
        if mean is not None and any(v.shape == mean.shape and torch.equal(v, mean) for v in surviving):
            entry.reason = _KEPT_REASON
            matched += 1
        else:
            entry.action, entry.targets = FOLDED_INTO_PRECEDING, ["the preceding aten::conv (frozen graph)"]
        entries.append(entry)
    report = FoldReport("torchscript-freeze", entries)
    if len(surviving) != matched:
        report.notes.append(f"{len(surviving)} batch_norm call(s) survive freezing; {matched} matched a BN module")
    return frozen, report
