"""Values computed from constants only (e.g. a FrozenBatchNorm2d export's scale = w * rsqrt(var + eps))."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from bnfold.onnx_fold.graph import GraphIndex

__all__ = ["PURE_OPS", "fold_constants"]

_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power}
_UNARY = {"Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative, "Identity": lambda x: x}
# Side-effect-free ops: once nothing reads their outputs they can be dropped.
PURE_OPS = frozenset({"Constant", "Cast", "Reshape", "Unsqueeze", "Squeeze", *_BINARY, *_UNARY})


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


def fold_constants(index: GraphIndex) -> None:
    """Record the value of every pure node whose inputs are all constants (the graph is not changed)."""
    for node in index.graph.node:
        if node.op_type not in PURE_OPS or node.domain not in ("", "ai.onnx") or node.op_type == "Constant":
            continue
        if len(node.output) != 1 or not node.input or not all(i and i in index.constants for i in node.input):
            continue
        try:
            value = _evaluate(node, [index.constants[i] for i in node.input])
        except (ValueError, TypeError):
            value = None
        if value is not None:
            index.constants[node.output[0]] = value
            index.computed.add(node.output[0])
