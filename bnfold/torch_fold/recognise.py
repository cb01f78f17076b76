"""Which modules are BatchNorms, which are foldable layers, and how to read them."""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

from bnfold.affine import Affine, FoldRefused, Layout, bn_affine

__all__ = [
    "ANY_RANK",
    "PASS_THROUGH_MODULES",
    "BNModule",
    "LayerSpec",
    "bn_module",
    "has_hooks",
    "is_atomic",
    "layer_spec",
]

ANY_RANK = frozenset(range(2, 9))
_STANDARD_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


@dataclasses.dataclass
class BNModule:
    """A BatchNorm-like module the pass can reason about.

    Attributes:
        kind: The module's class name, for the report.
        ranks: Input ranks the module accepts (it normalises axis 1).
        affine: Its inference map, or the reason it has none.
        tail: What the module computes after the BN map (None: nothing);
            a BN subclass that adds an activation keeps it here.
        dtype: Dtype of its statistics.
    """

    kind: str
    ranks: frozenset[int]
    affine: Affine | FoldRefused
    tail: nn.Module | None = None
    dtype: torch.dtype = torch.float32


@dataclasses.dataclass
class LayerSpec:
    """A Conv, ConvTranspose or Linear module seen as a foldable linear layer."""

    kind: str
    layout: Layout
    groups: int
    spatial: int  # number of spatial dims; 0 for Linear
    zero_padded: bool
    custom_forward: bool = False  # its own forward, proven to scale with its output channels
    input_proven: bool = True  # BN may fold in from before (a custom forward: proven for a Linear only)

    def channel_axis(self, rank: int) -> int:
        """The axis holding this layer's channels in a tensor of ``rank``."""
        if self.spatial == 0:
            return rank - 1
        return 1 if rank == self.spatial + 2 else 0

    @property
    def ranks(self) -> frozenset[int]:
        """Ranks this layer's input and output may have."""
        if self.spatial == 0:
            return frozenset(range(1, 9))
        return frozenset({self.spatial + 1, self.spatial + 2})


def has_hooks(module: nn.Module) -> bool:
    """Whether forward hooks or parametrizations could change what ``module`` computes."""
    return bool(module._forward_hooks or module._forward_pre_hooks or parametrize.is_parametrized(module))


def is_atomic(module: nn.Module) -> bool:
    """Whether the data flow treats ``module`` as one call: a BN-like or linear layer."""
    if isinstance(module, _BatchNorm | _ConvNd | nn.Linear):
        return True
    buffers = dict(module.named_buffers(recurse=False))
    return all(isinstance(buffers.get(name), torch.Tensor) for name in _FROZEN_BUFFERS) and not list(module.children())


def _bn_ranks(module: nn.Module) -> frozenset[int]:
    if isinstance(module, nn.BatchNorm1d):
        return frozenset({2, 3})
    if isinstance(module, nn.BatchNorm2d):
        return frozenset({4})
    if isinstance(module, nn.BatchNorm3d):
        return frozenset({5})
    return ANY_RANK


def _probe(ranks: frozenset[int], channels: int) -> torch.Tensor:
    rank = 4 if 4 in ranks else min(ranks)
    generator = torch.Generator().manual_seed(0)
    shape = [2, channels] + [3] * (rank - 2)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 1


def _apply(affine: Affine, x: torch.Tensor) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.dim() - 2)
    return x * torch.from_numpy(affine.scale).reshape(shape) + torch.from_numpy(affine.shift).reshape(shape)


def _matches(module: nn.Module, affine: Affine, ranks: frozenset[int], tail: nn.Module | None) -> bool:
    """Check in float64 that ``module(x) == tail(affine(x))`` on a random input."""
    probe = _probe(ranks, affine.channels)
    try:
        with torch.no_grad():
            reference = copy.deepcopy(module).double().eval()(probe)
            candidate = _apply(affine, probe)
            if tail is not None:
                candidate = copy.deepcopy(tail).double().eval()(candidate)
    except Exception:  # noqa: BLE001 - any failure means "not what we think it is"
        return False
    return isinstance(reference, torch.Tensor) and torch.allclose(reference, candidate, rtol=1e-9, atol=1e-12)


