"""Values computed from constants only (e.g. a FrozenBatchNorm2d export's scale = w * rsqrt(var + eps)).

:meth:`bnfold.onnx_fold.graph.GraphIndex.constant` calls :func:`evaluate` for a
node only when a fold asks for its value, after its inputs are known. Before any
array is made the result's size is computed from the inputs' shapes and checked
against :data:`bnfold.limits.LIMITS`, so a few bytes of ``ConstantOfShape`` or
``Expand`` cannot ask for gigabytes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from bnfold.errors import BnfoldError
from bnfold.limits import LIMITS
from bnfold.onnx_fold.tensors import decode

if TYPE_CHECKING:
    from bnfold.onnx_fold.graph import GraphIndex

__all__ = ["PURE_OPS", "evaluate", "needed_inputs"]

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
        "Transpose",
        *_BINARY,
        *_UNARY,
    }
)


class _TooLarge(Exception):
    pass


def _attr(node: onnx.NodeProto, name: str) -> object:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _dims(array: np.ndarray) -> tuple[int, ...]:
    """A shape operand as dims, refusing negative or absurd values before anything is allocated."""
    dims = tuple(int(d) for d in np.asarray(array).reshape(-1).tolist())
    if len(dims) > 16 or any(d < 0 for d in dims):
        raise _TooLarge(f"shape {list(dims)[:8]} is not a valid shape")
    return dims


def _size(shape: tuple[int, ...]) -> int:
    size = math.prod(shape)
    if size > LIMITS.max_constant_elements:
        raise _TooLarge(
            f"{size} values, over the limit of {LIMITS.max_constant_elements} (BNFOLD_MAX_CONSTANT_ELEMENTS)"
        )
    return size


def _evaluate(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray | None:
    op = node.op_type
    if op in _BINARY and len(args) == 2:
        _size(np.broadcast_shapes(args[0].shape, args[1].shape))
        with np.errstate(all="ignore"):
            result = _BINARY[op](args[0], args[1])
        return np.asarray(result, dtype=np.result_type(args[0], args[1]))
    if op in _UNARY and len(args) == 1:
        with np.errstate(all="ignore"):
            return np.asarray(_UNARY[op](args[0]), dtype=args[0].dtype)
    if op == "Transpose" and len(args) == 1:  # torch's Linear on a 3-D input: MatMul(x, Transpose(W))
        perm = _attr(node, "perm")
        if perm is not None and sorted(perm) != list(range(args[0].ndim)):
            return None
        return np.ascontiguousarray(np.transpose(args[0], perm))
    if op == "Cast" and len(args) == 1:
        return args[0].astype(helper.tensor_dtype_to_np_dtype(int(_attr(node, "to"))))
    if op == "Expand" and len(args) == 2:
        shape = np.broadcast_shapes(args[0].shape, _dims(args[1]))
        _size(shape)
        return np.array(np.broadcast_to(args[0], shape))
    if op == "ConstantOfShape" and len(args) == 1:
        shape = _dims(args[0])
        _size(shape)
        value = _attr(node, "value")
        fill = decode(value, "ConstantOfShape value") if value is not None else np.zeros(1, np.float32)
        if fill.size != 1:
            return None
        return np.full(shape, fill.reshape(-1)[0], dtype=fill.dtype)
    if op == "Shape" and len(args) == 1:
        dims = args[0].shape
        start, end = _attr(node, "start"), _attr(node, "end")
        return np.array(dims[slice(start, end)], dtype=np.int64)
    if op == "Concat" and args:
        _size((sum(a.size for a in args),))
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


def _constant_node(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return decode(attr.t, f"Constant '{node.name[:60]}'")
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def _standard_pure(node: onnx.NodeProto) -> bool:
    return node.op_type in PURE_OPS and node.domain in ("", "ai.onnx") and len(node.output) == 1


def needed_inputs(node: onnx.NodeProto) -> list[str]:
    """The values :func:`evaluate` needs before it can compute ``node`` (none for ops it does not compute)."""
    if not _standard_pure(node) or node.op_type == "Constant":
        return []
    if node.op_type == "CastLike":
        return [node.input[0]] if node.input and node.input[0] else []
    return [i for i in node.input if i]


def evaluate(node: onnx.NodeProto, index: GraphIndex) -> tuple[np.ndarray | None, str]:
    """Compute ``node``'s single output from constants, or say why not.

    Returns:
        ``(value, "")``, or ``(None, reason)`` where the reason is empty for
        "not computed from constants" and names the budget when it was refused.
    """
    if not _standard_pure(node):
        return None, ""
    if node.op_type == "Constant":
        return _constant_node(node), ""
    if node.op_type == "CastLike":
        return _cast_like(node, index), ""
    if not node.input or not all(i and index.constant(i) is not None for i in node.input):
        return None, next((index.unavailable[i] for i in node.input if index.unavailable.get(i)), "")
    args = [index.constant(i) for i in node.input]
    try:
        value = _evaluate(node, args)
    except _TooLarge as refused:
        return None, f"computing it from constants would make {refused}"
    except (ValueError, TypeError, IndexError, OverflowError, BnfoldError):
        return None, ""
    if value is not None and value.size > index.budget_left():
        return None, "computing it from constants would exceed this graph's budget (BNFOLD_MAX_CONSTANT_ELEMENTS)"
    return value, ""


def _cast_like(node: onnx.NodeProto, index: GraphIndex) -> np.ndarray | None:
    """CastLike needs only its target's dtype, which a graph input's type gives."""
    if len(node.input) != 2:
        return None
    source, target = index.constant(node.input[0]), node.input[1]
    if source is None:
        return None
    if target in index.dtypes:
        return source.astype(helper.tensor_dtype_to_np_dtype(index.dtypes[target]))
    target_value = index.constant(target)
    return None if target_value is None else source.astype(target_value.dtype)
