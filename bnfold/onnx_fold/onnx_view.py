"""One ONNX graph as a graph view: BatchNormalization nodes, and BN decomposed into Mul/Add, folded away.

Layers are Conv, ConvTranspose, Gemm and MatMul (with or without a constant bias
Add) with constant weights. Every rule of :mod:`bnfold.rules` runs on this view; it
rounds once to the weight's dtype and writes new initializers (a weight shared
with another node is copied, not changed). A per-channel constant Mul/Add/Sub/Div
after a layer (a BN some exporter decomposed) is folded by this view's own step.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

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
from bnfold.report import FOLDED_INTO_PRECEDING, LayerEntry
from bnfold.rules.merge_branches import MergePlan
from bnfold.rules.view import ANY_RANK, BNSite, ConvGeometry, Layer, Op, OpKind, Staged

__all__ = ["OnnxView"]

logger = logging.getLogger(__name__)

_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_DECOMPOSED = ("Mul", "Add", "Sub", "Div")
# ops a BN may be reached through before or after a layer (sum, concat, flatten, decomposed BN)
_PASS_THROUGH = ("Add", "Sum", "Concat", "Flatten", "Reshape", "Identity", "Mul", "Sub", "Div")
# ops that read only the shape or dtype of an input (CastLike of its second), which no fold changes
_METADATA_READERS = ("Shape", "Size", "EyeLike", "RandomNormalLike", "RandomUniformLike")
_DTYPE_OF_SECOND = ("CastLike",)


def _data_reads(node: onnx.NodeProto, value: str) -> int:
    """How many of ``node``'s inputs read the values (not only the shape or dtype) of ``value``."""
    if node.op_type in _METADATA_READERS:
        return 0
    positions = [i for i, name in enumerate(node.input) if name == value]
    return sum(1 for i in positions if not (node.op_type in _DTYPE_OF_SECOND and i == 1))


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


def _geometry(node: onnx.NodeProto, weight: np.ndarray) -> ConvGeometry | None:
    """A Conv's kernel, stride, dilation and explicit padding (None for SAME auto-padding)."""
    kernel = tuple(int(k) for k in weight.shape[2:])
    n = len(kernel)
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return None
    pads = list(_attr(node, "pads", None) or [0] * 2 * n) if auto_pad == "NOTSET" else [0] * 2 * n
    return ConvGeometry(
        kernel,
        tuple(_attr(node, "strides", None) or [1] * n),
        tuple(_attr(node, "dilations", None) or [1] * n),
        tuple(pads[:n]),
        tuple(pads[n:]),
    )


