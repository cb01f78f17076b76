"""Fold rules, written once for every graph kind (torch modules, torch.export, ONNX).

A rule matches a pattern around one BN, checks it (a reason when refused) and
rewrites it, asking the graph only what :class:`~bnfold.rules.view.GraphView`
offers. :data:`RULES` is the order they are tried in; :func:`fold_graph` repeats
them until nothing changes.
"""

from bnfold.rules.driver import fold_graph
from bnfold.rules.into_concat import IntoConcatProducers
from bnfold.rules.into_following import IntoFollowing
from bnfold.rules.into_preceding import IntoPreceding
from bnfold.rules.into_sum import IntoSumProducers
from bnfold.rules.rule import Plan, Rule

__all__ = ["RULES", "Plan", "Rule", "fold_graph"]

# per side, the first rule whose pattern matches is checked: concat and sum before the plain layer
RULES: tuple[Rule, ...] = (IntoConcatProducers(), IntoSumProducers(), IntoPreceding(), IntoFollowing())
