"""BN folded into the layer that writes its input: ``BN(W x + b) = (s W) x + (s b + t)``.

Also through pools BN commutes with (an average pool over real values; a max pool
when every scale is positive): ``BN(pool(W x + b)) = pool((s W) x + (s b + t))``.
"""

from __future__ import annotations

from bnfold.affine import Affine
from bnfold.report import FOLDED_INTO_PRECEDING
from bnfold.rules.checks import check_channel_axis, only_reader, pool_notes, pools_before
from bnfold.rules.rule import Plan, Rule
from bnfold.rules.view import BNSite, GraphView, Node

__all__ = ["IntoPreceding"]


class IntoPreceding(Rule):
    """BN into the one layer before it (the fallback of the ``before`` side)."""

    side = "before"
    action = FOLDED_INTO_PRECEDING
    order = 90

    def match(self, view: GraphView, site: BNSite, node: Node) -> bool:
        """Always: whatever writes BN's input is checked as a layer."""
        return True

    def check(self, view: GraphView, site: BNSite, node: Node, affine: Affine) -> Plan:
        """The producer must be a layer, read only by BN (or the pools), with channels on BN's axis."""
        value, reader, pools = pools_before(view, view.bn_input(node), node, affine)
        producer = view.producer(value)
        layer = view.layer(producer)
        only_reader(view, value, reader, view.label(producer))
        check_channel_axis(view, site, layer, value)
        final = None if pools else view.bn_output(node)
        return Plan([view.scale_output(layer, affine, final_output=final)], pool_notes(pools))
