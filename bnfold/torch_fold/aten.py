"""Fold BN in torch.export graphs, where every layer is an aten function reading constant attributes.

An exported program's ``module()`` is a GraphModule whose convolutions and BNs are
``call_function`` nodes on aten ops with ``get_attr`` parameters. A BN folds into the
aten convolution or linear that produces its input, or into each producer of a channel
concat (each takes its slice of the map), when those outputs have no other reader, the
weight (and bias) attributes have no other reader, and the channel axes coincide (taken
from the exported shapes). The maths is :mod:`bnfold.affine`'s.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from bnfold.affine import Affine, FoldRefused, Layout, bn_affine, round_to, scale_output_channels
from bnfold.report import FOLDED_INTO_PRECEDING, FOLDED_INTO_PRODUCERS, FoldReport, LayerEntry, first_fold

__all__ = ["fold_exported", "has_aten_batch_norm"]

aten = torch.ops.aten
_BN = {
    aten.batch_norm.default: ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
    aten._native_batch_norm_legit_no_training.default: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "momentum",
        "eps",
    ),
}
_CAT = (aten.cat.default,)
# op -> (layout, spatial dims, index of groups in args, default groups)
_LAYERS = {
    aten.linear.default: (Layout.CONV, 0, None),
    aten.conv1d.default: (Layout.CONV, 1, 6),
    aten.conv2d.default: (Layout.CONV, 2, 6),
    aten.conv3d.default: (Layout.CONV, 3, 6),
    aten.conv_transpose1d.default: (Layout.CONV_TRANSPOSE, 1, 6),
    aten.conv_transpose2d.input: (Layout.CONV_TRANSPOSE, 2, 6),
    aten.conv_transpose3d.input: (Layout.CONV_TRANSPOSE, 3, 6),
}


def has_aten_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a GraphModule with aten batch_norm nodes (a torch.export program)."""
    return isinstance(module, fx.GraphModule) and any(n.target in _BN for n in module.graph.nodes)