class OnnxView:
    """One ONNX graph (its index updated in place by every rewrite) as a graph view."""

    kind = "onnx"
    shape_hint = "give the model static input shapes so shape inference can find it"

    def __init__(self, index: GraphIndex, opset: int) -> None:
        self.index = index
        self.opset = opset
        self.decomposed: list[LayerEntry] = []  # report rows of decomposed BNs folded
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

    def _onnx_layer(self, node: onnx.NodeProto | None, *, allow_add: bool = True) -> _Layer:
        """Describe ``node`` as a linear layer with constant weights, or refuse."""
        return self._with_exact(self._match_layer(node, allow_add=allow_add))

    def layer(self, node: onnx.NodeProto | None) -> Layer:
        """A Conv / ConvTranspose / Gemm / MatMul (or MatMul + constant bias Add) with constant weights."""
        state = self._onnx_layer(node)
        layer = state.node
        self.check_weight_dtype_matches(state)
        if layer.op_type in ("Conv", "ConvTranspose"):
            spatial, ranks = state.weight.ndim - 2, frozenset({state.weight.ndim})
        elif layer.op_type == "Gemm":
            spatial, ranks = 0, frozenset({2})
        else:
            spatial = 0
            ranks = frozenset({state.out_rank}) if state.out_rank is not None else ANY_RANK
        return Layer(
            node=node,
            name=_node_id(layer),
            label=_label(layer),
            layout=state.layout,
            groups=state.groups,
            spatial=spatial,
            ranks=ranks,
            zero_padded=layer.op_type == "Conv" and self.zero_padded(layer, state.weight),
            data_input=layer.input[0],
            output=state.output,
            out_channels=output_channels(state.weight, state.layout, state.groups),
            in_channels=input_channels(state.weight, state.layout, state.groups),
            state=state,
            geometry=_geometry(layer, state.weight) if layer.op_type == "Conv" else None,
        )

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
            if self.readers(other) != [add]:
                raise FoldRefused(f"the output of {_label(producer)} is also read by another node")
            layer = self._match_layer(producer, allow_add=False)
            if bias.ndim > 1 and any(d != 1 for d in bias.shape[:-1]):
                raise FoldRefused(f"the bias of {_label(add)} is not one value per output channel")
            layer.add, layer.add_const_index, layer.bias = add, const_index, bias.reshape(-1)
            layer.out_rank = self.index.ranks.get(add.output[0], layer.out_rank)
            return layer
        if not any(getattr(self.index.producer.get(i), "op_type", None) == "MatMul" for i in add.input):
            raise FoldRefused(f"{_label(add)} is not a Conv, ConvTranspose, Gemm or MatMul")  # a sum, or x + constant
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

    def check_matmul_axis(self, layer: _Layer) -> None:
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

    # -- the graph view --------------------------------------------------------------------

    def sites(self) -> list[BNSite]:
        """Every standard BatchNormalization node."""
        found = []
        for node in self.index.graph.node:
            if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            try:
                affine: Affine | FoldRefused = self.bn_affine(node)
            except FoldRefused as refused:
                affine = refused
            found.append(BNSite([node], LayerEntry(_node_id(node), "BatchNormalization"), affine, ANY_RANK - {1}))
        return found

    def bn_input(self, node: onnx.NodeProto) -> str:
        """BN's X."""
        return node.input[0]

    def bn_output(self, node: onnx.NodeProto) -> str:
        """BN's Y."""
        return node.output[0]

    def producer(self, value: str) -> onnx.NodeProto | None:
        """The node writing ``value``."""
        return self.index.producer.get(value)

    def readers(self, value: str) -> list[onnx.NodeProto | None]:
        """Readers of the value's data once per read; a graph output is None.

        Shape and Size (and CastLike's dtype input) read only metadata, which no fold changes, so they
        are not counted.
        """
        found: list[onnx.NodeProto | None] = []
        seen: set[int] = set()
        for reader in self.index.readers(value):  # a node once per read
            if reader is None:
                found.append(None)
            elif id(reader) not in seen:
                seen.add(id(reader))
                found += [reader] * _data_reads(reader, value)
        return found

    def rank(self, value: str) -> int | None:
        """From shape inference."""
        return self.index.ranks.get(value)

    def last_dim(self, value: str) -> int | None:
        """From shape inference, where the last axis has a static size."""
        shape = self.index.shapes.get(value)
        return shape[-1] if shape else None

    def label(self, node: onnx.NodeProto | None) -> str:
        """``OpType 'name'``."""
        return _label(node)

    def op(self, node: onnx.NodeProto) -> Op:
        """Classify a node."""
        kind, label, op_type = OpKind.OTHER, _label(node), node.op_type
        inputs, axis = [i for i in node.input if i], None
        if node.domain not in ("", "ai.onnx"):
            pass
        elif op_type == "BatchNormalization":
            kind, inputs = OpKind.BATCH_NORM, inputs[:1]
        elif op_type in _LINEAR:
            kind, inputs = OpKind.LAYER, inputs[:1]
        elif op_type in ("Add", "Sum") and all(self.index.constant(i) is None for i in inputs):
            kind = OpKind.SUM
        elif op_type == "Sub" and len(inputs) == 2 and all(self.index.constant(i) is None for i in inputs):
            kind = OpKind.DIFFERENCE
        elif (passed := self._plus_zero(node)) is not None:
            kind, inputs = OpKind.SUM, [passed]  # ``0 + x`` (MobileOne starts its sum from 0): passes x on
        elif op_type == "Add" and len(inputs) == 2:
            producers = [self.index.producer.get(i) for i in inputs]
            if any(p is not None and p.op_type == "MatMul" for p in producers):
                kind = OpKind.LAYER
        elif op_type == "Concat":
            kind, axis = OpKind.CONCAT, int(_attr(node, "axis", 0))
        elif self.flattens_channels(node, node.input[0] if node.input else ""):
            kind, inputs = OpKind.FLATTEN, inputs[:1]
        elif op_type in ("Reshape", "Flatten") and inputs:
            kind, inputs = OpKind.RESHAPE, inputs[:1]
        elif self._max_pool(node):
            kind, inputs = OpKind.MAX_POOL, inputs[:1]
        elif self._average_pool(node):
            kind, inputs = OpKind.AVG_POOL, inputs[:1]
        return Op(node, kind, inputs, node.output[0] if node.output else "", label, axis=axis)

    def _max_pool(self, node: onnx.NodeProto) -> bool:
        if node.op_type == "GlobalMaxPool":
            return True
        return node.op_type == "MaxPool" and not any(o and self.index.readers(o) for o in node.output[1:])

    def _average_pool(self, node: onnx.NodeProto) -> bool:
        """An average over real values only: no padded zeros counted."""
        if node.op_type == "GlobalAveragePool":
            return True
        if node.op_type == "ReduceMean":
            rank = self.index.ranks.get(node.input[0])
            axes = _attr(node, "axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                value = self.index.constant(node.input[1])
                axes = None if value is None else [int(a) for a in np.ravel(value)]
            return rank is not None and bool(axes) and all(a % rank >= 2 for a in axes)
        if node.op_type != "AveragePool":
            return False
        if not _attr(node, "count_include_pad", 0):
            return True
        auto_pad = _attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        return auto_pad in ("NOTSET", "VALID") and not any(_attr(node, "pads", []) or [])

    def scale_output(self, layer: Layer, affine: Affine, *, final_output: str | None = None) -> Staged:
        """Rounded results; a large Conv no later BN can reach is folded a block at a time.

        The rule has proven the channel axis (``check_channel_axis``, or a row-keeping reshape).
        """
        state: _Layer = layer.state
        exact_needed = True if final_output is None else self.may_fold_again(state, final_output)
        notes: list[str] = []
        weight, bias = self.fold_into(state, affine, notes, exact_needed=exact_needed)
        return Staged(layer, weight, bias, notes, extra=("output", exact_needed))

    def scale_input(self, layer: Layer, affine: Affine) -> Staged:
        """Rounded results of folding into the layer's input channels (Gemm alpha and beta kept)."""
        state: _Layer = layer.state
        node = state.node
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            raise FoldRefused(f"{_label(node)} transposes its input (transA=1), so it reads BN channels as rows")
        w = state.weight64 if state.weight64 is not None else state.weight
        if node.op_type in ("Gemm", "MatMul"):
            weight, contribution = scale_input_channels(w, None, affine, state.layout)
            alpha = float(_attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
            beta = float(_attr(node, "beta", 1.0))
            base = state.bias64 * beta if state.bias is not None else np.zeros((), dtype=np.float64)
            bias = base + alpha * contribution
        else:
            b = state.bias64 if state.bias is not None else None
            weight, bias = scale_input_channels(w, b, affine, state.layout, state.groups, padded=layer.zero_padded)
        return Staged(layer, self.round(weight, state), self.round(bias, state), [], extra=("input", None))

    def commit(self, staged: Sequence[Staged]) -> None:
        """Write each folded weight and bias as new initializers."""
        for item in staged:
            state: _Layer = item.layer.state
            side, keep_exact = item.extra
            self.write_weight(state, item.weight, item.notes, keep_exact=keep_exact)
            if side == "output" or state.bias is not None or item.bias.any():
                self.write_bias(state, item.bias)

    def remove_bn(self, site: BNSite, node: onnx.NodeProto) -> None:
        """Drop BN: its producer writes BN's output name, or its readers read BN's input.

        Renaming keeps a graph output's name; Shape/Size/CastLike readers of the input's metadata follow the
        rename (BN keeps the shape and dtype).
        """
        x, y = node.input[0], node.output[0]
        producer = self.index.producer.get(x)
        self.remove(node)
        left = self.index.readers(x)
        if producer is not None and all(r is not None and not _data_reads(r, x) for r in left):
            self.index.set_output(producer, list(producer.output).index(x), y)
            for reader in left:
                self._replace_input(reader, x, y)
            return
        for reader in self.index.readers(y):
            if reader is None:
                raise RuntimeError(f"BN output '{y}' is a graph output that no node writes after the fold")
            self._replace_input(reader, y, x)

    def _replace_input(self, node: onnx.NodeProto, old: str, new: str) -> None:
        for position, name in enumerate(list(node.input)):
            if name == old:
                self.index.set_input(node, position, new)

    def settle(self) -> None:
        """Drop results of refused attempts."""
        self._rounded.clear()

    # -- merging parallel branches ------------------------------------------------------------

    def nodes(self) -> list[onnx.NodeProto]:
        """The live nodes, in order."""
        return list(self.index.nodes())

    def weights(self, layer: Layer) -> tuple[np.ndarray, np.ndarray | None]:
        """The exact current weight and bias (float64 where an earlier fold wrote them)."""
        state: _Layer = layer.state
        weight = state.weight64 if state.weight64 is not None else state.weight
        return weight, state.bias64 if state.bias is not None else None

    def merge(self, plan: MergePlan) -> None:
        """The kept Conv gets the merged weights and writes the sum's output; the other branches go."""
        state: _Layer = plan.keep.state
        self.check_weight_dtype_matches(state)
        weight, bias = self.round(plan.weight, state), self.round(plan.bias, state)  # may refuse: nothing changed yet
        for node in plan.removed:
            self.remove(node)
        self.index.set_output(state.node, 0, plan.total.output)
        self.write_weight(state, weight, [])
        self.write_bias(state, bias)

    def _plus_zero(self, node: onnx.NodeProto) -> str | None:
        """``x`` when ``node`` is ``Add(x, 0)`` or ``Add(0, x)`` with a one-element zero that broadcasts to nothing."""
        if node.op_type != "Add" or len(node.input) != 2 or not all(node.input):
            return None
        for mine, other in (node.input, node.input[::-1]):
            zero = self.index.constant(other)
            rank = self.index.ranks.get(mine)
            if self.index.constant(mine) is not None or zero is None or zero.size != 1 or np.any(zero):
                continue
            if zero.ndim <= (rank if rank is not None else 1):
                return mine
        return None

    def flattens_channels(self, node: onnx.NodeProto | None, value: str) -> bool:
        """Whether ``node`` turns ``value`` (N, C, ...) into (N, C * ...): Flatten(axis=1), or a Reshape to that."""
        if node is None or node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "Flatten":
            return _attr(node, "axis", 1) == 1
        if node.op_type != "Reshape" or len(node.input) != 2 or node.input[0] != value:
            return False
        target = self.index.constant(node.input[1])
        if target is None:
            return self._batch_size_then_rest(node.input[1], value)
        shape = self.index.shapes.get(value)
        if shape is None or target.ndim != 1 or len(target) != 2 or len(shape) < 2:
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

    def _batch_size_then_rest(self, shape: str, data: str) -> bool:
        """Whether ``shape`` is ``[N, -1]`` computed from ``data``'s own batch size (``x.view(x.size(0), -1)``).

        The exporters write it as ``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])``: a dynamic
        batch size, so the shape is not a constant, yet it always flattens channels.
        """
        concat = self._standard(shape, "Concat")
        if concat is None or _attr(concat, "axis", 0) != 0 or len(concat.input) != 2:
            return False
        rest = self.index.constant(concat.input[1])
        if rest is None or [int(v) for v in np.ravel(rest)] != [-1]:
            return False
        batch = concat.input[0]
        unsqueeze = self._standard(batch, "Unsqueeze")
        if unsqueeze is not None:
            axes = _attr(unsqueeze, "axes")
            if axes is None and len(unsqueeze.input) > 1:
                value = self.index.constant(unsqueeze.input[1])
                axes = None if value is None else [int(a) for a in np.ravel(value)]
            if axes != [0]:
                return False
            batch = unsqueeze.input[0]
        gather = self._standard(batch, "Gather")
        if gather is None or _attr(gather, "axis", 0) != 0:
            return False
        index = self.index.constant(gather.input[1])
        size = self._standard(gather.input[0], "Shape")
        if index is None or index.size != 1 or int(np.ravel(index)[0]) != 0 or size is None:
            return False
        if _attr(size, "start", 0) != 0 or self.index.ranks.get(data, 2) < 2:
            return False
        source, before = size.input[0], self.index.producer.get(data)
        same_shape = before is not None and before.op_type in ("BatchNormalization", "Identity")
        return source == data or (same_shape and before.input[0] == source)

    def _standard(self, value: str, op_type: str) -> onnx.NodeProto | None:
        """The standard ``op_type`` node writing ``value``, if that is what writes it."""
        node = self.index.producer.get(value)
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            return None
        return node

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
                layer = self._onnx_layer(producer, allow_add=False)
                if self.readers(value) != [node]:
                    raise FoldRefused("the layer's output is read elsewhere too")
                self.check_matmul_axis(layer)
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
            self.decomposed.append(
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

    def fold_decomposed_all(self) -> bool:
        """One round over every Mul/Add/Sub/Div: whether any folded."""
        changed = False
        for node in list(self.index.nodes()):
            if node.op_type in _DECOMPOSED and self.fold_decomposed(node):
                changed = True
            self._rounded.clear()
        return changed
