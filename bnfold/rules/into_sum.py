"""BN after a sum of layer outputs folded into every summand's layer.

``BN(a + b + c) = s a + s b + (s c + t)``: every layer is scaled, one of them also takes the shift.
Nested sums (``(a + b) + c``) count as one sum when the inner one has no other reader.
Broadcasting over batch or spatial axes keeps this exact; the channel axes must line up, so
every summand's rank must be known and equal.
"""

from __future__ import annotations

import numpy as np

from bnfold.affine import Affine, FoldRefused
from bnfold.report import FOLDED_INTO_PRODUCERS
from bnfold.rules.checks import check_channel_axis, only_reader, pool_notes, pools_before, reached_before, summands
from bnfold.rules.rule import Plan, Rule
from bnfold.rules.view import BNSite, GraphView, Layer, Node, OpKind

__all__ = ["IntoSumProducers"]


class IntoSumProducers(Rule):
    """BN after the sum of any number of layer outputs, into each layer."""

    side = "before"
    action = FOLDED_INTO_PRODUCERS
    order = 20

    def match(self, view: GraphView, site: BNSite, node: Node) -> bool:
        """BN's input (through pools) is written by a sum of tensors."""
        op = reached_before(view, node)
        return op is not None and op.kind is OpKind.SUM

    def check(self, view: GraphView, site: BNSite, node: Node, affine: Affine) -> Plan:
        """Every summand is a distinct layer's output, read only by the sum, of the sum's rank."""
        value, reader, pools = pools_before(view, view.bn_input(node), node, affine)
        total = view.op(view.producer(value))
        only_reader(view, value, reader, total.label)
        parts = summands(view, total)
        if len({v for v, _ in parts}) != len(parts):
            raise FoldRefused(f"{total.label} adds one tensor more than once")
        ranks = {view.rank(v) for v, _ in parts} | {view.rank(value)}
        if None in ranks or len(ranks) != 1:
            raise FoldRefused(
                f"{total.label} adds tensors of different or unknown ranks, so their channels may not align "
                f"({view.shape_hint})"
            )
        layers: list[Layer] = []
        for part, reader_node in parts:
            layer = view.layer(view.producer(part))
            if any(layer.node is other.node for other in layers):
                raise FoldRefused(f"{layer.label} feeds {total.label} twice")
            only_reader(view, part, reader_node, layer.label)
            check_channel_axis(view, site, layer, part)
            layers.append(layer)
        scale_only = Affine(affine.scale, np.zeros_like(affine.shift))
        staged = [view.scale_output(layer, affine if i == 0 else scale_only) for i, layer in enumerate(layers)]
        return Plan(staged, pool_notes(pools))
