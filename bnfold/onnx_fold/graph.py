"""An index over one ONNX graph: producers, consumers, constants, ranks and free names."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import numpy as np
import onnx
import torch
from onnx import numpy_helper

__all__ = ["GraphIndex", "TORCH_DTYPES", "from_torch", "subgraphs", "to_torch64"]

TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.DOUBLE: torch.float64,
}


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in ``node``'s attributes (If branches, Loop and Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every value name read inside ``graph`` and its subgraphs (outer-scope reads included)."""
    names: set[str] = set()
    for node in graph.node:
        names.update(i for i in node.input if i)
        for sub in subgraphs(node):
            names |= _names_read(sub)
    names.update(o.name for o in graph.output)
    return names


def to_torch64(array: np.ndarray) -> torch.Tensor:
    """A numpy constant (any float dtype, bfloat16 included) as a float64 torch tensor."""
    return torch.from_numpy(np.asarray(array).astype(np.float64))


def from_torch(tensor: torch.Tensor, name: str) -> onnx.TensorProto:
    """A rounded torch tensor as an initializer of the same dtype."""
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        array = tensor.float().numpy().astype(ml_dtypes.bfloat16)
    else:
        array = tensor.numpy()
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


class GraphIndex:
    """Producers, consumers and constants of one graph, rebuilt after each rewrite.

    Attributes:
        graph: The graph indexed.
        constants: Value name -> array, for initializers and Constant outputs
            (and values computed from constants only, see ``computed``).
        computed: Names whose value was computed from constants by the pass.
        overridable: Initializers that are also graph inputs.
        ranks: Value name -> rank, where shape inference knew it.
        shapes: Value name -> dims (None where not static), where shape inference knew them.
        dtypes: Value name -> ONNX element type, where known.
    """

    def __init__(
        self,
        graph: onnx.GraphProto,
        outer_constants: dict[str, np.ndarray],
        ranks: dict[str, int],
        dtypes: dict[str, int],
        allow_initializer_inputs: bool,
    ) -> None:
        self.graph = graph
        self.ranks = ranks
        self.shapes: dict[str, tuple[int | None, ...]] = {}
        self.dtypes = dtypes
        inputs = {i.name for i in graph.input}
        self.overridable = {t.name for t in graph.initializer if t.name in inputs}
        self.constants: dict[str, np.ndarray] = dict(outer_constants)
        for init in graph.initializer:
            if init.name not in inputs or allow_initializer_inputs:
                self.constants[init.name] = numpy_helper.to_array(init)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_value(node)
                if value is not None:
                    self.constants[node.output[0]] = value
        self.computed: set[str] = set()
        self.refresh()

    def refresh(self) -> None:
        """Re-read producers and consumers after the graph changed."""
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            read = [i for i in node.input if i]
            for sub in subgraphs(node):
                read += sorted(_names_read(sub))  # outer values a branch or body reads are uses too
            for name in read:
                self.consumers[name].append(node)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.names = self.all_names()

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

    def constant(self, value: str) -> np.ndarray | None:
        """The constant array behind ``value``, or None."""
        return self.constants.get(value)

    def initializer_users(self, name: str) -> int:
        """How many node inputs in the graph read initializer ``name``."""
        return sum(1 for node in self.graph.node for i in node.input if i == name)


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None
