"""BN folded into the layer that reads its output: ``W (s x + t) + b = (W s) x + (W t + b)``.

Exact only when every output sums over every input tap: a zero-padded convolution sees
padded zeros, not ``t``, at its borders (then only a zero shift folds). Also through
pools BN commutes with, and through a flatten ``(N, C, ...) -> (N, C * ...)`` into a
Linear / Gemm / MatMul, where each channel's values stay one contiguous run.
"""

from __future__ import annotations

from bnfold.affine import Affine, FoldRefused
from bnfold.report import FOLDED_INTO_FOLLOWING
from bnfold.rules.checks import check_channel_axis, passes_on, pool_notes, pools_after
from bnfold.rules.rule import Plan, Rule
from bnfold.rules.view import BNSite, GraphView, Node, OpKind, Value

__all__ = ["IntoFollowing"]


def _sole_reader(view: GraphView, value: Value, what: str) -> Node:
    readers = view.readers(value)
    if not readers:
        raise FoldRefused(f"{what} is unused")
    if len(readers) != 1:
        raise FoldRefused(f"{what} is read by {len(readers)} operations")
    if readers[0] is None:
        raise FoldRefused(f"{what} is a graph output")
    return readers[0]


class IntoFollowing(Rule):
    """BN into the one layer after it (the ``after`` side)."""

    side = "after"
    action = FOLDED_INTO_FOLLOWING
    order = 100

    def match(self, view: GraphView, site: BNSite, node: Node) -> bool:
        """Always: whatever reads BN's output is checked as a layer."""
        return True

    def check(self, view: GraphView, site: BNSite, node: Node, affine: Affine) -> Plan:
        """One layer reads BN's output (through pools / a flatten) as its data input, and nothing else does."""
        if site.tail is not None:
            raise FoldRefused(f"{site.entry.kind} applies more after BN, so BN is not next to the following layer")
        value = view.bn_output(node)
        _sole_reader(view, value, "its output")
        value, pools = pools_after(view, value, affine)
        reader = _sole_reader(view, value, f"the output of {pools[-1].label}" if pools else "its output")
        op, notes = view.op(reader), pool_notes(pools)
        through = None
        if op.kind is OpKind.FLATTEN and list(op.inputs) == [value]:
            through, value = op, op.output
            reader = _sole_reader(view, value, f"the output of {op.label}")
            while passes_on(passes := view.op(reader), value):
                notes.append(f"through {passes.label}")  # an eval-mode Dropout / Identity after the flatten
                value = passes.output
                reader = _sole_reader(view, value, f"the output of {passes.label}")
        layer = view.layer(reader)
        if not layer.reads_input_directly:
            raise FoldRefused(f"{layer.label} has its own forward, so what it does to its input is unknown")
        if layer.data_input != value or view.readers(value).count(reader) != 1:
            raise FoldRefused(f"{layer.label} reads BN's output as more than its data input")
        if through is None:
            check_channel_axis(view, site, layer, value)
        else:
            if layer.spatial != 0:
                raise FoldRefused(f"{layer.label} after {through.label} is not a Linear, Gemm or MatMul")
            rank = view.rank(value)
            if rank is not None and rank != 2:
                raise FoldRefused(f"{through.label} gives a {rank}-D tensor, so {layer.label} reads another axis")
            if layer.in_channels % affine.channels:
                raise FoldRefused(f"{layer.label} reads {layer.in_channels} features, not a multiple of BN's channels")
            affine = affine.repeat(layer.in_channels // affine.channels)
            notes.append(f"through {through.label}")
        return Plan([view.scale_input(layer, affine)], notes)
