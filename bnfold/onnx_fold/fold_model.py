"""``fold_onnx``: the ONNX fold pass over a whole model (subgraphs included), with checks before and after.

Shape inference gives ranks (for MatMul channel axes); each graph is indexed and
folded by the rules of :mod:`bnfold.rules` over :class:`~bnfold.onnx_fold.onnx_view.OnnxView`; dead initializers and
constant computations are dropped; the result must pass ``onnx.checker``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import onnx
from onnx import helper

from bnfold.errors import BnfoldError
from bnfold.onnx_fold.constants import PURE_OPS
from bnfold.onnx_fold.files import Scratch, load_onnx, uses_external_data, without_field
from bnfold.onnx_fold.graph import GraphIndex, names_read, subgraphs
from bnfold.onnx_fold.onnx_view import OnnxView
from bnfold.onnx_fold.tensors import check_model_tensors
from bnfold.report import FoldReport, LayerEntry, MergeEntry
from bnfold.rules import RULES, fold_graph

__all__ = ["fold_onnx"]

logger = logging.getLogger(__name__)


def _value_types(
    graph: onnx.GraphProto,
    ranks: dict[str, int],
    dtypes: dict[str, int],
    shapes: dict[str, tuple[int | None, ...]],
) -> None:
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        tensor = info.type.tensor_type
        if info.type.HasField("tensor_type"):
            dtypes[info.name] = tensor.elem_type
            if tensor.HasField("shape"):
                ranks[info.name] = len(tensor.shape.dim)
                shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    for node in graph.node:
        for sub in subgraphs(node):
            _value_types(sub, ranks, dtypes, shapes)


@dataclasses.dataclass
class _Context:
    """What every graph of one model shares while it is folded."""

    ranks: dict[str, int]
    dtypes: dict[str, int]
    shapes: dict[str, tuple[int | None, ...]]
    opset: int
    allow_initializer_inputs: bool
    merge_branches: bool
    names: set[str]
    scratch: Scratch | None = None
    entries: list[LayerEntry] = dataclasses.field(default_factory=list)
    merges: list[MergeEntry] = dataclasses.field(default_factory=list)


def _fold_graph(graph: onnx.GraphProto, outer: GraphIndex | None, context: _Context) -> None:
    index = GraphIndex(graph, outer, context.ranks, context.dtypes, context.allow_initializer_inputs)
    index.shapes = context.shapes
    index.scratch = context.scratch
    index.names |= context.names
    view = OnnxView(index, context.opset)
    bn_entries, merges = fold_graph(view, RULES, extra=view.fold_decomposed_all, merge=context.merge_branches)
    index.compact()
    context.entries += view.decomposed + bn_entries
    context.merges += merges
    context.names |= index.names
    for node in graph.node:
        for sub in subgraphs(node):
            _fold_graph(sub, index, context)


def _clean(graph: onnx.GraphProto, read_outside: set[str]) -> None:
    """Drop initializers, constant computations and value_info that nothing reads any more, in one pass.

    The nodes are in topological order, so one walk from the end sees every
    reader of a value before its producer: a pure node none of whose outputs
    is live is dead, and then its inputs are not read by it.
    """
    live = {o.name for o in graph.output} | read_outside
    keep: list[bool] = []
    for node in reversed(graph.node):
        dead = node.op_type in PURE_OPS and node.domain in ("", "ai.onnx") and not any(o in live for o in node.output)
        keep.append(not dead)
        if not dead:
            live.update(i for i in node.input if i)
            for sub in subgraphs(node):
                live |= names_read(sub)
    keep.reverse()
    for position in range(len(keep) - 1, -1, -1):
        if not keep[position]:
            del graph.node[position]
    inputs = {i.name for i in graph.input}
    dead_inits = [i for i, t in enumerate(graph.initializer) if t.name not in live and t.name not in inputs]
    for i in reversed(dead_inits):
        del graph.initializer[i]
    produced = {o for n in graph.node for o in n.output} | inputs | {t.name for t in graph.initializer}
    stale = [i for i, v in enumerate(graph.value_info) if v.name not in produced]
    for i in reversed(stale):
        del graph.value_info[i]
    for node in graph.node:
        for sub in subgraphs(node):
            _clean(sub, live)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {n.name for n in graph.node} | {t.name for t in graph.initializer}
    names |= {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for sub in subgraphs(node):
            names |= _all_names(sub)
    return names


def fold_onnx(
    model: onnx.ModelProto | str | Path,
    *,
    allow_initializer_inputs: bool = False,
    copy: bool = True,
    merge_branches: bool = True,
    scratch: Scratch | None = None,
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every foldable BatchNormalization of an ONNX model.

    Args:
        model: A ModelProto (not modified) or the path of an ONNX file
            (external data is loaded from beside it).
        allow_initializer_inputs: Treat initializers that are also graph inputs
            (common in IR < 4 exports) as constants and remove them from the
            graph inputs. By default they are left alone, since a caller may
            override them at run time, and BNs that need them are kept.
        copy: Fold a copy of a given ModelProto (the default); False folds it in
            place, which saves a copy of a large model.
        merge_branches: Also merge parallel convolution / BN / identity branches that are
            summed into one convolution (structural reparameterization, e.g. RepVGG blocks).
        scratch: Write folded weights of 1 MB and up to this temporary file instead of memory
            (they become external data there, removed when the process ends): for a fold that
            is saved with :func:`save_onnx` in the same process, as ``bnfold fold`` does.

    Returns:
        ``(folded, report)``; ``folded`` passes ``onnx.checker`` (full check).

    Raises:
        BnfoldError: The model cannot be read or fails the checker before folding.
    """
    if isinstance(model, str | Path):
        proto = load_onnx(model)  # checks every tensor
    else:
        proto = _copy(model) if copy else _checked_type(model)
        check_model_tensors(proto)
    try:
        skeleton = _skeleton(proto)
        onnx.checker.check_model(skeleton, full_check=True)
    except Exception as error:  # noqa: BLE001 - the checker raises ValidationError, InferenceError, decode errors
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or ["invalid model"]
        raise BnfoldError(f"the ONNX model fails onnx.checker: {' '.join(lines[:3])[:240]}") from None
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    ranks: dict[str, int] = {}
    shapes: dict[str, tuple[int | None, ...]] = {}
    dtypes: dict[str, int] = {}
    notes: list[str] = []
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
        _value_types(inferred.graph, ranks, dtypes, shapes)
    except Exception as error:  # noqa: BLE001 - inference is a help, not a requirement
        notes.append(f"shape inference failed ({type(error).__name__}): MatMul folds that need ranks are refused")
    context = _Context(
        ranks, dtypes, shapes, opset, allow_initializer_inputs, merge_branches, _all_names(proto.graph), scratch=scratch
    )
    _fold_graph(proto.graph, None, context)
    if allow_initializer_inputs:
        initializers = {t.name for t in proto.graph.initializer}
        kept = [i for i in proto.graph.input if i.name not in initializers]
        if len(kept) != len(proto.graph.input):
            notes.append(f"{len(proto.graph.input) - len(kept)} initializer(s) removed from the graph inputs")
            del proto.graph.input[:]
            proto.graph.input.extend(kept)
            proto.ir_version = max(proto.ir_version, 4)
    _clean(proto.graph, set())
    if _approximate_bytes(proto) < 2**26 and not uses_external_data(proto):
        onnx.checker.check_model(proto, full_check=True)
    else:  # the checker would serialise every weight: check the structure (tensors are checked by bnfold itself)
        onnx.checker.check_model(_skeleton(proto), full_check=True)
    report = FoldReport("onnx", context.entries, notes, context.merges)
    logger.info("folded %d of %d BatchNorm(s)", report.bn_folded, report.bn_total)
    return proto, report


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with large initializers turned into typed inputs: checks and shape inference skip their bytes."""
    graph = model.graph
    big = [t for t in graph.initializer if _elements(t) > 1024 or t.data_location == onnx.TensorProto.EXTERNAL]
    names = {t.name for t in big}
    skeleton = without_field(model, "graph")
    skeleton.graph.CopyFrom(without_field(graph, "initializer"))
    skeleton.graph.initializer.extend(t for t in graph.initializer if t.name not in names)
    inputs = {i.name for i in graph.input}
    for t in big:
        if t.name not in inputs:
            skeleton.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return skeleton


def _elements(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims)


def _approximate_bytes(model: onnx.ModelProto) -> int:
    return sum(8 * _elements(t) for t in model.graph.initializer)


def _checked_type(model: onnx.ModelProto) -> onnx.ModelProto:
    if not isinstance(model, onnx.ModelProto):
        raise BnfoldError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(_checked_type(model))
    return duplicate
