"""The checks several rules share: sole reader, channel axis, and moving a BN through a pool."""

from __future__ import annotations

import numpy as np

from bnfold.affine import Affine, FoldRefused
from bnfold.rules.view import BNSite, GraphView, Layer, Node, Op, OpKind, Value

__all__ = [
    "check_channel_axis",
    "only_reader",
    "passes_on",
    "pool_notes",
    "pools_after",
    "pools_before",
    "reached_before",
    "signed_terms",
    "sum_nodes",
    "summands",
]


def only_reader(view: GraphView, value: Value, reader: Node, who: str) -> None:
    """Refuse unless ``reader`` reads ``value`` exactly once and nothing else reads it (graph outputs count)."""
    readers = view.readers(value)
    if readers != [reader]:
        other = next((r for r in readers if r is not reader), reader)
        raise FoldRefused(f"the output of {who} is also read by {view.label(other)}")


def check_channel_axis(view: GraphView, site: BNSite, layer: Layer, value: Value) -> None:
    """Refuse unless ``layer``'s channels sit on axis 1 of ``value``, the axis BN normalises."""
    rank = view.rank(value)
    if rank is not None and rank not in site.ranks:
        raise FoldRefused(f"BN receives a {rank}-D tensor, which {site.entry.kind} does not accept")
    candidates = {rank} if rank is not None else layer.ranks & site.ranks
    if not candidates:
        raise FoldRefused(f"no tensor rank suits both {site.entry.kind} and {layer.label}")
    wrong = sorted(r for r in candidates if layer.channel_axis(r) != 1)
    if not wrong:
        return
    if rank is not None:
        raise FoldRefused(
            f"{layer.label} has its channels on axis {layer.channel_axis(rank)} of the {rank}-D tensor "
            "but BN normalises axis 1"
        )
    raise FoldRefused(
        f"without tensor shapes the channel axes of {layer.label} and BN may differ (a {wrong[0]}-D tensor): "
        f"{view.shape_hint}"
    )


def _commutes(op: Op, affine: Affine) -> None:
    if op.kind is OpKind.MAX_POOL and not bool(np.all(affine.scale > 0)):
        raise FoldRefused(f"a BN scale is not positive, so BN does not commute with {op.label}")


def _passes_through(op: Op, value: Value) -> bool:
    """Whether BN commutes with ``op`` read at ``value``: a pool, or an op passing ``value`` on (Dropout, Identity)."""
    return passes_on(op, value) or (op.kind in (OpKind.MAX_POOL, OpKind.AVG_POOL) and list(op.inputs)[:1] == [value])


def pools_before(view: GraphView, value: Value, reader: Node, affine: Affine) -> tuple[Value, Node, list[Op]]:
    """Walk back from ``value`` (read by ``reader``) through pools BN commutes with.

    ``BN(pool(x)) == pool(BN(x))`` for an average pool over real values only, and for
    a max pool when every scale is positive; so BN may fold into the layer before a pool.
    Ops that pass their input on (eval-mode Dropout, Identity) are walked through too.

    Returns:
        The value before the pools, its reader, and the pools passed (nearest first).
    """
    pools: list[Op] = []
    while (producer := view.producer(value)) is not None:
        op = view.op(producer)
        if not op.inputs or not _passes_through(op, op.inputs[0]):
            break
        _commutes(op, affine)
        only_reader(view, value, reader, op.label)
        pools.append(op)
        value, reader = op.inputs[0], producer
    return value, reader, pools


def pools_after(view: GraphView, value: Value, affine: Affine) -> tuple[Value, list[Op]]:
    """Walk forward from ``value`` through pools BN commutes with, each its value's only reader.

    Returns:
        The value after the pools and the pools passed.
    """
    pools: list[Op] = []
    while True:
        readers = view.readers(value)
        if len(readers) != 1 or readers[0] is None:
            return value, pools
        op = view.op(readers[0])
        if not _passes_through(op, value):
            return value, pools
        _commutes(op, affine)
        pools.append(op)
        value = op.output


def reached_before(view: GraphView, node: Node) -> Op | None:
    """The op writing a BN node's input, looking through pools (no checks: for matching)."""
    value = view.bn_input(node)
    while (producer := view.producer(value)) is not None:
        op = view.op(producer)
        if not op.inputs or not _passes_through(op, op.inputs[0]):
            return op
        value = op.inputs[0]
    return None


def pool_notes(pools: list[Op]) -> list[str]:
    """The report's notes for the pools a BN was moved through."""
    return [f"through {op.label}" for op in pools]


def signed_terms(
    view: GraphView, op: Op, kinds: tuple[OpKind, ...] = (OpKind.SUM,), sign: float = 1.0
) -> tuple[list[tuple[Value, Node, float]], list[Node]]:
    """The tensors a (nested) sum adds, each with the node reading it and its sign; and the nodes walked.

    An inner sum counts as part of the outer one when the outer one is its only reader. With
    ``OpKind.DIFFERENCE`` in ``kinds``, differences are walked too (their second input subtracted).
    """
    found: list[tuple[Value, Node, float]] = []
    nodes: list[Node] = [op.node]
    for i, value in enumerate(op.inputs):
        term_sign = -sign if op.kind is OpKind.DIFFERENCE and i == 1 else sign
        producer = view.producer(value)
        inner = view.op(producer) if producer is not None else None
        if inner is not None and inner.kind in kinds and view.readers(value) == [op.node]:
            inner_found, inner_nodes = signed_terms(view, inner, kinds, term_sign)
            found += inner_found
            nodes += inner_nodes
        else:
            found.append((value, op.node, term_sign))
    return found, nodes


def passes_on(op: Op, value: Value) -> bool:
    """Whether ``op`` hands ``value`` on unchanged: a one-input sum (Identity, eval Dropout, ``0 + x``)."""
    return op.kind is OpKind.SUM and list(op.inputs) == [value]


def summands(view: GraphView, op: Op) -> list[tuple[Value, Node]]:
    """The tensors a (nested) sum adds, each with the sum node that reads it."""
    return [(value, node) for value, node, _ in signed_terms(view, op)[0]]


def sum_nodes(view: GraphView, op: Op) -> list[Node]:
    """The sum nodes :func:`summands` walks through, outermost first."""
    return signed_terms(view, op)[1]
