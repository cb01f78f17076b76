"""The ONNX fold pass over one graph: BatchNormalization (and BN decomposed into Mul/Add) folded away.

Each BN is *matched* against its producer (Conv, ConvTranspose, Gemm, MatMul with or
without a bias Add, or a channel Concat of convolutions) and its single consumer
(Conv without zero padding, Gemm, MatMul); each *check* raises
:class:`~bnfold.affine.FoldRefused` with the reason the report shows; the *rewrite*
uses the float64 maths of :mod:`bnfold.affine`, rounds once to the weight's dtype, and
writes new initializers (a weight shared with another node is copied, not changed).
Subgraphs (If/Loop/Scan bodies) are folded too.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
from onnx import helper

from bnfold.affine import (
    Affine,
    FoldRefused,
    Layout,
    bn_affine,
    input_channels,
    output_channels,
    round_to,
    scale_input_channels,
    scale_output_channels,
    scale_output_channels_rounded,
)
from bnfold.onnx_fold.graph import FLOAT_DTYPES, Encoded, GraphIndex, to_float64
from bnfold.report import (
    FOLDED_INTO_FOLLOWING,
    FOLDED_INTO_PRECEDING,
    FOLDED_INTO_PRODUCERS,
    KEPT,
    LayerEntry,
    first_fold,
)

__all__ = ["GraphPass"]

logger = logging.getLogger(__name__)

_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_DECOMPOSED = ("Mul", "Add", "Sub", "Div")
# ops a BN may be reached through before or after a layer (sum, concat, flatten, decomposed BN)
_PASS_THROUGH = ("Add", "Sum", "Concat", "Flatten", "Reshape", "Identity", "Mul", "Sub", "Div")
_ALWAYS_EXACT = 2**16  # float64 values of small tensors are kept anyway


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value: object) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _node_id(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}:{node.output[0]}"


def _label(node: onnx.NodeProto | None) -> str:
    if node is None:
        return "a graph output"
    return f"{node.op_type} '{node.name or node.output[0]}'"


@dataclasses.dataclass
class _Layer:
    """A linear node whose constant weight can absorb a per-channel affine map."""

    node: onnx.NodeProto
    weight: np.ndarray
    layout: Layout
    groups: int
    out_rank: int | None
    bias: np.ndarray | None  # Conv/ConvTranspose bias, Gemm C, or the constant of MatMul's bias Add
    add: onnx.NodeProto | None = None  # MatMul's bias Add
    add_const_index: int = 1
    weight64: np.ndarray | None = None  # the exact float64 values where an earlier fold wrote this weight, else None
    bias64: np.ndarray | None = None

    @property
    def output(self) -> str:
        return (self.add or self.node).output[0]

    @property
    def dtype(self) -> np.dtype:
        dtype = FLOAT_DTYPES.get(helper.np_dtype_to_tensor_dtype(self.weight.dtype))
        if dtype is None:
            raise FoldRefused(f"{_label(self.node)} has a {self.weight.dtype} weight")
        return dtype


class GraphPass:
    """Match, check and rewrite every BN of one graph."""

    def __init__(self, index: GraphIndex, entries: list[LayerEntry], opset: int) -> None:
        self.index = index
        self.entries = entries
        self.opset = opset
        # float64 values behind the initializers this pass wrote: a layer folded twice is still rounded once
        self.exact: dict[str, np.ndarray] = {}
        self._rounded: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _f64(self, name: str, array: np.ndarray | None) -> np.ndarray | None:
        if array is None:
            return None
        return self.exact[name] if name in self.exact else to_float64(array)

    def _with_exact(self, layer: _Layer) -> _Layer:
        node = layer.node
        layer.weight64 = self.exact.get(node.input[1])  # None: the stored weight is the exact value
        if layer.add is not None:
            bias = self._f64(layer.add.input[layer.add_const_index], layer.bias)
            layer.bias64 = None if bias is None else bias.reshape(-1)
        else:
            layer.bias64 = self._f64(node.input[2], layer.bias) if len(node.input) > 2 and node.input[2] else None
        return layer

    # -- match ---------------------------------------------------------------------------

    def layer(self, node: onnx.NodeProto | None, *, allow_add: bool = True) -> _Layer:
        """Describe ``node`` as a linear layer with constant weights, or refuse."""
        return self._with_exact(self._match_layer(node, allow_add=allow_add))

    def _match_layer(self, node: onnx.NodeProto | None, *, allow_add: bool = True) -> _Layer:
        if node is None:
            raise FoldRefused("it comes from a graph input or initializer")
        if node.domain not in ("", "ai.onnx"):
            raise FoldRefused(f"{_label(node)} is not a standard op")
        if allow_add and node.op_type == "Add":
            return self.matmul_with_add(node)
        if node.op_type not in _LINEAR:
            raise FoldRefused(f"{_label(node)} is not a Conv, ConvTranspose, Gemm or MatMul")
        if len(node.input) < 2:
            raise FoldRefused(f"{_label(node)} has no weight input")
        weight = self.index.constant(node.input[1])
        if weight is None:
            why = self._non_constant(node.input[1])
            raise FoldRefused(f"the weight of {_label(node)} {why}")
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = self.index.constant(node.input[2])
            if bias is None:
                raise FoldRefused(f"the bias of {_label(node)} {self._non_constant(node.input[2])}")
        if node.op_type in ("Conv", "ConvTranspose"):
            layout = Layout.CONV if node.op_type == "Conv" else Layout.CONV_TRANSPOSE
            return _Layer(node, weight, layout, int(_attr(node, "group", 1)), weight.ndim, bias)
        if node.op_type == "Gemm":
            layout = Layout.CONV if _attr(node, "transB", 0) else Layout.MATMUL
            return _Layer(node, weight, layout, 1, 2, bias)
        if weight.ndim != 2:
            raise FoldRefused(f"{_label(node)} has a {weight.ndim}-D weight; only 2-D MatMul weights fold")
        if self.index.constant(node.input[0]) is not None:
            raise FoldRefused(f"{_label(node)} multiplies constants only")
        return _Layer(node, weight, Layout.MATMUL, 1, self.index.ranks.get(node.output[0]), None)

    def matmul_with_add(self, add: onnx.NodeProto) -> _Layer:
        """Describe MatMul followed by a constant bias Add as one layer, or refuse."""
        for const_index in (1, 0):
            bias = self.index.constant(add.input[const_index])
            other = add.input[1 - const_index]
            producer = self.index.producer.get(other)
            if bias is None or producer is None or producer.op_type != "MatMul":
                continue
            if self.index.readers(other) != [add]:
                raise FoldRefused(f"the output of {_label(producer)} is also read by another node")
            layer = self._match_layer(producer, allow_add=False)
            if bias.ndim > 1 and any(d != 1 for d in bias.shape[:-1]):
                raise FoldRefused(f"the bias of {_label(add)} is not one value per output channel")
            layer.add, layer.add_const_index, layer.bias = add, const_index, bias.reshape(-1)
            layer.out_rank = self.index.ranks.get(add.output[0], layer.out_rank)
            return layer
        raise FoldRefused(f"{_label(add)} is not MatMul plus a constant bias")

    def _non_constant(self, name: str) -> str:
        if name in self.index.overridable:
            return (
                f"'{name}' is an initializer also listed as a graph input, so it can be overridden at run time "
                "(pass --allow-initializer-inputs to treat such initializers as constants)"
            )
        if self.index.unavailable.get(name):
            return f"is not used as a constant: {self.index.unavailable[name]}"
        producer = self.index.producer.get(name)
        return f"is not a constant (it is computed by {_label(producer)})" if producer else "is not a constant"

    def bn_affine(self, node: onnx.NodeProto) -> Affine:
        """The inference map of a BatchNormalization node, or the reason it has none."""
        if any(o for o in node.output[1:]):
            raise FoldRefused("its optional outputs (running statistics) are used")
        if _attr(node, "training_mode", 0):
            raise FoldRefused("training_mode=1: it normalises with batch statistics")
        if _attr(node, "spatial", 1) == 0:
            raise FoldRefused("spatial=0: it normalises every activation separately")
        if len(node.input) != 5:
            raise FoldRefused("it does not have the five inputs of BatchNormalization")
        params = []
        for label, name in zip(("scale", "B", "mean", "var"), node.input[1:], strict=True):
            value = self.index.constant(name)
            if value is None:
                raise FoldRefused(f"its {label} {self._non_constant(name)}")
            params.append(to_float64(value).reshape(-1))
        scale, bias, mean, var = params
        channels = mean.size
        if any(p.size != channels for p in params):
            raise FoldRefused("its scale, B, mean and var have different lengths")
        return bn_affine(mean, var, scale, bias, float(_attr(node, "epsilon", 1e-5)))

    # -- rewrite helpers -----------------------------------------------------------------

    def new_initializer(self, tensor: np.ndarray | Encoded, base: str, *, keep_exact: bool = True) -> str:
        """Add a rounded tensor as a fresh initializer; return its name.

        Its float64 value is kept (so a second fold into the same layer rounds once)
        only when ``keep_exact``: a layer that no other BN can reach again needs none.
        """
        name = self.index.fresh(f"{base}_bnfold")
        if id(tensor) in self._rounded and self._rounded[id(tensor)][0] is tensor:
            exact = self._rounded.pop(id(tensor))[1]
            if keep_exact or exact.size <= _ALWAYS_EXACT:
                self.exact[name] = exact
        self.index.add_initializer(name, tensor)
        return name

    def may_fold_again(self, layer: _Layer, output: str | None = None) -> bool:
        """Whether another BN could still fold into this layer: one reads its output or writes its input.

        Args:
            layer: The layer.
            output: The name its output will have (a fold renames it to the BN's output).
        """
        out = output or layer.output
        for reader in self.index.readers(out):
            if reader is None:
                continue
            if reader.op_type == "BatchNormalization" or (
                reader.op_type in _PASS_THROUGH
                and any(
                    r is not None and r.op_type == "BatchNormalization"
                    for o in reader.output
                    for r in self.index.readers(o)
                )
            ):
                return True
        producer = self.index.producer.get(layer.node.input[0]) if layer.node.input else None
        if producer is not None and producer.op_type in _PASS_THROUGH and producer.input:
            producer = self.index.producer.get(producer.input[0])
        return producer is not None and producer.op_type == "BatchNormalization"

    def round(self, value: np.ndarray, layer: _Layer) -> np.ndarray:
        """Round a float64 result once to the layer's weight dtype (refusing overflow)."""
        rounded, _flushed = round_to(value, layer.dtype)
        self._rounded[id(rounded)] = (rounded, value)
        return rounded

    def write_weight(
        self, layer: _Layer, weight: np.ndarray | Encoded, notes: list[str], *, keep_exact: bool | None = None
    ) -> None:
        """Point the layer at its folded weight (a copy when the old one is shared).

        ``keep_exact``: whether another BN may still fold into the layer (asked of the graph when None).
        """
        old = layer.node.input[1]
        if len(self.index.readers(old)) > 1:
            notes.append(f"weight '{old}' is shared with another node: folded into a copy")
        if keep_exact is None:
            keep_exact = self.may_fold_again(layer)
        name = self.new_initializer(weight, old, keep_exact=keep_exact)
        self.index.set_input(layer.node, 1, name)

    def write_bias(self, layer: _Layer, bias: np.ndarray) -> None:
        """Point the layer at its folded bias: Conv/Gemm input, MatMul's Add, or a new Add."""
        node = layer.node
        if layer.add is not None:
            old = layer.add.input[layer.add_const_index]
            self.index.set_input(layer.add, layer.add_const_index, self.new_initializer(bias, old))
            return
        if node.op_type == "MatMul":
            if not bias.any():
                return
            out = node.output[0]
            self.index.set_output(node, 0, self.index.fresh(f"{out}_matmul"))
            name = self.new_initializer(bias, f"{node.name or out}_bias")
            add = helper.make_node("Add", [node.output[0], name], [out], name=self.index.fresh(f"{node.name}_bias_add"))
            self.index.insert_after(node, add)
            return
        name = self.new_initializer(
            bias, (node.input[2] if len(node.input) > 2 and node.input[2] else node.name) or "bias"
        )
        if node.op_type == "Gemm":
            _set_attr(node, "beta", 1.0)
        self.index.set_input(node, 2, name)

    def check_weight_dtype_matches(self, layer: _Layer) -> None:
        """Refuse a layer whose weight and bias differ in dtype."""
        if layer.bias is not None and np.asarray(layer.bias).dtype != layer.weight.dtype:
            raise FoldRefused(f"{_label(layer.node)} has weight and bias of different dtypes")

    def fold_into(
        self, layer: _Layer, affine: Affine, notes: list[str], *, exact_needed: bool = True
    ) -> tuple[np.ndarray | Encoded, np.ndarray]:
        """The layer's weight and bias with ``affine`` applied to its output, rounded.

        A large Conv weight that no other BN can reach afterwards (``exact_needed`` False)
        is folded a block of output channels at a time, never whole in float64.
        """
        self.check_weight_dtype_matches(layer)
        w = layer.weight64 if layer.weight64 is not None else layer.weight
        large = layer.weight.size > _ALWAYS_EXACT and layer.weight64 is None
        if not exact_needed and large and layer.node.op_type == "Conv" and layer.layout is Layout.CONV:
            b = layer.bias64 if layer.bias is not None else None
            weight, bias, _ = scale_output_channels_rounded(layer.weight, b, affine, layer.dtype)
            encoded = Encoded(weight.tobytes(), weight.dtype, weight.shape)
            del weight  # one copy of the layer less while its initializer is written
            return encoded, self.round(bias, layer)
        if layer.node.op_type == "Gemm":
            weight, _ = scale_output_channels(w, None, affine, layer.layout)
            beta = float(_attr(layer.node, "beta", 1.0))
            c = layer.bias64 * beta if layer.bias is not None else np.zeros(affine.channels, dtype=np.float64)
            bias = affine.apply_last_axis(c)
        else:
            b = layer.bias64 if layer.bias is not None else None
            weight, bias = scale_output_channels(w, b, affine, layer.layout, layer.groups)
        return self.round(weight, layer), self.round(bias, layer)

    # -- the three directions ------------------------------------------------------------

    def only_reader(self, value: str, reader: onnx.NodeProto, what: str) -> None:
        """Refuse unless ``reader`` is the only reader of ``value`` (graph outputs count)."""
        readers = self.index.readers(value)
        if readers != [reader]:
            other = next((r for r in readers if r is not reader), reader)
            raise FoldRefused(f"the output of {what} is also read by {_label(other)}")

    def check_channel_axis(self, layer: _Layer) -> None:
        """Refuse a MatMul whose output channels are not on axis 1 (needs its rank)."""
        if layer.node.op_type != "MatMul":
            return  # Conv/ConvTranspose/Gemm outputs always carry channels on axis 1
        if layer.out_rank is None:
            raise FoldRefused(f"the rank of {_label(layer.node)}'s output is unknown, so its channel axis is unproven")
        if layer.out_rank != 2:
            raise FoldRefused(
                f"{_label(layer.node)} writes channels on axis {layer.out_rank - 1} of a {layer.out_rank}-D "
                "tensor but BN normalises axis 1"
            )

    def preceding(self, bn: onnx.NodeProto, affine: Affine, notes: list[str]) -> list[str]:
        """Fold BN into the layer that produces its input."""
        x = bn.input[0]
        layer = self.layer(self.index.producer.get(x))
        self.only_reader(x, bn, _label(layer.add or layer.node))
        self.check_channel_axis(layer)
        exact_needed = self.may_fold_again(layer, bn.output[0])
        weight, bias = self.fold_into(layer, affine, notes, exact_needed=exact_needed)
        target = _node_id(layer.node)
        self.remove(bn)
        self.index.set_output(layer.add or layer.node, 0, bn.output[0])
        self.write_weight(layer, weight, notes, keep_exact=exact_needed)
        self.write_bias(layer, bias)
        return [target]

    def producers(self, bn: onnx.NodeProto, concat: onnx.NodeProto, affine: Affine, notes: list[str]) -> list[str]:
        """Fold BN after a channel Concat into each Conv/ConvTranspose producer's slice."""
        x = bn.input[0]
        self.only_reader(x, bn, _label(concat))
        axis = int(_attr(concat, "axis", 0))
        layers = []
        for value in concat.input:
            layer = self.layer(self.index.producer.get(value), allow_add=False)
            if layer.node.op_type not in ("Conv", "ConvTranspose"):
                raise FoldRefused(f"{_label(layer.node)} feeds the Concat; only Conv/ConvTranspose inputs fold")
            if list(concat.input).count(value) != 1:
                raise FoldRefused(f"{_label(layer.node)} feeds the Concat twice")
            self.only_reader(value, concat, _label(layer.node))
            layers.append(layer)
        rank = layers[0].out_rank
        if axis < 0:
            axis += rank
        if axis != 1:
            raise FoldRefused(f"the Concat joins axis {axis}, not the channel axis 1")
        staged, start = [], 0
        for layer in layers:
            stop = start + output_channels(layer.weight, layer.layout, layer.groups)
            if stop > affine.channels:
                raise FoldRefused("the Concat has more channels than BN")
            staged.append((layer, *self.fold_into(layer, affine.slice(start, stop), notes)))
            start = stop
        if start != affine.channels:
            raise FoldRefused(f"the Concat has {start} channels but BN has {affine.channels}")
        return self.replace_with_producers(bn, concat, staged, notes)

    def sum_producers(self, bn: onnx.NodeProto, add: onnx.NodeProto, affine: Affine, notes: list[str]) -> list[str]:
        """BN(a + b) = s*a + (s*b + t): scale both layers, give the first one the shift."""
        x = bn.input[0]
        self.only_reader(x, bn, _label(add))
        if len(add.input) != 2 or add.input[0] == add.input[1]:
            raise FoldRefused(f"{_label(add)} does not add two different tensors")
        scale_only = Affine(affine.scale, np.zeros_like(affine.shift))
        staged = []
        for value, part in zip(add.input, (affine, scale_only), strict=True):
            layer = self.layer(self.index.producer.get(value), allow_add=False)
            if any(layer.node is other.node for other, _, _ in staged):
                raise FoldRefused(f"{_label(layer.node)} feeds {_label(add)} twice")
            self.only_reader(value, add, _label(layer.node))
            self.check_channel_axis(layer)
            rank = self.index.ranks.get(value)
            if rank is not None and layer.out_rank is not None and rank != layer.out_rank:
                raise FoldRefused(f"{_label(layer.node)} has an unexpected output rank")
            staged.append((layer, *self.fold_into(layer, part, notes)))
        ranks = {layer.out_rank for layer, _, _ in staged} | {self.index.ranks.get(v) for v in add.input}
        if len(ranks - {None}) != 1 or any(layer.out_rank is None for layer, _, _ in staged):
            raise FoldRefused(f"{_label(add)} adds tensors of different or unknown ranks (channels may not align)")
        return self.replace_with_producers(bn, add, staged, notes)

    def replace_with_producers(
        self, bn: onnx.NodeProto, joint: onnx.NodeProto, staged: list[tuple], notes: list[str]
    ) -> list[str]:
        """Write each producer's folded weights; the Concat/Add then writes what BN wrote."""
        targets = [_node_id(layer.node) for layer, _, _ in staged]
        for layer, weight, bias in staged:
            self.write_weight(layer, weight, notes)
            self.write_bias(layer, bias)
        self.remove(bn)
        self.index.set_output(joint, 0, bn.output[0])
        return targets

    def following(self, bn: onnx.NodeProto, affine: Affine, notes: list[str]) -> list[str]:
        """Fold BN into the single layer that reads its output."""
        y = bn.output[0]
        readers = self.index.readers(y)
        if len(readers) != 1 or readers[0] is None:
            raise FoldRefused(f"its output is read by {len(readers)} consumers" if readers else "its output is unused")
        reader, through = readers[0], None
        if self.flattens_channels(reader, y):
            through = reader  # (N, C, ...) -> (N, C * ...): each channel's values stay one contiguous run
            after = self.index.readers(reader.output[0])
            if len(after) != 1 or after[0] is None:
                raise FoldRefused(f"the output of {_label(reader)} is read by {len(after)} consumers")
            reader = after[0]
        layer = self.layer(reader, allow_add=False)
        node = layer.node
        data = through.output[0] if through is not None else y
        if node.input[0] != data or list(node.input).count(data) != 1:
            raise FoldRefused(f"{_label(node)} reads BN's output as more than its data input")
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            raise FoldRefused(f"{_label(node)} transposes its input (transA=1), so it reads BN channels as rows")
        if through is not None:
            if node.op_type not in ("Gemm", "MatMul"):
                raise FoldRefused(f"{_label(node)} after {_label(through)} is not a Gemm or MatMul")
            features = input_channels(layer.weight, layer.layout, layer.groups)
            if features % affine.channels:
                raise FoldRefused(f"{_label(node)} reads {features} features, not a multiple of BN's channels")
            affine = affine.repeat(features // affine.channels)
            notes.append(f"through {_label(through)}")
        elif node.op_type == "MatMul" and self.index.ranks.get(y) != 2:
            rank = self.index.ranks.get(y)
            raise FoldRefused(
                f"BN's output is {rank}-D, so {_label(node)} does not read its channels"
                if rank
                else f"the rank of BN's output is unknown, so the channel axis {_label(node)} reads is unproven"
            )
        self.check_weight_dtype_matches(layer)
        w = layer.weight64 if layer.weight64 is not None else layer.weight
        padded = node.op_type == "Conv" and self.zero_padded(node, layer.weight)
        if node.op_type in ("Gemm", "MatMul"):
            weight, contribution = scale_input_channels(w, None, affine, layer.layout)
            alpha = float(_attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
            beta = float(_attr(node, "beta", 1.0))
            base = layer.bias64 * beta if layer.bias is not None else np.zeros((), dtype=np.float64)
            bias = base + alpha * contribution
        else:
            b = layer.bias64 if layer.bias is not None else None
            weight, bias = scale_input_channels(w, b, affine, layer.layout, layer.groups, padded=padded)
        weight, bias = self.round(weight, layer), self.round(bias, layer)
        target = _node_id(node)
        self.write_weight(layer, weight, notes)
        if layer.bias is not None or bias.any():
            self.write_bias(layer, bias)
        self.remove(bn)
        self.index.set_input(through if through is not None else node, 0, bn.input[0])
        return [target]

    def flattens_channels(self, node: onnx.NodeProto | None, value: str) -> bool:
        """Whether ``node`` turns ``value`` (N, C, ...) into (N, C * ...): Flatten(axis=1), or a Reshape to that."""
        if node is None or node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "Flatten":
            return _attr(node, "axis", 1) == 1
        if node.op_type != "Reshape" or len(node.input) != 2 or node.input[0] != value:
            return False
        target = self.index.constant(node.input[1])
        shape = self.index.shapes.get(value)
        if target is None or shape is None or target.ndim != 1 or len(target) != 2 or len(shape) < 2:
            return False
        batch, rest = int(target[0]), int(target[1])
        features = int(np.prod(shape[1:])) if all(d is not None for d in shape[1:]) else None
        if 0 in (batch, rest) and _attr(node, "allowzero", 0):
            return False
        keeps_batch = (
            batch == 0
            or (batch == -1 and features is not None and rest == features)
            or (shape[0] is not None and batch == shape[0])
        )
        return keeps_batch and (rest == -1 and batch != -1 or (features is not None and rest == features))

    @staticmethod
    def zero_padded(node: onnx.NodeProto, weight: np.ndarray) -> bool:
        """Whether a Conv pads its input with zeros (explicit pads or SAME auto-padding)."""
        auto_pad = _attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            dilations = _attr(node, "dilations", [1] * (weight.ndim - 2))
            return any(d * (k - 1) > 0 for d, k in zip(dilations, weight.shape[2:], strict=False))
        return any(p != 0 for p in _attr(node, "pads", []) or [])

    def remove(self, node: onnx.NodeProto) -> None:
        """Drop a node (the index is updated in place)."""
        self.index.remove(node)

    # -- decomposed BN -------------------------------------------------------------------

    def decomposed_affine(self, node: onnx.NodeProto, layer: _Layer, value_index: int, const: np.ndarray) -> Affine:
        """A per-channel constant Mul/Add/Sub/Div as an affine map, or refuse."""
        rank = layer.out_rank
        if rank is None:
            raise FoldRefused("unknown output rank")
        channels = output_channels(layer.weight, layer.layout, layer.groups)
        if const.ndim > rank:
            raise FoldRefused("constant has more axes than the tensor")
        shape = (1,) * (rank - const.ndim) + tuple(const.shape)
        if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
            raise FoldRefused("constant is not one value per channel")
        c = np.broadcast_to(to_float64(const).reshape(-1), (channels,)).copy()
        one, zero = np.ones(channels, dtype=np.float64), np.zeros(channels, dtype=np.float64)
        if node.op_type == "Mul":
            return Affine(c, zero)
        if node.op_type == "Add":
            return Affine(one, c)
        if value_index != 0:
            raise FoldRefused("the tensor is the second operand")
        return Affine(one, -c) if node.op_type == "Sub" else Affine(1.0 / c, zero)

    def fold_decomposed(self, node: onnx.NodeProto) -> bool:
        """Fold a per-channel constant Mul/Add/Sub/Div into the layer before it, if exact."""
        if node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            return False
        for const_index in (1, 0):
            value = node.input[1 - const_index]
            producer = self.index.producer.get(value)
            if producer is None or producer.op_type not in _LINEAR:
                continue  # checked first: a constant is computed only where a fold could use it
            const = self.index.constant(node.input[const_index])
            if const is None:
                continue
            if node.op_type == "Add" and producer.op_type == "MatMul":
                return False  # MatMul + bias Add is already the folded form
            try:
                layer = self.layer(producer, allow_add=False)
                self.only_reader(value, node, _label(producer))
                self.check_channel_axis(layer)
                if const.dtype != layer.weight.dtype:
                    raise FoldRefused("constant and weight dtypes differ")
                affine = self.decomposed_affine(node, layer, 1 - const_index, const)
                notes: list[str] = []
                weight, bias = self.fold_into(layer, affine, notes)
            except FoldRefused:
                return False
            target, name = _node_id(producer), _node_id(node)
            self.remove(node)
            self.index.set_output(layer.node, 0, node.output[0])
            self.write_weight(layer, weight, notes)
            self.write_bias(layer, bias)
            self.entries.append(
                LayerEntry(
                    name,
                    f"{node.op_type} (decomposed BN)",
                    FOLDED_INTO_PRECEDING,
                    [target],
                    notes=notes,
                )
            )
            return True
        return False

    # -- driver --------------------------------------------------------------------------

    def try_fold(self, bn: onnx.NodeProto, entry: LayerEntry) -> bool:
        """Check one BN and fold it in the first direction that is not refused."""
        try:
            affine = self.bn_affine(bn)
        except FoldRefused as refused:
            entry.reason = str(refused)
            return False
        producer = self.index.producer.get(bn.input[0])
        op = producer.op_type if producer is not None and producer.domain in ("", "ai.onnx") else None
        sum_of_tensors = op == "Add" and all(self.index.constant(i) is None for i in producer.input)
        if op == "Concat":
            before, action = (lambda notes: self.producers(bn, producer, affine, notes)), FOLDED_INTO_PRODUCERS
        elif sum_of_tensors:
            before, action = (lambda notes: self.sum_producers(bn, producer, affine, notes)), FOLDED_INTO_PRODUCERS
        else:
            before, action = (lambda notes: self.preceding(bn, affine, notes)), FOLDED_INTO_PRECEDING
        attempts = [
            ("before", action, before),
            ("after", FOLDED_INTO_FOLLOWING, lambda notes: self.following(bn, affine, notes)),
        ]
        return first_fold(entry, attempts)

    def run(self) -> None:
        """Fold every BN of the graph, and decomposed BN, until nothing changes."""
        sites = [
            (node, LayerEntry(_node_id(node), "BatchNormalization"))
            for node in self.index.graph.node
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
        ]
        changed = True
        while changed:
            changed = False
            for bn, entry in sites:
                if entry.action == KEPT and self.try_fold(bn, entry):
                    changed = True
                self._rounded.clear()  # results of refused attempts
            for node in list(self.index.nodes()):
                if node.op_type in _DECOMPOSED and self.fold_decomposed(node):
                    changed = True
                self._rounded.clear()
        self.index.compact()
        self.entries.extend(entry for _, entry in sites)
