"""torch.export programs as a graph view: aten functions reading constant attributes.

An exported program's ``module()`` is a GraphModule whose convolutions and BNs are
``call_function`` nodes on aten ops with ``get_attr`` parameters. Every rule of
:mod:`bnfold.rules` runs on it; ranks and shapes come from the exported ``val`` metadata.
A layer folds only when its weight (and bias) attributes have no other reader.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from bnfold.affine import (
    Affine,
    FoldRefused,
    Layout,
    bn_affine,
    input_channels,
    output_channels,
    round_to,
)
from bnfold.report import FoldReport, LayerEntry
from bnfold.rules import RULES, fold_graph
from bnfold.rules.float64_weights import Float64Staging
from bnfold.rules.merge_branches import MergePlan
from bnfold.rules.view import ANY_RANK, BNSite, ConvGeometry, Layer, Op, OpKind, Staged

__all__ = ["fold_exported", "has_aten_batch_norm"]

aten = torch.ops.aten
_NATIVE_BN = aten._native_batch_norm_legit_no_training.default
_BN = {
    aten.batch_norm.default: ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
    _NATIVE_BN: ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"),
}
# op -> (layout, spatial dims, index of groups in args)
_LAYERS = {
    aten.linear.default: (Layout.CONV, 0, None),
    aten.conv1d.default: (Layout.CONV, 1, 6),
    aten.conv2d.default: (Layout.CONV, 2, 6),
    aten.conv3d.default: (Layout.CONV, 3, 6),
    aten.conv_transpose1d.default: (Layout.CONV_TRANSPOSE, 1, 6),
    aten.conv_transpose2d.input: (Layout.CONV_TRANSPOSE, 2, 6),
    aten.conv_transpose3d.input: (Layout.CONV_TRANSPOSE, 3, 6),
}
_MAX_POOLS = tuple(getattr(aten, f"max_pool{n}d").default for n in (1, 2, 3))
_AVG_POOLS = tuple(getattr(aten, f"avg_pool{n}d").default for n in (1, 2, 3))
_ADAPTIVE_AVG = tuple(getattr(aten, f"adaptive_avg_pool{n}d").default for n in (1, 2, 3))
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints)
# ``reshape_as(x, other)`` / ``view_as`` / ``expand_as``: only ``x``'s values are used, ``other`` gives a shape
_RESHAPE_AS = tuple(
    op for name in ("reshape_as", "view_as") if (op := getattr(getattr(aten, name, None), "default", None))
)
_SHAPE_OF_SECOND = (*_RESHAPE_AS, *((aten.expand_as.default,) if hasattr(aten, "expand_as") else ()))


def has_aten_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a GraphModule with aten batch_norm nodes (a torch.export program)."""
    return isinstance(module, fx.GraphModule) and any(n.target in _BN for n in module.graph.nodes)


def _shape(node: object) -> tuple | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


_ADDS = (aten.add.Tensor, aten.add_.Tensor, aten.add.Scalar, aten.add_.Scalar)


def _passes_input_on(node: fx.Node) -> bool:
    """``aten.dropout(x, p, train=False)``, ``alias``, ``clone`` or ``x + 0``: the value of ``x`` itself.

    ``x + 0`` (also in place): MobileOne starts its branch sum from the number 0 and adds 0 for a missing branch.
    """
    if node.target is aten.dropout.default:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return train is False and isinstance(node.args[0], fx.Node)
    if node.target in _ADDS and len(node.args) == 2 and not node.kwargs:
        other = node.args[1]
        number = isinstance(other, int | float) and not isinstance(other, bool)
        return isinstance(node.args[0], fx.Node) and number and other == 0
    return node.target in (aten.alias.default, aten.clone.default) and isinstance(node.args[0], fx.Node)


def _flattens_channels(node: fx.Node) -> bool:
    """(N, C, ...) -> (N, C * ...), proven from the exported shapes."""
    before, after = _shape(node.args[0]), _shape(node)
    if before is None or after is None or len(before) < 2 or len(after) != 2:
        return False
    try:
        return bool(after[0] == before[0]) and bool(after[1] == math.prod(before[1:]))
    except Exception:  # noqa: BLE001 - symbolic sizes that cannot be compared statically
        return False


