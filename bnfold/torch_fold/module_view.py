"""A torch model's data flow as a graph view: module calls and torch functions between them.

Values are the data flow's value ids (:mod:`.dataflow`); nodes are its calls. A BN
module called several times is one report entry with one node per call: it folds
at every call or not at all. Folded weights stay float64 until no remaining BN can
reach the layer, then are rounded once and written (:meth:`ModuleView.settle`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from bnfold.affine import (
    Affine,
    FoldRefused,
    Layout,
    bn_affine,
    input_channels,
    output_channels,
    round_to,
)
from bnfold.report import KEPT, LayerEntry
from bnfold.rules.float64_weights import Float64Staging
from bnfold.rules.merge_branches import MergePlan
from bnfold.rules.view import BNSite, ConvGeometry, Layer, Op, OpKind, Staged
from bnfold.torch_fold.dataflow import BATCH_NORM_FUNCTIONS, Call, DataFlow
from bnfold.torch_fold.recognise import ANY_RANK, PASS_THROUGH_MODULES, BNModule, bn_module, has_hooks, layer_spec

__all__ = ["ModuleView", "set_submodule"]

_CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)
_ADD_FUNCTIONS = (operator.add, torch.add)
_SUB_FUNCTIONS = (operator.sub, torch.sub)
# Positional parameters of each functional batch_norm: torch.batch_norm orders them differently.
_BATCH_NORM_ARGS = {
    BATCH_NORM_FUNCTIONS[0]: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    BATCH_NORM_FUNCTIONS[1]: ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
}
_DROPOUT_FUNCTIONS = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")
_MAX_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_STOCK_MODULES = (*PASS_THROUGH_MODULES, nn.Flatten, *_MAX_POOL_MODULES, *_AVG_POOL_MODULES, *_ADAPTIVE_AVG_MODULES)


def _name(call: Call) -> str:
    return call.target if isinstance(call.target, str) else getattr(call.target, "__name__", "")


def _arg(call: Call, index: int, key: str, default: Any = None) -> Any:  # noqa: ANN401 - any argument
    return call.args[index] if len(call.args) > index else call.kwargs.get(key, default)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """``root.<name> = module`` for a dotted name."""
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _attr(root: nn.Module, path: str) -> torch.Tensor:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclasses.dataclass
class _Removal:
    """How to take one BN out of the model once every call of it has folded."""

    module: nn.Module | None  # None for a functional batch_norm
    tail: nn.Module | None
    left: int  # calls not removed yet


@dataclasses.dataclass
class _Pending:
    """A layer's folded float64 weight and bias, written once no remaining BN can reach the layer."""

    module: nn.Module
    weight: np.ndarray
    bias: np.ndarray


def _geometry(module: nn.Module) -> ConvGeometry | None:
    """A Conv module's kernel, stride, dilation and padding."""
    kernel, dilation = tuple(module.kernel_size), tuple(module.dilation)
    padding = module.padding
    if padding == "valid":
        padding = (0,) * len(kernel)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        begin, end = tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)
    else:
        begin = end = tuple(padding)
    return ConvGeometry(kernel, tuple(module.stride), dilation, begin, end, module.padding_mode == "zeros")


