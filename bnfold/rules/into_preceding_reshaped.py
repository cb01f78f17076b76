"""BN after a row-keeping reshape of a Linear's output: ``BN(reshape(W x + b)) = reshape((s W) x + (s b + t))``.

timm's LeViT normalises a Linear's ``(B, N, C)`` output as ``bn(x.flatten(0, 1))``: BatchNorm1d over
``(B * N, C)``. A row-major reshape whose input and output both end in the ``C`` channels keeps each
element's channel (its flat index modulo ``C``), so BN's per-channel map is the same map on the Linear's
channels (its last axis) and folds into it. Needs the shapes (example inputs, shape inference).
"""

from __future__ import annotations

from bnfold.affine import Affine, FoldRefused
from bnfold.report import FOLDED_INTO_PRECEDING
from bnfold.rules.checks import only_reader
from bnfold.rules.rule import Plan, Rule
from bnfold.rules.view import BNSite, GraphView, Node, OpKind

__all__ = ["IntoPrecedingThroughReshape"]


class IntoPrecedingThroughReshape(Rule):
    """BN into the Linear / Gemm / MatMul before a row-keeping reshape (the ``before`` side)."""

    side = "before"
    action = FOLDED_INTO_PRECEDING
    order = 85

    def match(self, view: GraphView, site: BNSite, node: Node) -> bool:
        """BN reads a reshape's (or flatten's) output as a 2-D tensor."""
        value = view.bn_input(node)
        producer = view.producer(value)
        # a 2-D BN input (or one of unknown rank): otherwise BN's channels are not the last axis anyway, and
        # the plain rule's reason ("view is not a Conv/Linear") says more
        if producer is None or view.rank(value) not in (2, None):
            return False
        return view.op(producer).kind in (OpKind.RESHAPE, OpKind.FLATTEN)

    def check(self, view: GraphView, site: BNSite, node: Node, affine: Affine) -> Plan:
        """A 2-D BN input whose rows are the channels-last rows of one layer's output, read only on this path."""
        value = view.bn_input(node)
        reshape = view.op(view.producer(value))
        source = reshape.inputs[0]
        only_reader(view, value, node, reshape.label)
        rank, ends = view.rank(value), (view.last_dim(source), view.last_dim(value))
        if rank is None or None in ends:
            raise FoldRefused(f"the shapes around {reshape.label} are unknown: {view.shape_hint}")
        if ends != (affine.channels, affine.channels):
            raise FoldRefused(f"{reshape.label} does not keep the {affine.channels} channels as its last axis")
        producer = view.producer(source)
        layer = view.layer(producer)
        only_reader(view, source, reshape.node, view.label(producer))
        if layer.spatial != 0:
            raise FoldRefused(f"{layer.label} has its channels on axis 1, not the last axis {reshape.label} keeps")
        if layer.out_channels != affine.channels:
            raise FoldRefused(f"{layer.label} writes {layer.out_channels} channels, BN normalises {affine.channels}")
        return Plan([view.scale_output(layer, affine, final_output=None)], [f"through {reshape.label}"])
