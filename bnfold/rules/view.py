"""What a fold rule may ask of a graph: the graph-view protocol every graph kind implements.

A rule sees values (opaque handles: a tensor name in ONNX, an fx node in a
torch.export program, a value id in a torch module's data flow) and nodes. It
asks a view who produces a value, who reads it, its rank, what kind of op a node
is (:class:`Op`), and whether a node is a foldable linear layer (:class:`Layer`).
It stages folded weights through the view (which keeps float64 values, rounds
once and knows how its graph stores weights) and, when every check passed,
commits them and removes the BN.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Hashable, Sequence
from typing import Any, Protocol

from bnfold.affine import Affine, FoldRefused, Layout
from bnfold.report import LayerEntry

__all__ = ["ANY_RANK", "BNSite", "ConvGeometry", "GraphView", "Layer", "Op", "OpKind", "Staged"]

ANY_RANK = frozenset(range(1, 9))

Value = Hashable
Node = Any


class OpKind(enum.Enum):
    """What a node does, as far as the rules care."""

    LAYER = "layer"  # a Conv / ConvTranspose / Linear / Gemm / MatMul that may be foldable
    BATCH_NORM = "batch_norm"
    CONCAT = "concat"  # joins its inputs along ``Op.axis``
    SUM = "sum"  # adds its inputs (no constants, no scaling)
    DIFFERENCE = "difference"  # its first input minus its second (no constants, no scaling)
    FLATTEN = "flatten"  # (N, C, ...) -> (N, C * ...): each channel stays one contiguous run
    MAX_POOL = "max_pool"  # commutes with a per-channel map whose scales are positive
    AVG_POOL = "avg_pool"  # averages real values only (no zero padding counted): commutes with any per-channel map
    RESHAPE = "reshape"  # any other row-major reshape / view / flatten of one tensor (its shapes: ``last_dim``)
    OTHER = "other"


@dataclasses.dataclass
class Op:
    """One node classified for the rules.

    Attributes:
        node: The view's node handle.
        kind: What it does.
        inputs: The data values it reads (the joined / summed tensors, or the one input).
        output: The value it writes.
        label: How a reason names it, e.g. ``Concat 'cat_1'``.
        axis: The joined axis of a concat, as the graph states it (may be negative).
    """

    node: Node
    kind: OpKind
    inputs: Sequence[Value]
    output: Value
    label: str
    axis: int | None = None


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Where a convolution's kernel reads its input, per spatial dim (for merging parallel branches)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    zero_padding: bool = True  # False: reflect / replicate / circular padding


@dataclasses.dataclass(eq=False)
class Layer:
    """A linear node whose constant weight can absorb a per-channel affine map.

    Attributes:
        node: The view's node handle.
        name: The report's name for it (a target).
        label: How a reason names it.
        layout: How its weight stores channels.
        groups: Convolution groups (1 for Linear / Gemm / MatMul).
        spatial: Spatial dims of a convolution; 0 for Linear / Gemm / MatMul (channels on the last axis).
        ranks: Ranks its input and output may have (one when the graph knows it).
        zero_padded: Whether it pads its input with zeros (a following fold then needs a zero shift).
        data_input: The value it reads as data.
        output: The value it writes (for MatMul + bias Add: the Add's).
        out_channels: Channels it writes.
        in_channels: Channels (features) it reads.
        state: Whatever the view needs to read and write its weights.
        geometry: Kernel, stride, dilation and padding of a convolution, where the view knows them.
        reads_input_directly: False for a layer whose own forward does something to its input before
            the product (a subclass only proven on its output side): no BN folds into it from before.
    """

    node: Node
    name: str
    label: str
    layout: Layout
    groups: int
    spatial: int
    ranks: frozenset[int]
    zero_padded: bool
    data_input: Value
    output: Value
    out_channels: int
    in_channels: int
    state: Any = None
    geometry: ConvGeometry | None = None
    reads_input_directly: bool = True

    def channel_axis(self, rank: int) -> int:
        """The axis holding this layer's channels in a tensor of ``rank``."""
        if self.spatial == 0:
            return rank - 1
        return 1 if rank == self.spatial + 2 else 0


@dataclasses.dataclass(eq=False)
class BNSite:
    """One BatchNorm of the report: a node, or every call of one module applied several times.

    Attributes:
        nodes: The BN's node(s); all fold or none does.
        entry: Its report row.
        affine: Its inference map, or the reason it has none.
        ranks: Input ranks it accepts (it normalises axis 1).
        tail: What it applies after the BN map (an activation), which keeps it off the following layer.
        state: Whatever the view needs to remove it.
    """

    nodes: list[Node]
    entry: LayerEntry
    affine: Affine | FoldRefused
    ranks: frozenset[int] = ANY_RANK
    tail: str | None = None
    state: Any = None


@dataclasses.dataclass(eq=False)
class Staged:
    """A layer's folded weights, computed and checked (rounding included) but not yet written."""

    layer: Layer
    weight: Any
    bias: Any
    notes: list[str] = dataclasses.field(default_factory=list)
    extra: Any = None  # whatever the view needs to write it


class GraphView(Protocol):
    """The graph-side half of every rule: one implementation per graph kind."""

    kind: str  # "torch modules", "torch.export", "onnx"
    shape_hint: str  # what a user can do when a rank is unknown, e.g. "pass example_inputs (CLI: --input-shape)"

    def sites(self) -> list[BNSite]:
        """Every BN, once, in graph order."""

    def bn_input(self, node: Node) -> Value:
        """The value a BN node normalises."""

    def bn_output(self, node: Node) -> Value:
        """The value a BN node writes."""

    def producer(self, value: Value) -> Node | None:
        """The node writing ``value`` (None: a graph input or a constant)."""

    def readers(self, value: Value) -> list[Node | None]:
        """The nodes reading ``value``, once per read; ``None`` stands for a graph output."""

    def rank(self, value: Value) -> int | None:
        """The rank of ``value``, where known."""

    def last_dim(self, value: Value) -> int | None:
        """The size of ``value``'s last axis, where known as a number."""

    def op(self, node: Node) -> Op:
        """What ``node`` does."""

    def label(self, node: Node | None) -> str:
        """How a reason names ``node`` (None: a graph input / output)."""

    def layer(self, node: Node | None) -> Layer:
        """``node`` as a foldable layer; raises FoldRefused with the reason it is not one."""

    def scale_output(self, layer: Layer, affine: Affine, *, final_output: Value | None = None) -> Staged:
        """``affine`` applied to the channels ``layer`` writes, rounded and checked, not written.

        ``final_output``: the value the layer's output becomes once the BN is gone, when known.
        """

    def scale_input(self, layer: Layer, affine: Affine) -> Staged:
        """``affine`` applied to the channels ``layer`` reads (before it), rounded and checked, not written."""

    def commit(self, staged: Sequence[Staged]) -> None:
        """Make staged weights the layers' current weights."""

    def remove_bn(self, site: BNSite, node: Node) -> None:
        """Take a BN node out: its readers read its input."""

    def settle(self) -> None:
        """Called after every attempt: drop scratch results, write what no later fold can change."""


class MergingView(GraphView, Protocol):
    """A graph view that can also merge parallel branches (:mod:`bnfold.rules.merge_branches`)."""

    def nodes(self) -> list[Node]:
        """Every node, in graph order."""

    def bn_affine(self, node: Node) -> Affine:
        """A BN node's inference map; raises FoldRefused when it has none."""

    def weights(self, layer: Layer) -> tuple[Any, Any]:
        """A layer's current weight and bias (float64 where a fold left exact values; bias may be None)."""

    def merge(self, plan: Any) -> None:  # noqa: ANN401 - a MergePlan
        """Give ``plan.keep`` the merged weights, let it write the sum's output, and drop the other branches."""
