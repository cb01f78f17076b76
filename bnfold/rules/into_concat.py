"""BN after a concat folded into every producer.

Along the channel axis each producer takes its slice of the map:
``BN(cat(a, b)) = cat(BN[:Ca](a), BN[Ca:](b))``. Along any other axis every producer
carries all the channels, so each takes the whole map: ``BN(cat(a, b)) = cat(BN(a), BN(b))``.
"""

from __future__ import annotations

from bnfold.affine import Affine, FoldRefused
from bnfold.report import FOLDED_INTO_PRODUCERS
from bnfold.rules.checks import check_channel_axis, only_reader, pool_notes, pools_before, reached_before
from bnfold.rules.rule import Plan, Rule
from bnfold.rules.view import BNSite, GraphView, Layer, Node, OpKind

__all__ = ["IntoConcatProducers"]


class IntoConcatProducers(Rule):
    """BN after a concat of layer outputs, into each layer."""

    side = "before"
    action = FOLDED_INTO_PRODUCERS
    order = 10

    def match(self, view: GraphView, site: BNSite, node: Node) -> bool:
        """BN's input (through pools) is written by a concat."""
        op = reached_before(view, node)
        return op is not None and op.kind is OpKind.CONCAT

    def check(self, view: GraphView, site: BNSite, node: Node, affine: Affine) -> Plan:
        """Every joined tensor is a distinct layer's output read only by the concat; channel counts add up."""
        value, reader, pools = pools_before(view, view.bn_input(node), node, affine)
        concat = view.op(view.producer(value))
        only_reader(view, value, reader, concat.label)
        axis, rank = concat.axis, view.rank(value)
        if axis is None:
            raise FoldRefused(f"the axis {concat.label} joins is not a constant")
        if axis < 0:
            if rank is None:
                raise FoldRefused(f"{concat.label} joins axis {axis} of a tensor of unknown rank: {view.shape_hint}")
            axis += rank
        if len(set(concat.inputs)) != len(concat.inputs):
            raise FoldRefused(f"{concat.label} reads one tensor twice")
        layers: list[Layer] = []
        for part in concat.inputs:
            layer = view.layer(view.producer(part))
            if any(layer.node is other.node for other in layers):
                raise FoldRefused(f"{layer.label} feeds {concat.label} twice")
            only_reader(view, part, concat.node, layer.label)
            check_channel_axis(view, site, layer, part)
            layers.append(layer)
        notes = pool_notes(pools)
        if axis != 1:
            for layer in layers:
                if layer.out_channels != affine.channels:
                    raise FoldRefused(
                        f"{layer.label} writes {layer.out_channels} channels but BN has {affine.channels}"
                    )
            notes.append(f"{concat.label} joins axis {axis}, so each producer takes the whole BN")
            return Plan([view.scale_output(layer, affine) for layer in layers], notes)
        staged, start = [], 0
        for layer in layers:
            stop = start + layer.out_channels
            if stop > affine.channels:
                raise FoldRefused(f"{concat.label} has more channels than BN ({affine.channels})")
            staged.append(view.scale_output(layer, affine.slice(start, stop)))
            start = stop
        if start != affine.channels:
            raise FoldRefused(f"{concat.label} has {start} channels but BN has {affine.channels}")
        return Plan(staged, notes)
