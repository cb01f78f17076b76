"""Fold every foldable BatchNorm of a torch model into a neighbouring Conv/Linear.

Each BN is *matched* from the real data flow (producer -> BN -> consumer),
*checked* (each check raises :class:`~bnfold.affine.FoldRefused` with the reason
the report shows) and *rewritten* with the float64 maths of :mod:`bnfold.affine`.
Directions, in the order tried: into the layer before BN (or into every producer
of a channel concat, or into both layers of a sum, before BN), then into the layer
after BN (also through ``flatten(x, 1)``). Folding repeats until nothing changes,
so BN -> BN -> Linear folds both. torch.export programs go to :mod:`.aten`.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from bnfold.affine import (
    Affine,
    FoldRefused,
    bn_affine,
    output_channels,
    round_to,
    scale_input_channels,
    scale_output_channels,
)
from bnfold.errors import BnfoldError, first_line
from bnfold.report import (
    FOLDED_INTO_FOLLOWING,
    FOLDED_INTO_PRECEDING,
    FOLDED_INTO_PRODUCERS,
    KEPT,
    FoldReport,
    LayerEntry,
    first_fold,
)
from bnfold.torch_fold.aten import fold_exported, has_aten_batch_norm
from bnfold.torch_fold.dataflow import BATCH_NORM_FUNCTIONS, Call, DataFlow, record, trace
from bnfold.torch_fold.kinds import ANY_RANK, BNModule, LayerSpec, bn_module, has_hooks, layer_spec

__all__ = ["fold"]

logger = logging.getLogger(__name__)

_CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)
# Positional parameters of each functional batch_norm: torch.batch_norm orders them differently.
_BATCH_NORM_ARGS = {
    BATCH_NORM_FUNCTIONS[0]: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    BATCH_NORM_FUNCTIONS[1]: ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
}
_RECORDED_NOTE = (
    "torch.fx could not trace the model ({error}); the data flow was recorded from one run on the example "
    "inputs, so branches that run did not take were not seen"
)


@dataclasses.dataclass(eq=False)
class _Site:
    """One BN in the data flow."""

    call: Call
    bn: BNModule
    entry: LayerEntry
    module: nn.Module | None  # None for a functional batch_norm
    input: int  # the value BN normalises


@dataclasses.dataclass
class _Staged:
    """A layer's folded float64 weight and bias, rounded once at the end."""

    module: nn.Module
    weight: np.ndarray  # float64, rounded once by materialise()
    bias: np.ndarray


def _as_tuple(example_inputs: Any) -> tuple | None:
    if example_inputs is None or isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


_ADD_FUNCTIONS = (operator.add, torch.add)


def _function_kind(call: Call | None) -> str | None:
    """``cat`` or ``add`` for the calls a BN can fold through into several producers."""
    if call is None or call.op != "function":
        return None
    if call.target in _CAT_FUNCTIONS:
        return "cat"
    name = call.target if isinstance(call.target, str) else getattr(call.target, "__name__", "")
    if call.target in _ADD_FUNCTIONS or name in ("add", "__add__", "__radd__"):
        return "add"
    return None


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