def _batchnorm_affine(module: _BatchNorm) -> Affine | FoldRefused:
    if not module.track_running_stats or module.running_mean is None or module.running_var is None:
        return FoldRefused("no population statistics (track_running_stats=False): BN uses batch statistics")
    try:
        return bn_affine(
            module.running_mean,
            module.running_var,
            module.weight if module.affine else None,
            module.bias if module.affine else None,
            module.eps,
        )
    except FoldRefused as refused:
        return refused


# modules that return their input in eval mode
PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ASSERTS = tuple(f for f in (getattr(torch, "_assert", None), getattr(torch, "_assert_async", None)) if f)
_METADATA = frozenset({"ndim", "shape", "dtype", "device", "is_cuda", "layout"})


def _reads_only_metadata(node: fx.Node) -> bool:
    """Whether ``node`` reads only the input's rank, shape, dtype or device (``x.ndim``, ``x.dim()``, ...)."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _METADATA
    return node.op == "call_method" and node.target in ("dim", "size") and not node.kwargs


def _drop_input_checks(graph: fx.Graph) -> None:
    """Remove assertions and the metadata reads they use (timm's ``_assert(x.ndim == 4)``).

    An assertion on the input's rank or dtype computes nothing: it only fails for
    an input the folded layer never produces. What remains must still be one
    batch_norm plus element-wise ops, or the module is refused.
    """
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS:
            graph.erase_node(node)
    changed = True
    while changed:  # the comparisons and metadata reads the assertions used, now unread
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.users or node.op in ("placeholder", "output", "call_module"):
                continue
            if _reads_only_metadata(node) or (node.op == "call_function" and _is_comparison(node)):
                graph.erase_node(node)
                changed = True


def _is_comparison(node: fx.Node) -> bool:
    import operator

    return node.target in (
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
        operator.and_,
        operator.or_,
        operator.not_,
        operator.getitem,
    )


def _traced_tail(module: _BatchNorm) -> nn.Module | FoldRefused:
    """Split a BN subclass with its own forward into BN + the rest (e.g. an activation)."""
    work = copy.deepcopy(module).eval()
    work._check_input_dim = lambda _input: None  # a rank check is control flow fx cannot trace

    class _Tracer(fx.Tracer):
        proxy_buffer_attributes = True

    try:
        graph = _Tracer().trace(work)
    except Exception as error:  # noqa: BLE001 - tracing user code fails in many ways
        return FoldRefused(f"custom forward of {type(module).__name__} is not traceable ({type(error).__name__})")
    _drop_input_checks(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm)]
    if len(placeholders) != 1 or len(calls) != 1:
        return FoldRefused(f"custom forward of {type(module).__name__} is not one batch_norm plus elementwise ops")
    (x,), (call,) = placeholders, calls
    if call.args[0] is not x or len(x.users) != 1:
        return FoldRefused(f"custom forward of {type(module).__name__} does more than batch_norm on its input")
    call.replace_all_uses_with(x)
    graph.erase_node(call)
    tail = fx.GraphModule(work, graph, class_name=f"{type(module).__name__}Tail")
    for node in list(tail.graph.nodes):  # timm's BatchNormAct2d(act_layer=None): drop and act are Identity
        if node.op == "call_module" and type(tail.get_submodule(node.target)) in PASS_THROUGH_MODULES and node.args:
            node.replace_all_uses_with(node.args[0])
    tail.graph.eliminate_dead_code()  # needs the owning module to judge call_module purity
    if [n.op for n in tail.graph.nodes] == ["placeholder", "output"]:
        return nn.Identity()
    tail.recompile()
    tail.delete_all_unused_submodules()
    return tail.eval()


def bn_module(module: nn.Module) -> BNModule | None:
    """Recognise a BatchNorm-like module, or return None.

    Recognised: every ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm and
    subclasses, including ones that add an activation in ``forward``) and
    FrozenBatchNorm2d-style modules, found by their buffers (weight, bias,
    running_mean, running_var, eps) and checked numerically, so torchvision
    need not be imported.
    """
    if isinstance(module, _BatchNorm):
        if isinstance(module.running_mean, nn.parameter.UninitializedBuffer):
            return BNModule(type(module).__name__, ANY_RANK, FoldRefused("lazy BatchNorm is not initialised"))
        ranks = _bn_ranks(module)
        affine = _batchnorm_affine(module)
        dtype = module.running_mean.dtype if module.running_mean is not None else torch.float32
        result = BNModule(type(module).__name__, ranks, affine, dtype=dtype)
        if type(module).forward in _STANDARD_BN_FORWARDS or isinstance(affine, FoldRefused):
            return result
        tail = _traced_tail(module)
        if isinstance(tail, FoldRefused):
            result.affine = tail
        elif not _matches(module, affine, ranks, tail):
            result.affine = FoldRefused(f"{type(module).__name__}.forward does not compute BN followed by its tail")
        else:
            result.tail = None if isinstance(tail, nn.Identity) else tail
        return result
    buffers = dict(module.named_buffers(recurse=False))
    if not all(isinstance(buffers.get(name), torch.Tensor) for name in _FROZEN_BUFFERS):
        return None
    if list(module.parameters(recurse=False)) or list(module.children()):
        return None
    kind = type(module).__name__
    eps = getattr(module, "eps", None)
    if not isinstance(eps, float | int):
        return BNModule(kind, frozenset({4}), FoldRefused(f"{kind} has BN buffers but no eps attribute"))
    try:
        affine: Affine | FoldRefused = bn_affine(
            buffers["running_mean"], buffers["running_var"], buffers["weight"], buffers["bias"], float(eps)
        )
    except FoldRefused as refused:
        return BNModule(kind, frozenset({4}), refused, dtype=buffers["running_mean"].dtype)
    if not _matches(module, affine, frozenset({4}), None):
        affine = FoldRefused(f"{kind} has BN buffers but does not compute the BN affine map")
    return BNModule(kind, frozenset({4}), affine, dtype=buffers["running_mean"].dtype)


def _zero_padded(module: _ConvNd) -> bool:
    if module.padding_mode != "zeros":
        return False  # reflect/replicate/circular pads with copies of the input, which carry BN's shift
    padding = module.padding
    if isinstance(padding, str):
        pads = (d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True))
        return padding == "same" and any(p > 0 for p in pads)
    return any(p != 0 for p in padding)


def _same(after: object, expected: torch.Tensor) -> bool:
    """Whether a probe's float64 result is the expected tensor (to rounding)."""
    return (
        isinstance(after, torch.Tensor)
        and after.shape == expected.shape
        and torch.allclose(after, expected, rtol=1e-9, atol=1e-12)
    )


