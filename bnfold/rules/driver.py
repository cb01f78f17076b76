"""One driver for every graph kind: try each BN's rules until nothing changes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

from bnfold.affine import FoldRefused
from bnfold.report import FOLDED_INTO_PRODUCERS, KEPT, MERGED_INTO_BRANCH, LayerEntry, MergeEntry
from bnfold.rules.merge_branches import MergePlan, merge_plans
from bnfold.rules.rule import Plan, Rule
from bnfold.rules.view import BNSite, GraphView, MergingView, Node, Op

__all__ = ["fold_graph", "merge_all", "record_merge"]

logger = logging.getLogger(__name__)


def _first_plan(view: GraphView, site: BNSite, node: Node, rules: Sequence[Rule]) -> tuple[Rule, Plan] | list[str]:
    """The first rule (per side, in order) whose check passes, or the reasons each side refused."""
    reasons = []
    for side in dict.fromkeys(rule.side for rule in rules):
        rule = next((r for r in rules if r.side == side and r.match(view, site, node)), None)
        if rule is None:
            continue
        try:
            return rule, rule.check(view, site, node, site.affine)
        except FoldRefused as refused:
            reasons.append(f"{side}: {refused}")
    return reasons


def _try_site(view: GraphView, site: BNSite, rules: Sequence[Rule]) -> bool:
    """Fold every node of one BN, or none of them; record the outcome in its report entry."""
    entry = site.entry
    if isinstance(site.affine, FoldRefused):
        entry.reason = str(site.affine)
        return False
    chosen: list[tuple[Node, Rule, Plan]] = []
    for i, node in enumerate(site.nodes):
        found = _first_plan(view, site, node, rules)
        if isinstance(found, list):
            prefix = f"call {i + 1} of {len(site.nodes)}: " if len(site.nodes) > 1 else ""
            entry.reason = prefix + "; ".join(found)
            return False
        chosen.append((node, *found))
    layers = [id(item.layer.node) for _, _, plan in chosen for item in plan.staged]
    if len(set(layers)) != len(layers):
        entry.reason = "its calls would fold into the same layer twice"
        return False
    for node, rule, plan in chosen:
        rule.rewrite(view, site, node, plan)
    actions = {rule.action for _, rule, _ in chosen}
    entry.action = actions.pop() if len(actions) == 1 else FOLDED_INTO_PRODUCERS
    entry.targets = [t for _, _, plan in chosen for t in plan.targets]
    entry.reason = ""
    entry.notes.extend(note for _, _, plan in chosen for note in plan.notes)
    entry.notes.extend(note for _, _, plan in chosen for item in plan.staged for note in item.notes)
    if len(site.nodes) > 1:
        entry.notes.append(f"applied {len(site.nodes)} times: folded at each call")
    return True


def merge_all(view: MergingView) -> Iterator[tuple[Op, MergePlan]]:
    """Merge every sum of parallel branches that merges exactly; yield each sum and its plan as it is merged."""
    for total, plan in merge_plans(view):
        try:
            view.merge(plan)  # refuses (rounding) before it changes anything
        except FoldRefused as refused:
            logger.debug("not merged: %s", refused)
            continue
        yield total, plan


def record_merge(entry: LayerEntry, total: Op, into: str) -> None:
    """Mark a BN's report row as merged into the conv ``into`` (a branch of the sum ``total``)."""
    entry.action, entry.targets, entry.reason = MERGED_INTO_BRANCH, [into], ""
    entry.notes.append(f"a branch of {total.label}")


def _merge_round(view: MergingView, sites: list[BNSite], merges: list[MergeEntry]) -> bool:
    """One round of :func:`merge_all` with the report updated; whether anything merged."""
    by_node = {id(node): site for site in sites for node in site.nodes}
    changed = False
    for total, plan in merge_all(view):
        for node in plan.bn_nodes:
            record_merge(by_node[id(node)].entry, total, plan.keep.name)
        merges.append(MergeEntry(total.label, plan.branches, plan.keep.name))
        changed = True
    return changed


def fold_graph(
    view: GraphView, rules: Sequence[Rule], *, extra: Callable[[], bool] | None = None, merge: bool = False
) -> tuple[list[LayerEntry], list[MergeEntry]]:
    """Fold every BN of ``view`` with ``rules``, repeating until nothing changes.

    Args:
        view: The graph.
        rules: Tried in order; per side (``before``, then ``after``) the first that matches is checked.
        extra: A graph kind's own step, run once per round; returns whether it changed anything.
        merge: Also merge sums of parallel branches (the view must be a :class:`MergingView`).

    Returns:
        One report entry per BN, in graph order, and the merges made.
    """
    sites = view.sites()
    merges: list[MergeEntry] = []
    changed = True
    while changed:
        changed = False
        for site in sites:
            if site.entry.action == KEPT and _try_site(view, site, rules):
                changed = True
            view.settle()
        if extra is not None and extra():
            changed = True
        if merge and _merge_round(view, sites, merges):
            changed = True
    logger.debug("%d of %d BN folded", sum(s.entry.folded for s in sites), len(sites))
    return [site.entry for site in sites], merges
