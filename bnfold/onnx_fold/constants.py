"""Values computed from constants only (e.g. a FrozenBatchNorm2d export's scale = w * rsqrt(var + eps))."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import helper

from bnfold.onnx_fold.graph import GraphIndex

__all__ = ["PURE_OPS", "fold_constants"]

_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power}
_UNARY = {"Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative, "Identity": lambda x: x}
# Side-effect-free ops: once nothing reads their outputs they can be dropped.
PURE_OPS = frozenset(
    {
        "Constant",
        "Cast",
        "CastLike",
        "Shape",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Expand",
        "ConstantOfShape",
        "Concat",
        *_BINARY,
        *_UNARY,
    }
)


def _attr(node: onnx.NodeProto, name: str) -> object:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _evaluate(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray | None:
    op = node.op_type
    if op in _BINARY and len(args) == 2:
        with np.errstate(all="ignore"):
            result = _BINARY[op](args[0], args[1])
        return np.asarray(result, dtype=np.result_type(args[0], args[1]))
    if op in _UNARY and len(args) == 1:
        with np.errstate(all="ignore"):
            return np.asarray(_UNARY[op](args[0]), dtype=args[0].dtype)
    if op == "Cast" and len(args) == 1:
        return args[0].astype(helper.tensor_dtype_to_np_dtype(int(_attr(node, "to"))))
    if op == "Expand" and len(args) == 2:
        shape = tuple(int(d) for d in args[1].tolist())
        return np.array(np.broadcast_to(args[0], np.broadcast_shapes(args[0].shape, shape)))
    if op == "ConstantOfShape" and len(args) == 1:
        value = _attr(node, "value")
        fill = onnx.numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
        return np.full(tuple(int(d) for d in args[0].tolist()), fill.reshape(-1)[0], dtype=fill.dtype)
    if op == "Shape" and len(args) == 1:
        dims = args[0].shape
        start, end = _attr(node, "start"), _attr(node, "end")
        return np.array(dims[slice(start, end)], dtype=np.int64)
    if op == "Concat" and args:
        return np.concatenate(args, axis=int(_attr(node, "axis")))
    if op == "Reshape" and len(args) == 2 and not _attr(node, "allowzero"):
        shape = [int(d) if d != 0 else args[0].shape[i] for i, d in enumerate(args[1].tolist())]
        return args[0].reshape(shape)
    if op in ("Unsqueeze", "Squeeze"):
        axes = _attr(node, "axes")
        if axes is None and len(args) == 2:
            axes = args[1].tolist()
        if op == "Squeeze":
            return np.squeeze(args[0], axis=tuple(axes)) if axes is not None else np.squeeze(args[0])
        if axes is None:
            return None
        result = args[0]
        rank = result.ndim + len(axes)
        for axis in sorted(a % rank for a in axes):
            result = np.expand_dims(result, axis)
        return result
    return None


def _cast_like(node: onnx.NodeProto, index: GraphIndex) -> np.ndarray | None:
    """CastLike needs only its target's dtype, which a graph input's type gives."""
    source, target = node.input[0], node.input[1]
    if source not in index.constants:
        return None
    if target in index.constants:
        return index.constants[source].astype(index.constants[target].dtype)
    if target in index.dtypes:
        return index.constants[source].astype(helper.tensor_dtype_to_np_dtype(index.dtypes[target]))
    return None


def fold_constants(index: GraphIndex) -> None:
    """Record the value of every pure node whose inputs are all constants (the graph is not changed)."""
    for node in index.graph.node:
        if node.op_type not in PURE_OPS or node.domain not in ("", "ai.onnx") or node.op_type == "Constant":
            continue
        if len(node.output) != 1 or not node.input:
            continue
        if node.op_type == "CastLike" and len(node.input) == 2:
            value = _cast_like(node, index)
            if value is not None:
                index.constants[node.output[0]] = value
                index.computed.add(node.output[0])
            continue
        if not all(i and i in index.constants for i in node.input):
            continue
        try:
            value = _evaluate(node, [index.constants[i] for i in node.input])
        except (ValueError, TypeError):
            value = None
        if value is not None:
            index.constants[node.output[0]] = value
            index.computed.add(node.output[0])