def _scales_with_output_channels(module: nn.Module, spatial: int) -> bool:
    """Check in float64 that a Conv/Linear subclass with its own forward acts like one on its output channels.

    Scaling weight row ``c`` by ``s[c]`` and setting the bias to ``s * b + t`` must give ``s * y + t``
    (timm's ``Conv2dSame`` pads and convolves: it does; weight standardisation normalises the rows
    again: it does not). Only the layer-before-BN fold relies on this; what the forward does to its
    input stays unknown, so no BN folds into such a layer from before it.
    """
    if module.weight is None or isinstance(module.weight, nn.parameter.UninitializedParameter):
        return False
    generator = torch.Generator().manual_seed(0)
    try:
        work = copy.deepcopy(module).double().eval()
        channels = work.in_channels if spatial else work.in_features
        probe = torch.randn([2, channels] + [7] * spatial, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            before = work(probe)
            out = work.out_channels if spatial else work.out_features
            scale = torch.rand(out, generator=generator, dtype=torch.float64) * 2 + 0.5
            shift = torch.randn(out, generator=generator, dtype=torch.float64)
            bias = work.bias if work.bias is not None else torch.zeros(out, dtype=torch.float64)
            transposed = isinstance(work, _ConvTransposeNd)
            groups = getattr(work, "groups", 1)
            if transposed:
                w = work.weight.reshape(groups, work.weight.shape[0] // groups, work.weight.shape[1], -1)
                w *= scale.reshape(groups, 1, -1, 1)
            else:
                work.weight *= scale.reshape([-1] + [1] * (work.weight.dim() - 1))
            work.bias = nn.Parameter(bias * scale + shift)
            after = work(probe)
        shape = [1, -1] + [1] * spatial if spatial else [-1]
        expected = before * scale.reshape(shape) + shift.reshape(shape)
    except Exception:  # noqa: BLE001 - any failure means "not what we think it is"
        return False
    return _same(after, expected)


def _linear_on_its_input(module: nn.Linear) -> bool:
    """Check in float64 that a Linear subclass with its own forward acts like ``nn.Linear`` on its input.

    With the weight's columns scaled by ``s`` and ``W t`` added to the bias, ``x`` must give what
    ``s * x + t`` gave before: the fold of a BN into the layer after it (timm's ``Linear``, which
    only adds a TorchScript path, does). Convolutions are not tried: a forward that pads (``same``
    padding computed per input size) breaks this at sizes a probe may not meet.
    """
    if module.weight is None or isinstance(module.weight, nn.parameter.UninitializedParameter):
        return False
    generator = torch.Generator().manual_seed(1)
    try:
        work = copy.deepcopy(module).double().eval()
        probe = torch.randn(3, 2, work.in_features, generator=generator, dtype=torch.float64)
        scale = torch.rand(work.in_features, generator=generator, dtype=torch.float64) * 2 + 0.5
        shift = torch.randn(work.in_features, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            expected = work(probe * scale + shift)
            bias = work.bias if work.bias is not None else torch.zeros(work.out_features, dtype=torch.float64)
            work.bias = nn.Parameter(bias + work.weight @ shift)
            work.weight *= scale
            after = work(probe)
    except Exception:  # noqa: BLE001 - any failure means "not what we think it is"
        return False
    return _same(after, expected)


def _standard(module: nn.Module, base: type, *methods: str) -> bool:
    return all(getattr(type(module), m) is getattr(base, m) for m in methods)


def layer_spec(module: nn.Module) -> LayerSpec | str:
    """Describe a foldable layer, or say why ``module`` is not one.

    The reason, when there is one, reads after the module's name and kind.
    Only the stock forward of Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear is
    trusted: a subclass that rewrites its forward (weight standardisation, for
    one) would undo a folded weight.
    """
    kind = type(module).__name__
    bases: list[tuple[type, Layout, int]] = [
        (nn.Conv1d, Layout.CONV, 1),
        (nn.Conv2d, Layout.CONV, 2),
        (nn.Conv3d, Layout.CONV, 3),
        (nn.ConvTranspose1d, Layout.CONV_TRANSPOSE, 1),
        (nn.ConvTranspose2d, Layout.CONV_TRANSPOSE, 2),
        (nn.ConvTranspose3d, Layout.CONV_TRANSPOSE, 3),
        (nn.Linear, Layout.CONV, 0),
    ]
    for base, layout, spatial in bases:
        if not isinstance(module, base):
            continue
        plain = base is nn.Linear or issubclass(base, _ConvTransposeNd)
        methods = ("forward",) if plain else ("forward", "_conv_forward")
        custom = not _standard(module, base, *methods)
        if custom and (has_hooks(module) or not _scales_with_output_channels(module, spatial)):
            return f"overrides forward, so a folded weight may not act as in a plain {base.__name__}"
        if has_hooks(module):
            return "has forward hooks or parametrizations"
        weight = module.weight
        if isinstance(weight, nn.parameter.UninitializedParameter):
            return "is lazy and not initialised"
        if not weight.dtype.is_floating_point:
            return f"has a {weight.dtype} weight"
        groups = getattr(module, "groups", 1)
        zero_padded = spatial > 0 and layout is Layout.CONV and _zero_padded(module)
        input_proven = not custom or (base is nn.Linear and _linear_on_its_input(module))
        return LayerSpec(
            kind,
            layout,
            groups,
            spatial,
            zero_padded or not input_proven,
            custom_forward=custom,
            input_proven=input_proven,
        )
    return "is not a Conv, ConvTranspose or Linear"