class _TorchFoldPass:
    """Match, check and rewrite every BN of one model (already copied and in eval mode)."""

    def __init__(self, model: nn.Module, flow: DataFlow) -> None:
        self.model = model
        self.flow = flow
        self.staged: dict[int, _Staged] = {}
        self.names: collections.Counter = collections.Counter(
            id(m) for _, m in model.named_modules(remove_duplicate=False)
        )
        self.owners: collections.Counter = collections.Counter(
            id(p)
            for _, m in model.named_modules(remove_duplicate=False)
            for p in m._parameters.values()
            if p is not None
        )
        self.graph_changed = False
        self.all_sites: list[_Site] = []
        self.flushed: dict[int, int] = {}  # module id -> values flushed to zero when its weights were written
        self.module_call = {id(flow.modules[c.target]): c for c in flow.calls if c.op == "module"}

    # -- match ---------------------------------------------------------------------------

    def sites(self) -> list[_Site]:
        sites: list[_Site] = []
        seen: set[int] = set()
        for call in self.flow.calls:
            if call.op == "module":
                module = self.flow.modules[call.target]
                bn = bn_module(module)
                if bn is None or id(module) in seen:
                    continue
                seen.add(id(module))
                sites.append(_Site(call, bn, LayerEntry(call.target, bn.kind), module, call.inputs[0]))
            elif call.op == "function" and call.target in BATCH_NORM_FUNCTIONS:
                name = call.fx_node.name if call.fx_node is not None else f"batch_norm#{len(sites)}"
                bound = dict(zip(_BATCH_NORM_ARGS[call.target], call.args, strict=False)) | call.kwargs
                source = bound.get("input")
                value = id(source) if call.fx_node is not None else call.inputs[0]
                if call.fx_node is not None and not isinstance(source, fx.Node):
                    continue
                site = _Site(call, self.functional_bn(call, bound), LayerEntry(name, "F.batch_norm"), None, value)
                sites.append(site)
        return sites

    def functional_bn(self, call: Call, bound: dict[str, Any]) -> BNModule:
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
                tensors["running_mean"],
                tensors["running_var"],
                tensors["weight"],
                tensors["bias"],
                float(eps),
            )
        except FoldRefused as refused:
            affine = refused
        return BNModule("F.batch_norm", ANY_RANK, affine, dtype=tensors["running_mean"].dtype)

    # -- check ---------------------------------------------------------------------------

    def layer(self, call: Call | None) -> tuple[nn.Module, LayerSpec]:
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
        return module, spec

    @staticmethod
    def check_axes(bn: BNModule, spec: LayerSpec, rank: int | None, name: str) -> None:
        if rank is not None and rank not in bn.ranks:
            raise FoldRefused(f"BN receives a {rank}-D tensor, which {bn.kind} does not accept")
        candidates = {rank} if rank is not None else spec.ranks & bn.ranks
        if not candidates:
            raise FoldRefused(f"no tensor rank suits both {bn.kind} and {spec.kind}")
        wrong = sorted(r for r in candidates if spec.channel_axis(r) != 1)
        if not wrong:
            return
        if rank is not None:
            raise FoldRefused(
                f"{name} ({spec.kind}) has its channels on axis {spec.channel_axis(rank)} of the {rank}-D "
                "tensor but BN normalises axis 1"
            )
        raise FoldRefused(
            f"without tensor shapes the channel axes of {name} and BN may differ (a {wrong[0]}-D tensor): "
            "pass example_inputs (CLI: --input-shape)"
        )

    def only_reader(self, value: int, reader: Call, who: str) -> None:
        users = self.flow.users(value)
        others = [u for u in users if u is not reader]
        if others or len(users) != 1:
            what = others[0].describe() if others else reader.describe()
            raise FoldRefused(f"{who}'s output is also read by {what}")

    # -- rewrite -------------------------------------------------------------------------

    def current(self, module: nn.Module) -> tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray | None]:
        staged = self.staged.get(id(module))
        return (staged.weight, staged.bias) if staged else (module.weight, module.bias)

    def stage(self, module: nn.Module, weight: np.ndarray, bias: np.ndarray) -> _Staged:
        round_to(weight, module.weight.dtype)
        round_to(bias, module.weight.dtype)
        return _Staged(module, weight, bias)

    def commit(self, staged: list[_Staged]) -> None:
        for item in staged:
            self.staged[id(item.module)] = item

    def fold_preceding(self, site: _Site) -> list[str]:
        value = site.input
        producer = self.flow.producer(value)
        module, spec = self.layer(producer)
        self.only_reader(value, site.call, producer.target)
        self.check_axes(site.bn, spec, self.flow.ranks.get(value), producer.target)
        weight, bias = scale_output_channels(*self.current(module), site.bn.affine, spec.layout, spec.groups)
        self.commit([self.stage(module, weight, bias)])
        self.flow.bypass(site.call, value)
        return [producer.target]

    def fold_sum(self, site: _Site, add: Call) -> list[str]:
        """BN(a + b) = s*a + (s*b + t): scale both layers, give one of them the shift."""
        value = site.input
        self.only_reader(value, site.call, "the add")
        if len(add.inputs) != 2 or add.inputs[0] == add.inputs[1] or set(add.kwargs) - {"other"}:
            raise FoldRefused("the add is not a plain sum of two different tensors")
        staged, targets = [], []
        scale_only = Affine(site.bn.affine.scale, np.zeros_like(site.bn.affine.shift))
        for v, affine in zip(add.inputs, (site.bn.affine, scale_only), strict=True):
            producer = self.flow.producer(v)
            module, spec = self.layer(producer)
            if module in [item.module for item in staged]:
                raise FoldRefused(f"{producer.target} feeds the add twice")
            self.only_reader(v, add, producer.target)
            rank = self.flow.ranks.get(v)
            if rank is None or rank != self.flow.ranks.get(value):
                raise FoldRefused(
                    "the add's operands may broadcast, so their channels may not align: pass example_inputs"
                )
            self.check_axes(site.bn, spec, rank, producer.target)
            folded = scale_output_channels(*self.current(module), affine, spec.layout, spec.groups)
            staged.append(self.stage(module, *folded))
            targets.append(producer.target)
        self.commit(staged)
        self.flow.bypass(site.call, value)
        return targets

    def fold_producers(self, site: _Site, cat: Call) -> list[str]:
        value = site.input
        self.only_reader(value, site.call, "the concat")
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        rank = self.flow.ranks.get(value)
        if not isinstance(dim, int):
            raise FoldRefused("the concat axis is not a constant")
        if dim < 0:
            if rank is None:
                raise FoldRefused(f"concat along axis {dim} with unknown rank: pass example_inputs")
            dim += rank
        if dim != 1:
            raise FoldRefused(f"the concat joins axis {dim}, not the channel axis 1")
        staged, targets, start = [], [], 0
        for v in cat.inputs:
            producer = self.flow.producer(v)
            module, spec = self.layer(producer)
            if module in [s.module for s in staged]:
                raise FoldRefused(f"{producer.target} feeds the concat twice")
            self.only_reader(v, cat, producer.target)
            self.check_axes(site.bn, spec, self.flow.ranks.get(v), producer.target)
            weight, bias = self.current(module)
            stop = start + output_channels(weight, spec.layout, spec.groups)
            if stop > site.bn.affine.channels:
                raise FoldRefused("the concat has more channels than BN")
            folded = scale_output_channels(weight, bias, site.bn.affine.slice(start, stop), spec.layout, spec.groups)
            staged.append(self.stage(module, *folded))
            targets.append(producer.target)
            start = stop
        if start != site.bn.affine.channels:
            raise FoldRefused(f"the concat has {start} channels but BN has {site.bn.affine.channels}")
        self.commit(staged)
        self.flow.bypass(site.call, value)
        return targets

    def fold_following(self, site: _Site) -> list[str]:
        if site.bn.tail is not None:
            raise FoldRefused(f"{site.bn.kind} applies more after BN, so BN is not next to the following layer")
        value = site.call.output
        users = self.flow.users(value)
        if len(users) != 1:
            raise FoldRefused(f"its output is read by {len(users)} operations")
        consumer, affine = users[0], site.bn.affine
        if self.flattens_channels(consumer):
            return self.fold_through_flatten(site, consumer)
        module, spec = self.layer(consumer)
        if consumer.inputs != [value]:
            raise FoldRefused(f"{consumer.target} reads more than BN's output")
        self.check_axes(site.bn, spec, self.flow.ranks.get(value), consumer.target)
        weight, bias = scale_input_channels(
            *self.current(module), affine, spec.layout, spec.groups, padded=spec.zero_padded
        )
        self.commit([self.stage(module, weight, bias)])
        self.flow.bypass(site.call, site.input)
        return [consumer.target]

    def flattens_channels(self, call: Call) -> bool:
        """Whether ``call`` is ``flatten(x, 1)`` (module, function or method) over the whole tensor."""
        if call.op == "module":
            module = self.flow.modules[call.target]
            return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1
        name = call.target if isinstance(call.target, str) else getattr(call.target, "__name__", "")
        if call.op != "function" or name != "flatten" or len(call.inputs) != 1:
            return False
        start = call.args[1] if len(call.args) > 1 else call.kwargs.get("start_dim", 0)
        end = call.args[2] if len(call.args) > 2 else call.kwargs.get("end_dim", -1)
        return start == 1 and end == -1

    def fold_through_flatten(self, site: _Site, flatten: Call) -> list[str]:
        """BN -> flatten(x, 1) -> Linear: the Linear reads each channel's values in one contiguous run."""
        readers = self.flow.users(flatten.output)
        if len(readers) != 1:
            raise FoldRefused(f"the flattened output is read by {len(readers)} operations")
        consumer = readers[0]
        module, spec = self.layer(consumer)
        if spec.spatial != 0 or consumer.inputs != [flatten.output]:
            raise FoldRefused(f"{consumer.describe()} after the flatten is not a Linear reading only it")
        rank = self.flow.ranks.get(flatten.output)
        if rank is not None and rank != 2:
            raise FoldRefused(f"the flatten gives a {rank}-D tensor, so the Linear reads another axis")
        in_features = int(self.current(module)[0].shape[1])
        if in_features % site.bn.affine.channels:
            raise FoldRefused(f"{consumer.target} reads {in_features} features, not a multiple of BN's channels")
        repeated = site.bn.affine.repeat(in_features // site.bn.affine.channels)
        weight, bias = scale_input_channels(*self.current(module), repeated, spec.layout, spec.groups)
        self.commit([self.stage(module, weight, bias)])
        self.flow.bypass(site.call, site.input)
        site.entry.notes.append("through the flatten before it")
        return [consumer.target]

    def try_fold(self, site: _Site) -> bool:
        if isinstance(site.bn.affine, FoldRefused):
            site.entry.reason = str(site.bn.affine)
            return False
        if site.module is not None:
            calls = self.flow.module_calls[id(site.module)]
            if calls != 1 or self.names[id(site.module)] != 1:
                names = self.names[id(site.module)]
                site.entry.reason = f"the BN module is called {calls} time(s) and registered under {names} name(s)"
                return False
            if has_hooks(site.module):
                site.entry.reason = "the BN module has forward hooks"
                return False
        producer = self.flow.producer(site.input)
        kind = _function_kind(producer)
        if kind == "cat":
            before, action = (lambda _: self.fold_producers(site, producer)), FOLDED_INTO_PRODUCERS
        elif kind == "add":
            before, action = (lambda _: self.fold_sum(site, producer)), FOLDED_INTO_PRODUCERS
        else:
            before, action = (lambda _: self.fold_preceding(site)), FOLDED_INTO_PRECEDING
        attempts = [("before", action, before), ("after", FOLDED_INTO_FOLLOWING, lambda _: self.fold_following(site))]
        if not first_fold(site.entry, attempts):
            return False
        self.remove(site)
        for other in self.all_sites:  # a BN that read this one's output now reads its input (BN after BN)
            if other.input == site.call.output:
                other.input = site.input
        return True

    def remove(self, site: _Site) -> None:
        if site.module is not None:
            _set_submodule(self.model, site.call.target, site.bn.tail or nn.Identity())
            if site.call.fx_node is not None:
                _set_submodule(self.flow.graph_module, site.call.target, site.bn.tail or nn.Identity())
            return
        node = site.call.fx_node
        node.replace_all_uses_with(next(n for n in node.all_input_nodes if id(n) == site.input))
        self.flow.graph_module.graph.erase_node(node)
        self.graph_changed = True

    def write(self, key: int) -> None:
        """Round a staged layer once and give it its folded parameters; its float64 values are dropped."""
        item = self.staged.pop(key)
        old = item.module.weight
        weight, n_w = round_to(item.weight, old.dtype)
        bias, n_b = round_to(item.bias, old.dtype)
        item.module.weight = nn.Parameter(weight.to(old.device), requires_grad=old.requires_grad)
        item.module.bias = nn.Parameter(bias.to(old.device), requires_grad=old.requires_grad)
        self.flushed[key] = self.flushed.get(key, 0) + n_w + n_b

    def may_fold_again(self, module: nn.Module) -> bool:
        """Whether a BN not folded yet is next to ``module`` (writes its input or reads its output)."""
        call = self.module_call.get(id(module))
        if call is None:
            return True
        for site in self.all_sites:
            if site.entry.action != KEPT:
                continue
            producer = self.flow.producer(site.input)
            if producer is call or (
                _function_kind(producer) and any(self.flow.producer(v) is call for v in producer.inputs)
            ):
                return True
            for user in self.flow.users(site.call.output):
                if user is call or any(u is call for u in self.flow.users(user.output)):
                    return True
        return False

    def write_final(self) -> None:
        """Write every staged layer no remaining BN can reach: one float64 copy per layer at a time, not all."""
        for key in [k for k, item in self.staged.items() if not self.may_fold_again(item.module)]:
            self.write(key)

    def materialise(self) -> dict[int, int]:
        for key in list(self.staged):
            self.write(key)
        return self.flushed

    def run(self) -> tuple[nn.Module, list[LayerEntry]]:
        sites = self.all_sites = self.sites()
        changed = True
        while changed:
            changed = False
            for site in sites:
                if site.entry.action == KEPT and self.try_fold(site):
                    changed = True
                    self.write_final()
        flushed = self.materialise()
        by_name = {name: id(m) for name, m in self.flow.modules.items()}
        for site in sites:
            count = sum(flushed.get(by_name.get(t, -1), 0) for t in site.entry.targets)
            if count:
                site.entry.notes.append(f"{count} subnormal value(s) in the target flushed to zero")
        result: nn.Module = self.model
        if self.graph_changed:
            gm = self.flow.graph_module
            gm.graph.lint()
            gm.recompile()
            result = gm
        called = {id(s.module) for s in sites if s.module is not None}
        dead = (
            [
                LayerEntry(
                    name,
                    bn.kind,
                    reason="not called by forward as a module of its own (unused, or run inside another module)",
                )
                for name, m in self.model.named_modules()
                if id(m) not in called and (bn := bn_module(m)) is not None and not isinstance(m, nn.Identity)
            ]
            if self.flow.method == "torch.fx"
            else []
        )
        return result.eval(), [s.entry for s in sites] + dead


def _memory_note(weight_bytes: int, inplace: bool) -> str:
    """The process's peak resident memory beside the model's parameter bytes (for models of 1 GB and more)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    copy = "folded in place" if inplace else "folded in a copy (inplace=True avoids it)"
    return f"peak resident memory {peak:,.0f} MB for {weight_bytes / 2**20:,.0f} MB of parameters, {copy}"


def _attr(root: nn.Module, path: str) -> torch.Tensor:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def fold(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
) -> tuple[nn.Module, FoldReport]:
    """Fold every foldable BatchNorm of ``model`` into a neighbouring Conv/Linear.

    Args:
        model: Any ``torch.nn.Module``. Its eval-mode function is preserved.
        example_inputs: A tensor or tuple of tensors ``model`` accepts. Optional
            for models torch.fx can trace; it also proves channel axes where only
            shapes can (Linear next to BatchNorm1d).
        inplace: Modify ``model`` itself instead of a deep copy.

    Returns:
        ``(folded, report)``: the folded model in eval mode (a
        ``torch.fx.GraphModule`` only when a functional ``batch_norm`` call was
        removed from the traced graph, or for a torch.export program, folded at
        the aten level; otherwise the model's own class, with folded BN modules
        replaced by ``nn.Identity``), and one report entry per BN.

    Raises:
        BnfoldError: The model cannot be traced and no example inputs were
            given, or the example inputs are rejected by the model.
    """
    try:
        work = model if inplace else copy.deepcopy(model)
    except RuntimeError as error:
        first = first_line(error)
        raise BnfoldError(
            f"cannot copy {type(model).__name__} ({first}); run its last forward under torch.no_grad(), "
            "or pass inplace=True"
        ) from None
    if has_aten_batch_norm(work):  # a torch.export program: aten functions, not modules
        return fold_exported(work)
    work.eval()
    inputs = _as_tuple(example_inputs)
    notes: list[str] = []
    try:
        flow = trace(work, None)
    except Exception as error:  # noqa: BLE001 - fx fails in many ways on user code
        reason = first_line(error)
        if inputs is None:
            raise BnfoldError(
                f"torch.fx cannot trace {type(model).__name__} ({reason}); pass example_inputs "
                "(CLI: --input-shape) so bnfold can record the data flow from one run"
            ) from None
        notes.append(_RECORDED_NOTE.format(error=reason))
        try:
            flow = record(work, inputs)
        except Exception as run_error:  # noqa: BLE001
            raise BnfoldError(f"the model rejected the example inputs: {run_error}") from None
    else:
        if inputs is not None:
            try:
                flow = trace(work, inputs)
            except Exception as run_error:  # noqa: BLE001
                raise BnfoldError(f"the model rejected the example inputs: {run_error}") from None
    folded, entries = _TorchFoldPass(work, flow).run()
    weight_bytes = sum(p.numel() * p.element_size() for p in work.parameters())
    if weight_bytes >= 2**30:
        notes.append(_memory_note(weight_bytes, inplace))
    report = FoldReport(flow.method, entries, notes)
    logger.info("folded %d of %d BatchNorm(s)", report.bn_folded, report.bn_total)
    return folded, report