def _avg_pool_exact(node: fx.Node) -> bool:
    """An avg_pool that averages real values only: no zero padding counted, no divisor override."""
    args = list(node.args) + [None] * 7
    padding, count_include_pad, divisor = args[3] or [0], args[5], args[6]
    if divisor is not None:
        return False
    return count_include_pad is False or not any(padding)


def _geometry(node: fx.Node, weight: torch.Tensor) -> ConvGeometry | None:
    """An aten convolution's kernel, stride, dilation and padding (None for string padding)."""
    kernel = tuple(int(k) for k in weight.shape[2:])
    n = len(kernel)

    def ints(index: int, default: int) -> tuple[int, ...] | None:
        value = node.args[index] if len(node.args) > index else default
        if isinstance(value, str):
            return None
        values = [int(v) for v in (value if isinstance(value, list | tuple) else [value])]
        return tuple(values * n if len(values) == 1 else values)

    stride, padding, dilation = ints(3, 1), ints(4, 0), ints(5, 1)
    if stride is None or padding is None or dilation is None:
        return None
    return ConvGeometry(kernel, stride, dilation, padding, padding)


class AtenView(Float64Staging):
    """A torch.export GraphModule as a :class:`~bnfold.rules.view.GraphView` (changed in place)."""

    kind = "torch.export"
    shape_hint = "export with example inputs of static shape"

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.attr_readers: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                self.attr_readers[node.target] = self.attr_readers.get(node.target, 0) + len(node.users)
        self.staged: dict[int, Staged] = {}
        self.fresh = 0

    # -- reading -------------------------------------------------------------------------

    def sites(self) -> list[BNSite]:
        """One site per aten batch_norm node."""
        found = []
        for node in self.gm.graph.nodes:
            if node.op != "call_function" or node.target not in _BN:
                continue
            entry = LayerEntry(node.name, "aten.batch_norm")
            try:
                affine: Affine | FoldRefused = self._affine(node)
            except FoldRefused as refused:
                affine = refused
            found.append(BNSite([node], entry, affine, ANY_RANK - {1}))
        return found

    def _bound(self, bn: fx.Node) -> dict[str, Any]:
        return dict(zip(_BN[bn.target], bn.args, strict=False)) | dict(bn.kwargs)

    def _affine(self, bn: fx.Node) -> Affine:
        bound = self._bound(bn)
        if bound.get("training", False):
            raise FoldRefused("batch_norm runs with training=True")
        if bn.target is _NATIVE_BN and any(
            u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in bn.users
        ):
            raise FoldRefused("its mean/var outputs are used")
        return bn_affine(
            self._tensor(bound["running_mean"]),
            self._tensor(bound["running_var"]),
            self._tensor(bound.get("weight")),
            self._tensor(bound.get("bias")),
            float(bound.get("eps", 1e-5)),
        )

    def _tensor(self, node: object) -> torch.Tensor | None:
        if node is None:
            return None
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            raise FoldRefused("its parameters are not constant attributes")
        value = self.gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value

    def bn_input(self, node: fx.Node) -> fx.Node:
        """The normalised value."""
        return self._bound(node)["input"]

    def bn_output(self, node: fx.Node) -> fx.Node:
        """The normalised result (``getitem(bn, 0)`` of the native op)."""
        if node.target is _NATIVE_BN:
            return next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), node)
        return node

    def producer(self, value: object) -> fx.Node | None:
        """The call writing ``value``."""
        return value if isinstance(value, fx.Node) and value.op == "call_function" else None

    def readers(self, value: fx.Node) -> list[fx.Node | None]:
        """Readers, once per read; the graph output is None. ``reshape_as(x, other)`` reads only ``other``'s shape."""
        found: list[fx.Node | None] = []
        for user in value.users:
            reads: list[fx.Node] = []
            fx.node.map_arg(
                (user.args[:1] if user.target in _SHAPE_OF_SECOND else (user.args, user.kwargs)), reads.append
            )
            count = sum(r is value for r in reads)
            found += [None if user.op == "output" else user] * count
        return found

    def rank(self, value: object) -> int | None:
        """From the exported shapes."""
        shape = _shape(value)
        return None if shape is None else len(shape)

    def last_dim(self, value: object) -> int | None:
        """From the exported shapes (a number, not a symbolic size)."""
        shape = _shape(value)
        return shape[-1] if shape and isinstance(shape[-1], int) else None

    def label(self, node: fx.Node | None) -> str:
        """The node's name."""
        if node is None:
            return "the program output"
        return node.name if node.op == "call_function" else f"{node.name} (a program input or constant)"

    def op(self, node: fx.Node) -> Op:
        """Classify an aten call."""
        target, label = node.target, node.name
        if target in _LAYERS:
            return Op(node, OpKind.LAYER, [node.args[0]], node, label)
        if target in _BN:
            return Op(node, OpKind.BATCH_NORM, [self.bn_input(node)], self.bn_output(node), label)
        native_output = target is operator.getitem and getattr(node.args[0], "target", None) is _NATIVE_BN
        if native_output and node.args[1] == 0:  # the normalised result of the native op: the BN itself
            bn = node.args[0]
            return Op(bn, OpKind.BATCH_NORM, [self.bn_input(bn)], node, bn.name)
        if target is aten.cat.default:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            return Op(node, OpKind.CONCAT, list(node.args[0]), node, label, axis=dim)
        plain_add = target is aten.add.Tensor and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1
        # ``a += b``: a sum too, when nothing else reads the ``a`` it overwrites
        in_place = target is aten.add_.Tensor and len(node.args) == 2 and not node.kwargs
        plain_add = plain_add or (in_place and isinstance(node.args[0], fx.Node) and list(node.args[0].users) == [node])
        if plain_add and all(isinstance(a, fx.Node) for a in node.args):
            return Op(node, OpKind.SUM, list(node.args), node, label)
        plain_sub = target is aten.sub.Tensor and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1
        if plain_sub and all(isinstance(a, fx.Node) for a in node.args):
            return Op(node, OpKind.DIFFERENCE, list(node.args), node, label)
        if _passes_input_on(node):  # a one-input sum: the rules walk through it
            return Op(node, OpKind.SUM, [node.args[0]], node, label)
        if target in _RESHAPES and _flattens_channels(node):
            return Op(node, OpKind.FLATTEN, [node.args[0]], node, label)
        if target in (*_RESHAPES, *_RESHAPE_AS) and isinstance(node.args[0], fx.Node):
            return Op(node, OpKind.RESHAPE, [node.args[0]], node, label)
        if target in _MAX_POOLS:
            return Op(node, OpKind.MAX_POOL, [node.args[0]], node, label)
        if (target in _AVG_POOLS and _avg_pool_exact(node)) or target in _ADAPTIVE_AVG:
            return Op(node, OpKind.AVG_POOL, [node.args[0]], node, label)
        if target is aten.mean.dim and (rank := self.rank(node.args[0])) is not None:
            dims = node.args[1] if len(node.args) > 1 else None
            if dims and all(d % rank >= 2 for d in dims):
                return Op(node, OpKind.AVG_POOL, [node.args[0]], node, label)
        return Op(node, OpKind.OTHER, [a for a in node.args if isinstance(a, fx.Node)], node, label)

    def layer(self, node: fx.Node | None) -> Layer:
        """An aten conv/linear owning its weight and bias attributes."""
        if node is None or node.op != "call_function" or node.target not in _LAYERS:
            what = self.label(node) if node is not None else "a program input"
            raise FoldRefused(f"{what} is not a Conv/Linear (aten convolution or linear)")
        layout, spatial, groups_index = _LAYERS[node.target]
        weight_node = node.args[1]
        bias_node = node.args[2] if len(node.args) > 2 else None
        for param in (weight_node, bias_node):
            if param is not None and (
                not isinstance(param, fx.Node)
                or param.op != "get_attr"
                or set(param.users) != {node}
                or self.attr_readers.get(param.target, 0) != 1
            ):
                raise FoldRefused(f"{node.name}'s weight {getattr(param, 'target', param)} is read elsewhere too")
        weight = self._tensor(weight_node)
        if not weight.dtype.is_floating_point:
            raise FoldRefused(f"{node.name} has a {weight.dtype} weight")
        groups = node.args[groups_index] if groups_index is not None and len(node.args) > groups_index else 1
        rank = self.rank(node)
        ranks = frozenset({rank}) if rank is not None else frozenset({spatial + 2} if spatial else ANY_RANK)
        padding = node.args[4] if spatial and len(node.args) > 4 else 0
        padded = layout is Layout.CONV and spatial > 0 and (isinstance(padding, str) or any(np.ravel(padding)))
        return Layer(
            node=node,
            name=node.name,
            label=node.name,
            layout=layout,
            groups=int(groups),
            spatial=spatial,
            ranks=ranks,
            zero_padded=bool(padded),
            data_input=node.args[0],
            output=node,
            out_channels=output_channels(weight, layout, int(groups)),
            in_channels=input_channels(weight, layout, int(groups)),
            state=(weight_node, bias_node, weight.dtype),
            geometry=_geometry(node, weight) if layout is Layout.CONV and spatial else None,
        )

    # -- writing -------------------------------------------------------------------------

    def current(self, layer: Layer) -> tuple[Any, Any]:
        """Float64 where a fold staged it, else the attribute tensors."""
        staged = self.staged.get(id(layer.node))
        if staged is not None:
            return staged.weight, staged.bias
        weight_node, bias_node, _ = layer.state
        return self._tensor(weight_node), self._tensor(bias_node)

    def weight_dtype(self, layer: Layer) -> torch.dtype:
        """The weight attribute's dtype."""
        return layer.state[2]

    def commit(self, staged: Sequence[Staged]) -> None:
        """Remember the float64 results."""
        for item in staged:
            self.staged[id(item.layer.node)] = item

    def remove_bn(self, site: BNSite, node: fx.Node) -> None:
        """BN's readers read its input; the BN node (and a native BN's getitems) go at once."""
        self.bn_output(node).replace_all_uses_with(self.bn_input(node))
        self._erase_dead([node])

    def _erase_dead(self, nodes: list[fx.Node]) -> None:
        """Erase ``nodes`` (and the getitems that read them) once nothing reads them, readers first."""
        dead = list(nodes) + [u for n in nodes for u in n.users if u.target is operator.getitem]
        while erasable := [n for n in dead if not n.users]:
            for node in erasable:
                self.gm.graph.erase_node(node)
                dead.remove(node)

    def settle(self) -> None:
        """Nothing to drop: results are written by :meth:`write`."""

    # -- merging parallel branches ------------------------------------------------------------

    def nodes(self) -> list[fx.Node]:
        """The aten calls, in order."""
        return [n for n in self.gm.graph.nodes if n.op == "call_function"]

    def bn_affine(self, node: fx.Node) -> Affine:
        """A batch_norm's inference map."""
        return self._affine(node)

    def merge(self, plan: MergePlan) -> None:
        """The kept convolution gets the merged weights; the sum's readers read it; the rest is dead code."""
        self.commit([self.stage(plan.keep, plan.weight, plan.bias)])  # refuses overflow before any change
        plan.total.output.replace_all_uses_with(plan.keep.node)
        self._erase_dead(plan.removed)

    def write(self) -> None:
        """Round each folded layer once and give it its parameters."""
        for item in self.staged.values():
            weight_node, bias_node, dtype = item.layer.state
            device = self._tensor(weight_node).device
            self._set_param(item.layer.node, 1, round_to(item.weight, dtype)[0].to(device))
            self._set_param(item.layer.node, 2, round_to(item.bias, dtype)[0].to(device))
        self.staged.clear()

    def _set_param(self, layer: fx.Node, index: int, value: torch.Tensor) -> None:
        current = layer.args[index] if len(layer.args) > index else None
        if isinstance(current, fx.Node):
            owner_name, _, leaf = current.target.rpartition(".")
            owner = self.gm.get_submodule(owner_name) if owner_name else self.gm
            setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
            return
        name = f"_bnfold_bias_{self.fresh}"
        self.fresh += 1
        self.gm.register_parameter(name, nn.Parameter(value, requires_grad=False))
        with self.gm.graph.inserting_before(layer):
            attr = self.gm.graph.get_attr(name)
        args = list(layer.args) + [None] * max(0, index + 1 - len(layer.args))
        args[index] = attr
        layer.args = tuple(args)


def fold_exported(gm: fx.GraphModule, *, merge_branches: bool = True) -> tuple[fx.GraphModule, FoldReport]:
    """Fold the BNs of a torch.export GraphModule (changed in place) with every rule.

    ``merge_branches``: also merge parallel branches summed into one convolution.

    Returns:
        The module and a report: one entry per aten batch_norm.
    """
    view = AtenView(gm)
    entries, merges = fold_graph(view, RULES, merge=merge_branches)
    view.write()
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm, FoldReport("torch.export", entries, merges=merges)