class ModuleView(Float64Staging):
    """One torch model (already copied and in eval mode) and its data flow, as a graph view."""

    kind = "torch modules"
    shape_hint = "pass example_inputs (CLI: --input-shape)"

    def __init__(self, model: nn.Module, flow: DataFlow) -> None:
        self.model = model
        self.flow = flow
        self.names: collections.Counter = collections.Counter(
            id(m) for _, m in model.named_modules(remove_duplicate=False)
        )
        self.owners: collections.Counter = collections.Counter(
            id(p)
            for _, m in model.named_modules(remove_duplicate=False)
            for p in m._parameters.values()
            if p is not None
        )
        self.pending: dict[int, _Pending] = {}
        self.flushed: dict[int, int] = {}  # module id -> values flushed to zero when its weights were written
        self.graph_changed = False
        self.input_index: dict[int, int] = {}  # id(BN call) -> position of the normalised value in its inputs
        self.bn_cache: dict[int, BNModule | None] = {}
        self.all_sites: list[BNSite] = []
        self.module_call = {id(flow.modules[c.target]): c for c in flow.calls if c.op == "module"}

    # -- sites ---------------------------------------------------------------------------

    def _bn(self, module: nn.Module) -> BNModule | None:
        if id(module) not in self.bn_cache:
            self.bn_cache[id(module)] = bn_module(module)
        return self.bn_cache[id(module)]

    def sites(self) -> list[BNSite]:
        """BN modules (one site however often called) and functional batch_norm calls, in call order."""
        by_module: dict[int, BNSite] = {}
        sites: list[BNSite] = []
        for call in self.flow.calls:
            if call.op == "module":
                module = self.flow.modules[call.target]
                bn = self._bn(module)
                if bn is None:
                    continue
                self.input_index[id(call)] = 0
                if id(module) in by_module:
                    by_module[id(module)].nodes.append(call)
                    by_module[id(module)].state.left += 1
                    continue
                affine = self._module_refusal(module) or bn.affine
                tail = "tail" if bn.tail is not None else None
                site = BNSite(
                    [call], LayerEntry(call.target, bn.kind), affine, bn.ranks, tail, _Removal(module, bn.tail, 1)
                )
                by_module[id(module)] = site
                sites.append(site)
            elif call.op == "function" and call.target in BATCH_NORM_FUNCTIONS:
                site = self._functional_site(call, len(sites))
                if site is not None:
                    sites.append(site)
        self.all_sites = sites
        return sites

    def _module_refusal(self, module: nn.Module) -> FoldRefused | None:
        if self.names[id(module)] != 1:
            return FoldRefused(f"the BN module is registered under {self.names[id(module)]} names")
        if has_hooks(module):
            return FoldRefused("the BN module has forward hooks")
        return None

    def _functional_site(self, call: Call, count: int) -> BNSite | None:
        name = call.fx_node.name if call.fx_node is not None else f"batch_norm#{count}"
        bound = dict(zip(_BATCH_NORM_ARGS[call.target], call.args, strict=False)) | call.kwargs
        source = bound.get("input")
        if call.fx_node is not None and not isinstance(source, fx.Node):
            return None
        value = id(source) if call.fx_node is not None else call.inputs[0]
        self.input_index[id(call)] = call.inputs.index(value)
        bn = self._functional_bn(call, bound)
        return BNSite([call], LayerEntry(name, "F.batch_norm"), bn.affine, bn.ranks, None, _Removal(None, None, 1))

    def _functional_bn(self, call: Call, bound: dict[str, Any]) -> BNModule:
        if call.fx_node is None:
            refused = FoldRefused("a functional batch_norm is removed only from a traced graph")
            return BNModule("F.batch_norm", ANY_RANK, refused)
        if bound.get("training", False) is not False:
            return BNModule("F.batch_norm", ANY_RANK, FoldRefused("batch_norm is called with training=True"))
        eps = bound.get("eps", 1e-5)
        if not isinstance(eps, float | int):
            return BNModule("F.batch_norm", ANY_RANK, FoldRefused("eps is computed at run time"))
        tensors = {}
        for key in ("running_mean", "running_var", "weight", "bias"):
            arg = bound.get(key)
            if arg is None and key in ("weight", "bias"):
                tensors[key] = None
                continue
            if not isinstance(arg, fx.Node) or arg.op != "get_attr":
                return BNModule("F.batch_norm", ANY_RANK, FoldRefused(f"{key} is not a constant buffer or parameter"))
            tensors[key] = _attr(self.model, arg.target)
        try:
            affine: Affine | FoldRefused = bn_affine(
                tensors["running_mean"], tensors["running_var"], tensors["weight"], tensors["bias"], float(eps)
            )
        except FoldRefused as refused:
            affine = refused
        return BNModule("F.batch_norm", ANY_RANK, affine, dtype=tensors["running_mean"].dtype)

    # -- reading -------------------------------------------------------------------------

    def bn_input(self, call: Call) -> int:
        """The value a BN call normalises."""
        return call.inputs[self.input_index[id(call)]]

    def bn_output(self, call: Call) -> int:
        """The value a BN call writes."""
        return call.output

    def producer(self, value: int) -> Call | None:
        """The call writing ``value`` (a model input or constant is a call too)."""
        return self.flow.producer(value)

    def readers(self, value: int) -> list[Call | None]:
        """Readers once per read; the model output is None."""
        return [None if user.op == "output" else user for user in self.flow.users(value)]

    def rank(self, value: int) -> int | None:
        """From shape propagation or the recorded run, where there was one."""
        return self.flow.ranks.get(value)

    def last_dim(self, value: int) -> int | None:
        """From shape propagation or the recorded run, where there was one."""
        return self.flow.last_dims.get(value)

    def label(self, call: Call | None) -> str:
        """A module's name, a function's name."""
        return "the model output" if call is None else call.describe()

    def op(self, call: Call) -> Op:
        """Classify a call."""
        kind, inputs = OpKind.OTHER, list(call.inputs)
        axis = None
        if call.op == "module":
            kind = self._module_kind(self.flow.modules[call.target])
            inputs = inputs[:1] if kind is not OpKind.OTHER else inputs
        elif call.op == "function":
            kind, axis = self._function_kind(call)
            if kind in (OpKind.FLATTEN, OpKind.MAX_POOL, OpKind.AVG_POOL, OpKind.RESHAPE):
                inputs = inputs[:1]
        return Op(call, kind, inputs, call.output, self.label(call), axis=axis)

    def _module_kind(self, module: nn.Module) -> OpKind:
        if self._bn(module) is not None:
            return OpKind.BATCH_NORM
        if not isinstance(layer_spec(module), str):
            return OpKind.LAYER
        stock = next((b for b in _STOCK_MODULES if isinstance(module, b)), None)
        if stock is None or type(module).forward is not stock.forward or has_hooks(module):
            return OpKind.OTHER
        if isinstance(module, PASS_THROUGH_MODULES):
            return OpKind.SUM  # one input: in eval mode it passes its input on
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            return OpKind.FLATTEN
        if isinstance(module, _MAX_POOL_MODULES) and not module.return_indices:
            return OpKind.MAX_POOL
        if isinstance(module, _ADAPTIVE_AVG_MODULES):
            return OpKind.AVG_POOL
        exact = not getattr(module, "count_include_pad", True) or not any(np.ravel(getattr(module, "padding", 0)))
        if isinstance(module, _AVG_POOL_MODULES) and getattr(module, "divisor_override", None) is None and exact:
            return OpKind.AVG_POOL
        return OpKind.OTHER

    def _function_kind(self, call: Call) -> tuple[OpKind, int | None]:
        name = _name(call)
        if call.target in _CAT_FUNCTIONS:
            dim = _arg(call, 1, "dim", 0)
            return OpKind.CONCAT, dim if isinstance(dim, int) else None
        is_add = call.target in _ADD_FUNCTIONS or name in ("add", "__add__", "__radd__")
        if (
            is_add
            and len(call.inputs) == 2
            and len(call.args) + len(call.kwargs) == 2
            and not set(call.kwargs) - {"other"}
        ):
            return OpKind.SUM, None
        is_sub = call.target in _SUB_FUNCTIONS or name in ("sub", "__sub__")
        if is_sub and len(call.inputs) == 2 and len(call.args) == 2 and not call.kwargs:
            return OpKind.DIFFERENCE, None
        if name in _DROPOUT_FUNCTIONS and len(call.inputs) == 1 and _arg(call, 2, "training", True) is False:
            return OpKind.SUM, None  # F.dropout(x, p, training=False): x itself (a Dropout in a recorded run)
        zero = [a for a in call.args if not isinstance(a, fx.Node) and isinstance(a, int | float) and a == 0]
        if is_add and len(call.inputs) == 1 and len(call.args) == 2 and not call.kwargs and zero:
            return OpKind.SUM, None  # ``0 + x`` (MobileOne starts its sum from 0): passes x on
        flatten = name == "flatten" and len(call.inputs) == 1
        if flatten and _arg(call, 1, "start_dim", 0) == 1 and _arg(call, 2, "end_dim", -1) == -1:
            return OpKind.FLATTEN, None
        if name in ("view", "reshape") and len(call.args) == 3 and call.args[2] == -1 and self._batch_size(call):
            return OpKind.FLATTEN, None
        reinterprets = any(isinstance(a, torch.dtype) for a in call.args)  # x.view(torch.int32): other bytes
        if name in ("flatten", "view", "reshape", "reshape_as") and call.inputs and not reinterprets:
            return OpKind.RESHAPE, None
        if name in ("max_pool1d", "max_pool2d", "max_pool3d") and not _arg(call, 6, "return_indices", False):
            return OpKind.MAX_POOL, None
        if name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d") or self._exact_average(call):
            return OpKind.AVG_POOL, None
        return OpKind.OTHER, None

    def _exact_average(self, call: Call) -> bool:
        """An avg_pool that counts no padded zeros, or a mean over spatial axes only."""
        name = _name(call)
        if name in ("avg_pool1d", "avg_pool2d", "avg_pool3d") and _arg(call, 6, "divisor_override") is None:
            return not _arg(call, 5, "count_include_pad", True) or not any(np.ravel(_arg(call, 3, "padding", 0)))
        rank = self.rank(call.inputs[0]) if name == "mean" and call.inputs else None
        if rank is None:
            return False
        dims = _arg(call, 1, "dim")
        dims = (dims,) if isinstance(dims, int) else dims
        return isinstance(dims, tuple | list) and bool(dims) and all(isinstance(d, int) and d % rank >= 2 for d in dims)

    @staticmethod
    def _batch_size(call: Call) -> bool:
        """Whether a view/reshape keeps the batch size: ``x.view(x.size(0), -1)``, or shapes that prove it."""
        size, source = call.args[1], call.args[0]
        if not isinstance(source, fx.Node):
            return False
        size_of_source = (
            isinstance(size, fx.Node)
            and size.op == "call_method"
            and size.target == "size"
            and size.args == (source, 0)
        )
        if size_of_source:
            return True
        before = getattr(source.meta.get("tensor_meta"), "shape", None)
        after = getattr(call.fx_node.meta.get("tensor_meta"), "shape", None) if call.fx_node is not None else None
        if before is None or after is None or len(before) < 2 or len(after) != 2:
            return False
        return after[0] == before[0] and after[1] == math.prod(before[1:])

    def layer(self, call: Call | None) -> Layer:
        """A Conv/ConvTranspose/Linear module called once, owning its parameters."""
        if call is None or call.op != "module":
            raise FoldRefused(f"it is {call.describe() if call else 'unknown'}, not a Conv/Linear module")
        module = self.flow.modules[call.target]
        spec = layer_spec(module)
        if isinstance(spec, str):
            raise FoldRefused(f"{call.target} ({type(module).__name__}) {spec}")
        if self.flow.module_calls[id(module)] != 1:
            raise FoldRefused(f"{call.target} is called {self.flow.module_calls[id(module)]} times")
        if self.names[id(module)] != 1:
            raise FoldRefused(f"{call.target} is registered under {self.names[id(module)]} names")
        for param in (module.weight, module.bias):
            if param is None:
                continue
            if id(param) in self.flow.external_tensors:
                raise FoldRefused(f"{call.target}'s parameters are also read outside the module")
            if self.owners[id(param)] != 1:
                raise FoldRefused(f"{call.target}'s parameters are shared with another module")
        weight = self._current(module)[0]
        return Layer(
            node=call,
            name=call.target,
            label=call.target,
            layout=spec.layout,
            groups=spec.groups,
            spatial=spec.spatial,
            ranks=spec.ranks,
            zero_padded=spec.zero_padded,
            data_input=call.inputs[0] if call.inputs else None,
            output=call.output,
            out_channels=output_channels(weight, spec.layout, spec.groups),
            in_channels=input_channels(weight, spec.layout, spec.groups),
            state=module,
            geometry=_geometry(module)
            if spec.layout is Layout.CONV and spec.spatial and not spec.custom_forward
            else None,
            reads_input_directly=spec.input_proven,
        )

    # -- writing -------------------------------------------------------------------------

    def _current(self, module: nn.Module) -> tuple[Any, Any]:
        pending = self.pending.get(id(module))
        return (pending.weight, pending.bias) if pending else (module.weight, module.bias)

    def current(self, layer: Layer) -> tuple[Any, Any]:
        """Float64 where a fold left it pending, else the module's parameters."""
        return self._current(layer.state)

    def weight_dtype(self, layer: Layer) -> torch.dtype:
        """The module weight's dtype."""
        return layer.state.weight.dtype

    def commit(self, staged: Sequence[Staged]) -> None:
        """Make the float64 results the layers' current weights."""
        for item in staged:
            self.pending[id(item.layer.state)] = _Pending(item.layer.state, item.weight, item.bias)

    def remove_bn(self, site: BNSite, call: Call) -> None:
        """Bypass the call; once every call is gone, the module becomes its tail (or Identity)."""
        self.flow.bypass(call, self.bn_input(call))
        removal: _Removal = site.state
        removal.left -= 1
        if removal.left:
            return
        if removal.module is not None:
            replacement = removal.tail or nn.Identity()
            set_submodule(self.model, site.entry.name, replacement)
            if call.fx_node is not None:
                set_submodule(self.flow.graph_module, site.entry.name, replacement)
            return
        node = call.fx_node
        source = self.bn_input(call)
        node.replace_all_uses_with(next(n for n in node.all_input_nodes if id(n) == source))
        self.flow.graph_module.graph.erase_node(node)
        self.graph_changed = True

    def settle(self) -> None:
        """Write every layer no BN still kept can reach: one float64 copy per layer at a time, not all."""
        if not self.pending:
            return
        near = self._near_kept_bn()
        for key in list(self.pending):
            call = self.module_call.get(key)
            if call is None or id(call) not in near:
                self._write(key)

    def _near_kept_bn(self) -> set[int]:
        """Ids of the calls within three steps (before or after) of a BN not folded yet."""
        near: set[int] = set()
        for site in self.all_sites:
            if site.entry.action != KEPT:
                continue
            frontier = list(site.nodes)
            for _ in range(3):
                step = [self.flow.producer(v) for c in frontier for v in c.inputs]
                step += [u for c in frontier if c.output is not None for u in self.flow.users(c.output)]
                frontier = [c for c in step if c is not None and id(c) not in near]
                near.update(id(c) for c in frontier)
        return near

    def _write(self, key: int) -> None:
        item = self.pending.pop(key)
        old = item.module.weight
        weight, n_w = round_to(item.weight, old.dtype)
        bias, n_b = round_to(item.bias, old.dtype)
        item.module.weight = nn.Parameter(weight.to(old.device), requires_grad=old.requires_grad)
        item.module.bias = nn.Parameter(bias.to(old.device), requires_grad=old.requires_grad)
        self.flushed[key] = self.flushed.get(key, 0) + n_w + n_b

    # -- merging parallel branches (a traced graph only) ----------------------------------------

    def nodes(self) -> list[Call]:
        """The calls, in order."""
        return [c for c in self.flow.calls if c.op in ("module", "function")]

    def bn_affine(self, call: Call) -> Affine:
        """A BN module's inference map; a BN that applies an activation after it is not linear."""
        bn = self._bn(self.flow.modules[call.target]) if call.op == "module" else None
        if bn is None:
            raise FoldRefused(f"{call.describe()} is not a BN module")
        if isinstance(bn.affine, FoldRefused):
            raise bn.affine
        if bn.tail is not None:
            raise FoldRefused(f"{call.target} applies more after BN, so the branch is not linear")
        return bn.affine

    def merge(self, plan: MergePlan) -> None:
        """The kept conv gets the merged weights; the sum's readers read it; the other branches leave the graph."""
        if self.flow.graph_module is None:
            raise FoldRefused("merging branches needs a traced graph")
        staged = self.stage(plan.keep, plan.weight, plan.bias)  # refuses overflow before any change
        self.commit([staged])
        self._write(id(plan.keep.state))
        graph = self.flow.graph_module.graph
        plan.total.node.fx_node.replace_all_uses_with(plan.keep.node.fx_node)
        self.flow.bypass(plan.total.node, plan.keep.node.output)
        for call in plan.removed:
            if call is not plan.total.node and call in self.flow.calls:
                self.flow.bypass(call, call.inputs[0] if call.inputs else None)
        graph.eliminate_dead_code()
        self.graph_changed = True

    def write_all(self) -> dict[int, int]:
        """Write every layer still pending; return values flushed to zero per module id."""
        for key in list(self.pending):
            self._write(key)
        return self.flushed
