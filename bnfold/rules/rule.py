"""A fold rule: *match* a pattern around one BN node, *check* it (a reason when refused), *rewrite* it."""

from __future__ import annotations

import dataclasses

from bnfold.affine import Affine
from bnfold.rules.view import BNSite, GraphView, Node, Staged

__all__ = ["Plan", "Rule"]


@dataclasses.dataclass
class Plan:
    """What a checked rule will write: staged layers, the report's targets and notes."""

    staged: list[Staged]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        """The names of the layers that absorb the BN."""
        return [item.layer.name for item in self.staged]


class Rule:
    """One way a BN folds away.

    Subclasses set ``side`` (``before``: into layers that write BN's input; ``after``:
    into the layer that reads its output), ``action`` (the report's verb) and ``order``
    (per side, the first rule in order whose pattern matches is the one checked), and
    implement :meth:`match` and :meth:`check`. The rewrite is the same for every rule:
    commit the staged weights, then take the BN out.
    """

    side: str = "before"
    action: str = ""
    order: int = 50

    def match(self, view: GraphView, site: BNSite, node: Node) -> bool:
        """Whether the pattern applies; the first rule of a side that matches is the one checked."""
        raise NotImplementedError

    def check(self, view: GraphView, site: BNSite, node: Node, affine: Affine) -> Plan:
        """Stage the folded weights, or raise FoldRefused with the reason the fold must not happen."""
        raise NotImplementedError

    def rewrite(self, view: GraphView, site: BNSite, node: Node, plan: Plan) -> None:
        """Write the staged weights and remove the BN node."""
        view.commit(plan.staged)
        view.remove_bn(site, node)
