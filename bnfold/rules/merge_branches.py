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
BN on a conv branch is folded into that conv first by the BN rules.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bnfold.affine import Affine, FoldRefused, Layout, float64
from bnfold.rules.checks import sum_nodes, summands
from bnfold.rules.view import GraphView, Layer, Node, Op, OpKind, Value

__all__ = ["IDENTITY_LABEL", "MergePlan", "check_merge", "merge_candidates"]

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


def merge_candidates(view: GraphView) -> list[Op]:
    """Every sum not read by another sum (the outermost of nested sums)."""
    found = []
    for node in view.nodes():
        op = view.op(node)
        if op.kind is not OpKind.SUM:
            continue
        readers = view.readers(op.output)
        if len(readers) == 1 and readers[0] is not None and view.op(readers[0]).kind is OpKind.SUM:
            continue
        found.append(op)
    return found


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


def check_merge(view: GraphView, total: Op) -> MergePlan:
    """The merged layer for a sum of parallel branches, or FoldRefused with why not."""
    parts = summands(view, total)
    if len(parts) < 2:
        raise FoldRefused(f"{total.label} adds fewer than two branches")
    layers: list[tuple[Value, Layer]] = []
    affines: list[tuple[Value, Affine, Node | None]] = []  # identity branches: (value, map, BN node or None)
    source: Value | None = None
    for value, reader in parts:
        producer = view.producer(value)
        op = view.op(producer) if producer is not None else None
        if op is not None and op.kind is OpKind.LAYER:
            layer = view.layer(producer)
            branch_input = layer.data_input
        elif op is not None and op.kind is OpKind.BATCH_NORM:
            affine = view.bn_affine(op.node)
            branch_input = op.inputs[0]
        else:
            branch_input = value  # the tensor itself: an identity branch
        if source is None:
            source = branch_input
        if branch_input != source:
            raise FoldRefused(f"the branches of {total.label} do not all read the same tensor")
        if value != source and view.readers(value) != [reader]:
            raise FoldRefused(f"a branch of {total.label} is also read elsewhere")
        if op is not None and op.kind is OpKind.LAYER:
            layers.append((value, layer))
        elif op is not None and op.kind is OpKind.BATCH_NORM:
            affines.append((value, affine, op.node))
        else:
            affines.append((value, None, None))
    if not layers:
        raise FoldRefused(f"no branch of {total.label} is a convolution")
    return _merged(view, total, layers, affines)


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
    layers: list[tuple[Value, Layer]],
    affines: list[tuple[Value, Affine | None, Node | None]],
) -> MergePlan:
    """Check the geometry and add every branch's weights, in float64."""
    kernel, keep = _check_geometry(total, [layer for _, layer in layers])
    first = layers[0][1]
    if affines and (any(s != 1 for s in first.geometry.stride) or any(o != (0.0, 0.0) for o in _offsets(first))):
        raise FoldRefused(f"an identity branch of {total.label} needs stride 1 and an output the size of the input")
    if affines and first.in_channels != first.out_channels:
        raise FoldRefused(f"an identity branch of {total.label} needs as many output as input channels")
    weight = np.zeros((first.out_channels, first.in_channels // first.groups, *kernel), dtype=np.float64)
    bias = np.zeros(first.out_channels, dtype=np.float64)
    for _, layer in layers:
        w, b = view.weights(layer)
        weight += _centred(float64(w), kernel)
        if b is not None:
            bias += float64(b).reshape(-1)
    for _, affine, _ in affines:
        scale = np.ones(first.out_channels) if affine is None else affine.scale
        if scale.size != first.out_channels:
            raise FoldRefused(f"a BN branch of {total.label} has {scale.size} channels, not {first.out_channels}")
        weight += _identity(first.out_channels, first.groups, kernel, scale)
        if affine is not None:
            bias += affine.shift
    removed = [layer.node for _, layer in layers if layer is not keep]
    bn_nodes = [node for _, _, node in affines if node is not None]
    labels = [layer.label for _, layer in layers] + [
        view.label(node) if node is not None else IDENTITY_LABEL for _, _, node in affines
    ]
    return MergePlan(total, keep, weight, bias, labels, removed + bn_nodes + sum_nodes(view, total), bn_nodes)
