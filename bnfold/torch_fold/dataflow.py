"""The data flow of a torch model: which call made, and which calls read, each tensor.

Two ways to find it: torch.fx symbolic tracing (no inputs needed, sees every
branch of the traced program) and, for models fx cannot trace, recording one
run on example inputs with module hooks plus a TorchFunctionMode that sees every
torch function and tensor method called outside those modules.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import io
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from bnfold.torch_fold.recognise import is_atomic

__all__ = ["BATCH_NORM_FUNCTIONS", "Call", "DataFlow", "record", "trace"]

logger = logging.getLogger(__name__)

BATCH_NORM_FUNCTIONS = (F.batch_norm, torch.batch_norm)
# Reading these from a tensor does not depend on its values, so it is not a use.
_METADATA = frozenset(
    {"size", "dim", "numel", "shape", "dtype", "device", "ndim", "is_contiguous", "__len__", "layout", "is_cuda"}
)
# ``x.reshape_as(other)``: only ``x``'s values are used, ``other`` gives a shape
_SHAPE_OF_SECOND = frozenset({"reshape_as", "view_as", "expand_as"})


@dataclasses.dataclass(eq=False)
class Call:
    """One operation in the data flow.

    Attributes:
        op: ``input``, ``module``, ``function``, ``constant`` or ``output``.
        target: Module qualified name, the function (or method name), or the
            attribute path of a constant.
        inputs: Value ids read, in argument order (a value read twice appears twice).
        output: Value id written, or None.
        args: The call's positional arguments (fx nodes or recorded objects),
            for reading constants such as ``torch.cat``'s ``dim``.
        kwargs: The call's keyword arguments.
        fx_node: The fx node, when the flow came from tracing.
    """

    op: str
    target: Any
    inputs: list[int]
    output: int | None
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    fx_node: fx.Node | None = None

    def describe(self) -> str:
        """A short human name for the report."""
        if self.op == "module":
            return str(self.target)
        if self.op == "function":
            return getattr(self.target, "__name__", str(self.target))
        if self.op == "input":
            return "a model input"
        if self.op == "output":
            return "the model output"
        return f"constant {self.target}"


@dataclasses.dataclass
class DataFlow:
    """A model's data flow, plus what the fold checks need to know about it.

    Attributes:
        method: ``torch.fx`` or ``recorded``.
        calls: Operations in execution order.
        modules: The modules by qualified name (each module object once).
        module_calls: How many times each module object (by ``id``) is called.
        ranks: Rank of each value, where known.
        last_dims: Size of each value's last axis, where known.
        external_tensors: ``id`` of parameters and buffers read outside their
            module's own call (e.g. ``F.conv2d(x, self.conv.weight)``).
        graph_module: The traced GraphModule (fx only).
    """

    method: str
    calls: list[Call]
    modules: dict[str, nn.Module]
    module_calls: collections.Counter
    ranks: dict[int, int]
    external_tensors: set[int]
    graph_module: fx.GraphModule | None = None
    last_dims: dict[int, int] = dataclasses.field(default_factory=dict)
    _cache: tuple[dict[int, Call], dict[int, list[Call]]] | None = dataclasses.field(default=None, repr=False)

    def _index(self) -> tuple[dict[int, Call], dict[int, list[Call]]]:
        if self._cache is None:
            producers: dict[int, Call] = {}
            users: dict[int, list[Call]] = collections.defaultdict(list)
            for call in self.calls:
                if call.output is not None:
                    producers.setdefault(call.output, call)
                for v in call.inputs:
                    users[v].append(call)
            self._cache = (producers, users)
        return self._cache

    def producer(self, value: int) -> Call | None:
        """The call that wrote ``value``."""
        return self._index()[0].get(value)

    def users(self, value: int) -> list[Call]:
        """The calls that read ``value``, once per read."""
        return list(self._index()[1].get(value, []))

    def bypass(self, call: Call, value: int) -> None:
        """Remove ``call``, letting its readers read ``value`` instead of its output."""
        producers, users = self._index()
        self.calls.remove(call)
        for v in set(call.inputs):
            users[v] = [u for u in users[v] if u is not call]
        readers = users.pop(call.output, [])
        for reader in dict.fromkeys(readers):  # each reader once, in order
            reader.inputs = [value if v == call.output else v for v in reader.inputs]
        users[value].extend(readers)
        if producers.get(call.output) is call:
            del producers[call.output]


def _rank_of(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


def _last_dim_of(node: fx.Node) -> int | None:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return int(shape[-1]) if shape else None


class _LeafTracer(fx.Tracer):
    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_atomic(m) or super().is_leaf_module(m, module_qualified_name)


def _fx_inputs(node: fx.Node) -> list[int]:
    if node.op == "call_method" and node.target in _METADATA:
        return []
    if node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA:
        return []
    if node.op == "call_method" and node.target in _SHAPE_OF_SECOND and isinstance(node.args[0], fx.Node):
        return [id(node.args[0])]
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return [id(n) for n in found]


def _holds_proxy(value: object, depth: int = 2) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if depth and isinstance(value, dict):
        return any(_holds_proxy(k, 0) or _holds_proxy(v, depth - 1) for k, v in value.items())
    if depth and isinstance(value, (list, tuple, set)):
        return any(_holds_proxy(v, depth - 1) for v in value)
    return False


@contextlib.contextmanager
def no_proxies_left_behind(model: nn.Module) -> Iterator[None]:
    """Undo what tracing wrote into the model's Python state: attributes and caches that now hold fx Proxies.

    Tracing runs the model's own forward, and some forwards cache: timm's LeViT and EfficientFormer keep an
    attention-bias cache keyed by the input's device, which under tracing becomes a Proxy keyed
    ``"Proxy(getattr_2)"``. Left there, the next trace reads a node of a finished graph (fx: "referenced
    nonexistent value"), and the user's model holds a dead graph. Only values that hold a Proxy are put back.
    """
    saved = []
    for module in model.modules():
        attributes = dict(vars(module))
        contents = {k: copy.copy(v) for k, v in attributes.items() if isinstance(v, (dict, list, set))}
        saved.append((module, attributes, contents))
    try:
        yield
    finally:
        for module, attributes, contents in saved:
            state = vars(module)
            for key, value in list(state.items()):
                if not _holds_proxy(value):
                    continue
                if key not in attributes:
                    del state[key]
                elif key in contents and value is attributes[key]:  # the same container, filled in place
                    value.clear()
                    if isinstance(value, list):
                        value.extend(contents[key])
                    else:
                        value.update(contents[key])
                else:
                    state[key] = attributes[key]


def trace(model: nn.Module, example_inputs: tuple | None) -> DataFlow:
    """Find the data flow by symbolic tracing.

    Args:
        model: The model, in eval mode.
        example_inputs: Used only to learn tensor ranks (via shape propagation).

    Returns:
        The data flow, with ``graph_module`` set.

    Raises:
        Exception: Whatever fx raises on an untraceable model.
    """
    tracer = _LeafTracer()
    with no_proxies_left_behind(model):
        graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph)
    if example_inputs is not None:
        # no grad: a forward with grad leaves non-leaf tensors behind (spectral_norm's weight); ShapeProp prints
        # the traceback of a model's error before raising it again: the caller reports it in one line instead
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*example_inputs)
    modules = dict(model.named_modules())
    tensors = {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    calls: list[Call] = []
    module_calls: collections.Counter = collections.Counter()
    external: set[int] = set()
    ops = {
        "placeholder": "input",
        "call_module": "module",
        "call_function": "function",
        "call_method": "function",
        "get_attr": "constant",
        "output": "output",
    }
    for node in graph.nodes:
        op = ops[node.op]
        if op == "module":
            module_calls[id(modules[node.target])] += 1
        if op == "constant" and node.target in tensors:
            external.add(id(tensors[node.target]))
        output = None if op == "output" else id(node)
        calls.append(Call(op, node.target, _fx_inputs(node), output, node.args, dict(node.kwargs), node))
    ranks = {id(node): r for node in graph.nodes if (r := _rank_of(node)) is not None}
    last_dims = {id(node): d for node in graph.nodes if (d := _last_dim_of(node)) is not None}
    return DataFlow("torch.fx", calls, modules, module_calls, ranks, external, gm, last_dims)


class _Recorder(TorchFunctionMode):
    """Records torch calls made outside atomic modules, with the values they read and write."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self.values: dict[int, int] = {}
        self.ranks: dict[int, int] = {}
        self.last_dims: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []
        self.depth = 0
        self.module_calls: collections.Counter = collections.Counter()
        self.pending: list[list[int]] = []
        self.params = {id(t) for t in list(model.parameters()) + list(model.buffers())}
        self.external: set[int] = set()

    def read(self, objects: Any) -> list[int]:
        ids = []
        for leaf in tree_flatten(objects)[0]:
            if isinstance(leaf, torch.Tensor):
                if id(leaf) in self.params:
                    self.external.add(id(leaf))
                if id(leaf) not in self.values:
                    self.write(leaf)
                ids.append(self.values[id(leaf)])
        return ids

    def write(self, objects: Any) -> int | None:
        last = None
        for leaf in tree_flatten(objects)[0]:
            if isinstance(leaf, torch.Tensor):
                self.keep.append(leaf)
                last = len(self.keep)
                self.values[id(leaf)] = last
                self.ranks[last] = leaf.dim()
                if leaf.dim():
                    self.last_dims[last] = int(leaf.shape[-1])
        return last

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, D105
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.depth == 0:
            name = getattr(func, "__name__", "")
            if name == "__get__":
                name = getattr(getattr(func, "__self__", None), "__name__", name)
            inputs = [] if name in _METADATA else self.read(args[:1] if name in _SHAPE_OF_SECOND else (args, kwargs))
            if name not in _METADATA:
                self.calls.append(Call("function", func, inputs, self.write(result), tuple(args), dict(kwargs)))
        return result


def record(model: nn.Module, example_inputs: tuple) -> DataFlow:
    """Find the data flow by running ``model`` once on ``example_inputs``.

    Only the branches this run takes are seen; the report says so.
    """
    recorder = _Recorder(model)
    names: dict[int, str] = {}
    handles = []
    for name, module in model.named_modules():
        if id(module) in names or not is_atomic(module):
            continue
        names[id(module)] = name

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if recorder.depth == 0:
                recorder.pending.append(recorder.read((args, kwargs)))
            recorder.depth += 1

        def post_hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            recorder.depth -= 1
            recorder.module_calls[id(mod)] += 1
            if recorder.depth == 0:
                inputs = recorder.pending.pop()
                recorder.calls.append(Call("module", names[id(mod)], inputs, recorder.write(output)))

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    try:
        inputs = [recorder.write(x) for x in example_inputs]
        recorder.calls.extend(Call("input", i, [], v) for i, v in enumerate(inputs))
        with torch.no_grad(), recorder:
            output = model(*example_inputs)
        recorder.calls.append(Call("output", "output", recorder.read(output), None))
    finally:
        for handle in handles:
            handle.remove()
    modules = {name: module for name, module in model.named_modules()}
    return DataFlow(
        "recorded",
        recorder.calls,
        modules,
        recorder.module_calls,
        recorder.ranks,
        recorder.external,
        None,
        recorder.last_dims,
    )