def _attr(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise FoldRefused("its parameters are not constant attributes")
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value


class _AtenFold:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.attr_readers: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                self.attr_readers[node.target] = self.attr_readers.get(node.target, 0) + len(node.users)
        self.fresh = 0

    def own(self, node: object, layer: fx.Node) -> None:
        if node is None:
            return
        if set(node.users) != {layer} or self.attr_readers.get(node.target, 0) != 1:
            raise FoldRefused(f"{layer.name}'s parameter {node.target} is read elsewhere too")

    def set_param(self, layer: fx.Node, index: int, value: torch.Tensor) -> None:
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

    def bn_parts(self, bn: fx.Node) -> tuple[dict, list[fx.Node]]:
        """The BN's bound arguments and readers, or the reason it cannot be folded at all."""
        bound = dict(zip(_BN[bn.target], bn.args, strict=False)) | dict(bn.kwargs)
        if bound.get("training", False):
            raise FoldRefused("batch_norm runs with training=True")
        readers = list(bn.users)
        native = bn.target is aten._native_batch_norm_legit_no_training.default
        if native and any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in readers):
            raise FoldRefused("its mean/var outputs are used")
        return bound, readers

    def affine(self, bound: dict) -> Affine:
        """The BN's inference map."""
        return bn_affine(
            _attr(self.gm, bound["running_mean"]),
            _attr(self.gm, bound["running_var"]),
            _attr(self.gm, bound.get("weight")),
            _attr(self.gm, bound.get("bias")),
            float(bound.get("eps", 1e-5)),
        )

    def layer(self, layer: object, reader: fx.Node) -> tuple[fx.Node, Layout, int, torch.Tensor, torch.Tensor | None]:
        """An aten conv/linear whose only reader is ``reader``, writing channels on axis 1, owning its parameters."""
        if not isinstance(layer, fx.Node) or layer.target not in _LAYERS:
            raise FoldRefused(f"its input comes from {getattr(layer, 'name', 'a constant')}, not an aten conv/linear")
        if list(layer.users) != [reader]:
            raise FoldRefused(f"{layer.name}'s output is also read elsewhere")
        layout, spatial, groups_index = _LAYERS[layer.target]
        value = layer.meta.get("val")
        rank = value.dim() if isinstance(value, torch.Tensor) else None
        if rank != (spatial + 2 if spatial else 2):
            raise FoldRefused(f"{layer.name} writes channels on another axis than BN normalises (rank {rank})")
        weight_node, bias_node = layer.args[1], layer.args[2] if len(layer.args) > 2 else None
        self.own(weight_node, layer)
        self.own(bias_node, layer)
        groups = layer.args[groups_index] if groups_index is not None and len(layer.args) > groups_index else 1
        return layer, layout, int(groups), _attr(self.gm, weight_node), _attr(self.gm, bias_node)

    def staged(self, part: tuple, affine: Affine) -> tuple[fx.Node, torch.Tensor, torch.Tensor]:
        """A layer's folded weight and bias, rounded (nothing written yet)."""
        layer, layout, groups, weight, bias = part
        new_weight, new_bias = scale_output_channels(weight, bias, affine, layout, groups)
        new_weight, _ = round_to(new_weight, weight.dtype)
        new_bias, _ = round_to(new_bias, weight.dtype)
        return layer, new_weight.to(weight.device), new_bias.to(weight.device)

    def rewire(self, bn: fx.Node, readers: list[fx.Node], value: fx.Node) -> None:
        """Let BN's readers read ``value`` (its input) instead."""
        if bn.target is aten._native_batch_norm_legit_no_training.default:
            for user in readers:
                if user.args[1] == 0:
                    user.replace_all_uses_with(value)
        else:
            bn.replace_all_uses_with(value)

    def write(self, staged: list[tuple[fx.Node, torch.Tensor, torch.Tensor]]) -> None:
        for layer, weight, bias in staged:
            self.set_param(layer, 1, weight)
            self.set_param(layer, 2, bias)

    def preceding(self, bn: fx.Node) -> list[str]:
        """BN into the aten conv/linear that writes its input."""
        bound, readers = self.bn_parts(bn)
        part = self.layer(bound["input"], bn)
        self.write([self.staged(part, self.affine(bound))])
        self.rewire(bn, readers, part[0])
        return [part[0].name]

    def producers(self, bn: fx.Node) -> list[str]:
        """BN after a channel concat of aten conv/linear outputs: each producer takes its slice of the map."""
        bound, readers = self.bn_parts(bn)
        cat = bound["input"]
        if not isinstance(cat, fx.Node) or cat.target not in _CAT:
            raise FoldRefused("its input is not a concat")
        if list(cat.users) != [bn]:
            raise FoldRefused(f"{cat.name}'s output is also read elsewhere")
        inputs = cat.args[0]
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        value = cat.meta.get("val")
        rank = value.dim() if isinstance(value, torch.Tensor) else None
        if rank is None or dim % rank != 1:
            raise FoldRefused(f"{cat.name} concatenates along axis {dim}, not the channel axis 1")
        if len(set(inputs)) != len(inputs):
            raise FoldRefused(f"{cat.name} reads one tensor twice")
        affine = self.affine(bound)
        staged, start = [], 0
        for producer in inputs:
            part = self.layer(producer, cat)
            channels = int(part[0].meta["val"].shape[1])
            if start + channels > affine.channels:
                raise FoldRefused(f"{cat.name} has more channels than BN ({affine.channels})")
            staged.append(self.staged(part, affine.slice(start, start + channels)))
            start += channels
        if start != affine.channels:
            raise FoldRefused(f"{cat.name} has {start} channels but BN has {affine.channels}")
        self.write(staged)
        self.rewire(bn, readers, cat)
        return [layer.name for layer, _, _ in staged]


def fold_exported(gm: fx.GraphModule) -> tuple[fx.GraphModule, FoldReport]:
    """Fold the BNs of a torch.export GraphModule (changed in place) into their aten producers.

    Returns:
        The module and a report: one entry per aten batch_norm.
    """
    folder = _AtenFold(gm)
    entries = []
    for bn in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _BN]:
        entry = LayerEntry(bn.name, "aten.batch_norm")
        source = bn.args[0] if bn.args else bn.kwargs.get("input")
        if isinstance(source, fx.Node) and source.target in _CAT:
            attempt = ("before", FOLDED_INTO_PRODUCERS, lambda _, bn=bn: folder.producers(bn))
        else:
            attempt = ("before", FOLDED_INTO_PRECEDING, lambda _, bn=bn: folder.preceding(bn))
        first_fold(entry, [attempt])
        entries.append(entry)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm, FoldReport("torch.export", entries)
