"""Parallel branches summed into one convolution (structural reparameterization).

RepVGG, MobileOne, ACNet and many in-house blocks train with branches that read the same
tensor ``x`` and are summed: k x k convs, a 1 x 1 conv, an identity (often through a BN).
All are linear in ``x``, so their sum is one convolution::

    conv_K(x) + conv_k(x) + BN(x) + x = conv'(x),
    W' = W_K + centre(W_k) + centre(diag(s) + I),   b' = b_K + b_k + t

where ``centre`` pads a smaller kernel to K x K around its centre. Exact when every branch
sees ``x`` at the same positions: equal stride and groups; the same offset of each kernel's
centre from its padding on every side; dilation 1 where kernels differ; zero padding; and for
an identity or BN branch, stride 1, an offset of 0 and as many output as input channels.
A branch may also be subtracted (FastViT's RepMixer computes ``mixer(x) - norm(x)``): its
weights enter with a minus sign. BN on a conv branch is folded into that conv first by the BN
rules. Ops that pass their input on unchanged (``nn.Identity``, an eval-mode Dropout, the
Identity a fold leaves) are looked through: a branch reading ``Identity(x)`` reads ``x``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np

from bnfold.affine import Affine, FoldRefused, Layout, float64
from bnfold.report import SUBTRACTED
from bnfold.rules.checks import passes_on, signed_terms
from bnfold.rules.view import GraphView, Layer, Node, Op, OpKind, Value

__all__ = ["IDENTITY_LABEL", "SUBTRACTED", "MergePlan", "check_merge", "merge_candidates", "merge_plans"]

logger = logging.getLogger(__name__)

IDENTITY_LABEL = "identity (the input itself)"


@dataclasses.dataclass
class MergePlan:
    """One merge: the sum it replaces, the layer that computes it, and what goes."""

    total: Op
    keep: Layer
    weight: np.ndarray  # float64
    bias: np.ndarray  # float64
    branches: list[str]  # labels, for the report
    removed: list[Node]  # the other branches' nodes and the sum nodes, which go
    bn_nodes: list[Node]  # BN nodes merged (their report rows say so)


_ADDING = (OpKind.SUM, OpKind.DIFFERENCE)


def merge_candidates(view: GraphView) -> list[Op]:
    """Every sum (or difference) not read by another (the outermost of nested sums)."""
    found = []
    for node in view.nodes():
        op = view.op(node)
        if op.kind not in _ADDING:
            continue
        readers = view.readers(op.output)
        if len(readers) == 1 and readers[0] is not None and view.op(readers[0]).kind in _ADDING:
            continue
        found.append(op)
    return found


def _inner_sums(view: GraphView, op: Op) -> list[Op]:
    """The sums of two or more inputs that ``op`` adds as part of itself (through pass-on ops), nearest first."""
    found: list[Op] = []
    for value in op.inputs:
        producer = view.producer(value)
        inner = view.op(producer) if producer is not None else None
        if inner is None or inner.kind not in _ADDING or view.readers(value) != [op.node]:
            continue
        found += [inner] if len(inner.inputs) > 1 else _inner_sums(view, inner)
    return found


def merge_plans(view: GraphView) -> Iterator[tuple[Op, MergePlan]]:
    """Each sum that merges, with its plan: outermost sums first; where one refuses, the sums inside it.

    ``(a + b) + x`` merges as a whole when all three branches read one tensor; otherwise
    ``a + b`` may still merge alone (RepGhost adds a shortcut to its merged pair). The caller
    may merge each plan before asking for the next.
    """
    pending = merge_candidates(view)
    while pending:
        total = pending.pop(0)
        try:
            plan = check_merge(view, total)
        except FoldRefused as refused:
            logger.debug("not merged: %s", refused)
            pending[:0] = _inner_sums(view, total)
            continue
        yield total, plan


def _passed_on(view: GraphView, value: Value) -> tuple[Value, list[Node]]:
    """The tensor ``value`` is an unchanged copy of (through one-input sums: Identity, eval Dropout), and those ops."""
    walked: list[Node] = []
    while (producer := view.producer(value)) is not None:
        op = view.op(producer)
        if not op.inputs or not passes_on(op, op.inputs[0]):
            break
        walked.append(producer)
        value = op.inputs[0]
    return value, walked


def _dead_after(view: GraphView, candidates: list[Node], removed: list[Node]) -> list[Node]:
    """The ``candidates`` (pass-on ops) nothing reads once ``removed`` (and they) are gone."""
    gone = {id(node) for node in removed}
    dead: list[Node] = []
    changed = True
    while changed:
        changed = False
        for node in candidates:
            readers = view.readers(view.op(node).output)
            if id(node) not in gone and readers and all(r is not None and id(r) in gone for r in readers):
                gone.add(id(node))
                dead.append(node)
                changed = True
    return dead


def _offsets(layer: Layer) -> list[tuple[float, float]]:
    """Per spatial dim, where the kernel centre sits relative to the padding at each end."""
    g = layer.geometry
    half = [d * (k - 1) / 2 for k, d in zip(g.kernel, g.dilation, strict=True)]
    return [(b - h, e - h) for b, e, h in zip(g.pads_begin, g.pads_end, half, strict=True)]


def _centred(weight: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """``weight`` zero-padded around its centre to ``kernel``."""
    pad = [(0, 0), (0, 0)] + [((k - w) // 2, (k - w) // 2) for w, k in zip(weight.shape[2:], kernel, strict=True)]
    return np.pad(weight, pad)


def _identity(channels: int, groups: int, kernel: tuple[int, ...], scale: np.ndarray) -> np.ndarray:
    """A grouped conv weight computing ``scale * x`` channel by channel, centred in ``kernel``."""
    per_group = channels // groups
    weight = np.zeros((channels, per_group, *kernel), dtype=np.float64)
    centre = tuple(k // 2 for k in kernel)
    for c in range(channels):
        weight[(c, c % per_group, *centre)] = scale[c]
    return weight


@dataclasses.dataclass
class _Summand:
    """One tensor a sum adds, read two ways: as itself (an identity branch) or as a conv/BN of its input."""

    value: Value
    reader: Node
    sign: float  # +1 added, -1 subtracted
    root: Value  # the tensor ``value`` is an unchanged copy of
    op: Op | None = None  # a conv or BN writing ``value``
    layer: Layer | None = None
    input_root: Value | None = None  # what that conv or BN reads (through pass-on ops)
    walked: list[Node] = dataclasses.field(default_factory=list)  # pass-on ops before it


def _summand(view: GraphView, value: Value, reader: Node, sign: float) -> _Summand:
    part = _Summand(value, reader, sign, _passed_on(view, value)[0])
    producer = view.producer(value)
    op = view.op(producer) if producer is not None else None
    if op is None or op.kind not in (OpKind.LAYER, OpKind.BATCH_NORM):
        return part
    if op.kind is OpKind.LAYER:
        try:
            part.layer = view.layer(producer)
        except FoldRefused:
            return part  # not a layer bnfold can read: at most an identity branch
        branch_input = part.layer.data_input
    else:
        branch_input = op.inputs[0]
    part.op = op
    part.input_root, part.walked = _passed_on(view, branch_input)
    return part


def check_merge(view: GraphView, total: Op) -> MergePlan:
    """The merged layer for a sum of parallel branches, or FoldRefused with why not.

    Every branch reads one tensor ``x``: a conv or BN of ``x``, or ``x`` itself. A summand
    written by a conv may be either (``conv(x) + x`` where ``x`` is itself a conv's output),
    so the tensor all branches share is found first.
    """
    terms, walked_sums = signed_terms(view, total, _ADDING)
    parts = [_summand(view, value, reader, sign) for value, reader, sign in terms]
    if len(parts) < 2:
        raise FoldRefused(f"{total.label} adds fewer than two branches")
    options = [p.input_root for p in parts if p.input_root is not None] + [p.root for p in parts]
    source = next(
        (x for x in dict.fromkeys(options) if all(x in (p.root, p.input_root) for p in parts)),
        None,
    )
    if source is None:
        raise FoldRefused(f"the branches of {total.label} do not all read the same tensor")
    layers: list[tuple[Layer, float]] = []
    affines: list[tuple[Affine | None, Node | None, float]] = []  # identity branches: (map, BN node or None, sign)
    passes: list[Node] = []  # pass-on ops before the branches, removed when nothing else reads them
    for part in parts:
        if part.root == source:
            affines.append((None, None, part.sign))
            continue
        if view.readers(part.value) != [part.reader]:
            raise FoldRefused(f"a branch of {total.label} is also read elsewhere")
        passes += part.walked
        if part.layer is not None:
            layers.append((part.layer, part.sign))
        else:
            affines.append((view.bn_affine(part.op.node), part.op.node, part.sign))
    if not layers:
        raise FoldRefused(f"no branch of {total.label} is a convolution")
    plan = _merged(view, total, layers, affines, walked_sums)
    plan.removed += _dead_after(view, passes, plan.removed)
    return plan


def _check_geometry(total: Op, layers: list[Layer]) -> tuple[tuple[int, ...], Layer]:
    """Refuse branches that do not read ``x`` at the same positions; return the merged kernel and its layer."""
    first = layers[0]
    for layer in layers:
        g = layer.geometry
        if g is None or layer.layout is not Layout.CONV or layer.spatial == 0:
            raise FoldRefused(f"{layer.label} is not a convolution whose kernel and padding bnfold can read")
        if g.stride != first.geometry.stride or layer.groups != first.groups:
            raise FoldRefused(f"the branches of {total.label} differ in stride or groups")
        if (layer.out_channels, layer.in_channels) != (first.out_channels, first.in_channels):
            raise FoldRefused(f"the branches of {total.label} differ in channels")
        if not g.zero_padding:
            raise FoldRefused(f"{layer.label} pads with copies of its input, not zeros")
        if _offsets(layer) != _offsets(first):
            raise FoldRefused(f"the kernels of {total.label}'s branches are not centred alike (their padding differs)")
    kernel = tuple(max(layer.geometry.kernel[i] for layer in layers) for i in range(first.spatial))
    keep = next(layer for layer in layers if layer.geometry.kernel == kernel)
    for layer in layers:
        for k, size, d, big in zip(
            layer.geometry.kernel, kernel, layer.geometry.dilation, keep.geometry.dilation, strict=True
        ):
            # a smaller kernel's taps land on the merged kernel's taps: centred, and at the same spacing
            if (size - k) % 2 or (k > 1 and d != big):
                raise FoldRefused(f"{layer.label} cannot be centred in a {kernel} kernel (dilation or parity)")
    return kernel, keep


def _merged(
    view: GraphView,
    total: Op,
    layers: list[tuple[Layer, float]],
    affines: list[tuple[Affine | None, Node | None, float]],
    walked_sums: list[Node],
) -> MergePlan:
    """Check the geometry and add (or subtract) every branch's weights, in float64."""
    kernel, keep = _check_geometry(total, [layer for layer, _ in layers])
    first = layers[0][0]
    if affines and (any(s != 1 for s in first.geometry.stride) or any(o != (0.0, 0.0) for o in _offsets(first))):
        raise FoldRefused(f"an identity branch of {total.label} needs stride 1 and an output the size of the input")
    if affines and first.in_channels != first.out_channels:
        raise FoldRefused(f"an identity branch of {total.label} needs as many output as input channels")
    weight = np.zeros((first.out_channels, first.in_channels // first.groups, *kernel), dtype=np.float64)
    bias = np.zeros(first.out_channels, dtype=np.float64)
    for layer, sign in layers:
        w, b = view.weights(layer)
        weight += sign * _centred(float64(w), kernel)
        if b is not None:
            bias += sign * float64(b).reshape(-1)
    for affine, _, sign in affines:
        scale = np.ones(first.out_channels) if affine is None else affine.scale
        if scale.size != first.out_channels:
            raise FoldRefused(f"a BN branch of {total.label} has {scale.size} channels, not {first.out_channels}")
        weight += _identity(first.out_channels, first.groups, kernel, sign * scale)
        if affine is not None:
            bias += sign * affine.shift
    removed = [layer.node for layer, _ in layers if layer is not keep]
    bn_nodes = [node for _, node, _ in affines if node is not None]
    labels = [_signed(layer.label, sign) for layer, sign in layers] + [
        _signed(view.label(node) if node is not None else IDENTITY_LABEL, sign) for _, node, sign in affines
    ]
    return MergePlan(total, keep, weight, bias, labels, removed + bn_nodes + walked_sums, bn_nodes)


def _signed(label: str, sign: float) -> str:
    """A branch's label for the report; a subtracted branch says so."""
    return label if sign > 0 else f"{label} {SUBTRACTED}"
