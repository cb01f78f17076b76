"""An index over one ONNX graph: producers, readers, constants (computed on demand), ranks and free names.

The index is built once per graph and updated in place by every rewrite
(:meth:`GraphIndex.set_input`, :meth:`~GraphIndex.set_output`,
:meth:`~GraphIndex.insert_after`, :meth:`~GraphIndex.remove`), so folding *n* BNs
costs O(graph) once plus O(1) per fold, not a re-index each time. Removed and
inserted nodes reach the graph's node list in one pass (:meth:`GraphIndex.compact`).

Constants are decoded only when a fold asks for them, through the checked
decoder (:mod:`bnfold.onnx_fold.tensors`); values computed from constants
(Shape/Expand/ConstantOfShape/arithmetic chains) are evaluated on demand,
iteratively, within the budgets of :data:`bnfold.limits.LIMITS`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterator

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from bnfold.limits import LIMITS
from bnfold.onnx_fold.files import Scratch
from bnfold.onnx_fold.tensors import decode, stored_at

__all__ = ["FLOAT_DTYPES", "Encoded", "GraphIndex", "names_read", "subgraphs", "to_float64"]

FLOAT_DTYPES = {
    onnx.TensorProto.FLOAT: np.dtype(np.float32),
    onnx.TensorProto.FLOAT16: np.dtype(np.float16),
    onnx.TensorProto.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    onnx.TensorProto.DOUBLE: np.dtype(np.float64),
}
CACHE_ELEMENTS = 2**16  # larger initializers are decoded (or memory-mapped) each time, never held
SCRATCH_FROM_BYTES = 2**20  # with a scratch file, new initializers of this size and up go there


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in ``node``'s attributes (If branches, Loop and Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def names_read(graph: onnx.GraphProto) -> set[str]:
    """Every value name read inside ``graph`` and its subgraphs (outer-scope reads included)."""
    names: set[str] = set()
    for node in graph.node:
        names.update(i for i in node.input if i)
        for sub in subgraphs(node):
            names |= names_read(sub)
    names.update(o.name for o in graph.output)
    return names


def to_float64(array: np.ndarray) -> np.ndarray:
    """A numpy constant (any float dtype, bfloat16 included) as float64."""
    return np.asarray(array).astype(np.float64)


@dataclasses.dataclass
class Encoded:
    """A rounded tensor already encoded as ONNX raw data (its array freed): a large layer's folded weight."""

    data: bytes
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded data."""
        return len(self.data)


class GraphIndex:
    """Producers, readers and constants of one graph, updated in place by each rewrite.

    Attributes:
        graph: The graph indexed.
        parent: The enclosing graph's index (subgraphs read outer constants).
        overridable: Initializers that are also graph inputs.
        ranks: Value name -> rank, where shape inference knew it.
        shapes: Value name -> dims (None where not static), where shape inference knew them.
        dtypes: Value name -> ONNX element type, where known.
        unavailable: Value name -> why its constant value was not computed (a budget).
        scratch: Where new large initializers go (external data) instead of memory, if anywhere.
    """

    def __init__(
        self,
        graph: onnx.GraphProto,
        parent: GraphIndex | None,
        ranks: dict[str, int],
        dtypes: dict[str, int],
        allow_initializer_inputs: bool,
    ) -> None:
        self.graph = graph
        self.parent = parent
        self.ranks = ranks
        self.shapes: dict[str, tuple[int | None, ...]] = {}
        self.dtypes = dtypes
        inputs = {i.name for i in graph.input}
        self.overridable = {t.name for t in graph.initializer if t.name in inputs}
        self._protos = {t.name: t for t in graph.initializer if t.name not in inputs or allow_initializer_inputs}
        self._values: dict[str, np.ndarray] = {}
        self._computed_elements = 0
        self.scratch: Scratch | None = None
        self.unavailable: dict[str, str] = {}
        # keyed by id(); the values hold the node objects, so an id is never reused while recorded
        self._removed: dict[int, onnx.NodeProto] = {}
        self._after: dict[int, tuple[onnx.NodeProto, list[onnx.NodeProto]]] = {}
        self.refresh()

    # -- structure -----------------------------------------------------------------------

    def refresh(self) -> None:
        """Index producers and readers of the whole graph (once; rewrites update it in place)."""
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for node in self.nodes():
            self._add(node)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.names = self.all_names()

    def _reads(self, node: onnx.NodeProto) -> list[str]:
        read = [i for i in node.input if i]
        for sub in subgraphs(node):
            read += sorted(names_read(sub))  # outer values a branch or body reads are uses too
        return read

    def _add(self, node: onnx.NodeProto) -> None:
        for out in node.output:
            if out:
                self.producer[out] = node
        for name in self._reads(node):
            self.consumers[name].append(node)

    def _drop(self, node: onnx.NodeProto) -> None:
        for out in node.output:
            if out and self.producer.get(out) is node:
                del self.producer[out]
        for name in self._reads(node):
            users = self.consumers.get(name)
            if users:
                for i, user in enumerate(users):
                    if user is node:
                        del users[i]
                        break

    def nodes(self) -> Iterator[onnx.NodeProto]:
        """The live nodes in order: removed ones skipped, inserted ones after their anchor."""
        for node in self.graph.node:
            yield from self._live(node)

    def _live(self, node: onnx.NodeProto) -> Iterator[onnx.NodeProto]:
        if id(node) not in self._removed:
            yield node
        for later in self._after.get(id(node), (None, ()))[1]:
            yield from self._live(later)

    def set_input(self, node: onnx.NodeProto, position: int, name: str) -> None:
        """``node.input[position] = name`` (padding with empty inputs), keeping the index current."""
        self._drop(node)
        while len(node.input) <= position:
            node.input.append("")
        old, node.input[position] = node.input[position], name
        self._add(node)
        if old and old != name:
            self._release(old)

    def _release(self, name: str) -> None:
        """Drop the data of a large initializer nothing reads any more (it is removed at the end of the pass).

        An in-memory model would otherwise hold every replaced weight beside its folded one until then.
        """
        proto = self._protos.get(name)
        if proto is None or self.consumers.get(name) or name in self.graph_outputs or name in self.overridable:
            return
        if proto.data_location == onnx.TensorProto.EXTERNAL or math.prod(proto.dims) <= CACHE_ELEMENTS:
            return
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            proto.ClearField(field)
        self._values.pop(name, None)
        del self._protos[name]

    def set_output(self, node: onnx.NodeProto, position: int, name: str) -> None:
        """``node.output[position] = name``, keeping the index current."""
        self._drop(node)
        node.output[position] = name
        self._add(node)

    def insert_after(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
        """Add ``node`` right after ``anchor`` (it reaches the node list at :meth:`compact`)."""
        self._after.setdefault(id(anchor), (anchor, []))[1].insert(0, node)
        self._add(node)

    def remove(self, node: onnx.NodeProto) -> None:
        """Drop ``node`` (from the node list at :meth:`compact`)."""
        self._drop(node)
        self._removed[id(node)] = node

    def compact(self) -> None:
        """Write removals and insertions into the graph's node list, in one pass from the end."""
        if not self._removed and not self._after:
            return
        order = list(self.graph.node)
        for position in range(len(order) - 1, -1, -1):
            node = order[position]
            for later in reversed(list(self._inserted_after(node))):
                self.graph.node.insert(position + 1, later)
            if id(node) in self._removed:
                del self.graph.node[position]
        self._removed.clear()
        self._after.clear()
        self.refresh()

    def _inserted_after(self, node: onnx.NodeProto) -> Iterator[onnx.NodeProto]:
        for later in self._after.get(id(node), (None, ()))[1]:
            if id(later) not in self._removed:
                yield later
            yield from self._inserted_after(later)

    def all_names(self) -> set[str]:
        """Every node and value name in use, for making fresh ones."""
        names = {n.name for n in self.graph.node} | {i.name for i in self.graph.initializer}
        names |= {v.name for v in list(self.graph.input) + list(self.graph.output) + list(self.graph.value_info)}
        for node in self.graph.node:
            names.update(node.input)
            names.update(node.output)
        return names

    def fresh(self, base: str) -> str:
        """A name not used anywhere in the graph, derived from ``base``."""
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def readers(self, value: str) -> list[onnx.NodeProto]:
        """Nodes reading ``value``; a graph output counts as a reader (``None``)."""
        readers: list = list(self.consumers.get(value, []))
        if value in self.graph_outputs:
            readers.append(None)
        return readers

    # -- constants -----------------------------------------------------------------------

    def add_initializer(self, name: str, value: np.ndarray | Encoded) -> None:
        """Append ``value`` as a new initializer (written in place, no proto copy); remembered only when small."""
        tensor = self.graph.initializer.add()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
        tensor.dims.extend(value.shape)
        if self.scratch is not None and value.nbytes >= SCRATCH_FROM_BYTES:  # to disk, not memory
            data = value.data if isinstance(value, Encoded) else np.ascontiguousarray(value).reshape(-1).view(np.uint8)
            length = value.nbytes
            location, offset = self.scratch.append(data)
            if isinstance(value, Encoded):
                value.data = b""
            stored_at(tensor, location, offset, length)
        elif isinstance(value, Encoded):
            tensor.raw_data = value.data
            value.data = b""  # the protobuf holds its own copy now
        else:
            tensor.raw_data = np.ascontiguousarray(value).tobytes()  # little-endian, as ONNX wants
        self._protos[name] = tensor
        if isinstance(value, np.ndarray) and value.size <= CACHE_ELEMENTS:
            self._values[name] = value

    def constant(self, value: str) -> np.ndarray | None:
        """The constant array behind ``value`` (an initializer, a Constant, or computed from those), or None.

        Large initializers are decoded (external data: memory-mapped) on each call and
        not held, so a pass over a multi-GB model keeps one layer's weights at a time.
        """
        if value in self._values or value in self.unavailable:
            return self._values.get(value)
        proto = self._protos.get(value)
        if proto is not None and value not in self.producer and math.prod(proto.dims) > CACHE_ELEMENTS:
            return decode(proto, "initializer")
        from bnfold.onnx_fold.constants import evaluate, needed_inputs

        # depth-first over the producers, without recursion (a chain may be thousands of nodes long)
        stack = [value]
        while stack:
            name = stack[-1]
            if name in self._values or name in self.unavailable:
                stack.pop()
                continue
            node = self.producer.get(name)
            if node is None:
                stack.pop()
                if name in self._protos:
                    self._values[name] = decode(self._protos[name], "initializer")
                    continue
                outer = self.parent.constant(name) if self.parent is not None else None
                if outer is None:
                    self.unavailable[name] = ""
                else:
                    self._values[name] = outer
                continue
            pending = [i for i in needed_inputs(node) if i not in self._values and i not in self.unavailable]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            result, why = evaluate(node, self)
            if result is None:
                self.unavailable[name] = why
                continue
            self._computed_elements += result.size
            self._values[name] = result
        return self._values.get(value)

    def budget_left(self) -> int:
        """Elements this graph may still compute from constants."""
        return 4 * LIMITS.max_constant_elements - self._computed_elements
