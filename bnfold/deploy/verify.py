"""Numerical equivalence of a candidate (e.g. the folded model) with a reference, against float64 truth.

The truth is the reference evaluated in float64 (the torch module cast to double, or
the ONNX graph cast to double and run by the ONNX reference evaluator). The candidate
runs on each requested runtime in its own dtype, ONNX Runtime with its graph
optimisations off (it would fold BN itself). The reference's own error in its dtype is
reported beside, so a user sees whether folding added error; where the reference can run on
the candidate's runtime too (a module on ``torch-cuda``, an ONNX model on ``ort-cuda``) its
error there counts as well: a GPU's TF32 convolutions round both models alike. On a mismatch the first
diverging layer is named, from intermediate tensors (forward hooks in torch, extra
graph outputs in ONNX), each judged like an output, and that layer's conditioning is checked:
a layer that turns the original's own rounding into an error as large is named ill-conditioned, one
whose own rounding on the runtime (not its exact value) does so is named as such; where neither holds
but the candidate run in float64 on its own stored weights passes there, the divergence is the
candidate's float32 arithmetic (its folded or merged layers round in another order), not a wrong weight.

The rule judges every element on its own scale. With the default tolerances an element
passes when

    |candidate - truth| <= rtol * |truth| + min over slices (NOISE_FACTOR * noise + atol * scale)

where, for each slice the element lies in (its channel, axis 1, and its column, the last
axis; a slice needs MIN_SLICE elements, else the whole output counts as the slice),
``scale`` is the slice's max |truth| and ``noise`` the reference's own largest error in
its dtype on that slice. Folding may add rounding noise of the size the original already
has, never a real difference, and a large column (box coordinates, unnormalised logits)
no longer sets the bar for a small one. Default tolerances by the candidate's dtype:
float32 rtol 1e-4, atol 1e-5; float16 rtol 1e-2, atol 1e-2; bfloat16 rtol 5e-2, atol 5e-2;
float64 rtol 1e-10, atol 1e-12. An explicit ``atol`` is absolute: ``|candidate - truth| <= atol + rtol * |truth|``.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper

from bnfold.lazy import is_module, is_tensor

if TYPE_CHECKING:
    from torch import nn

from bnfold.deploy.error_stats import ErrorStats, error_stats
from bnfold.deploy.runtimes import ONNX_RUNTIMES, TORCH_RUNTIMES, check_available, run_onnx, run_torch, run_torch64
from bnfold.deploy.verify_power import INDEPENDENT_BELOW, Power, input_dependence, measure_power
from bnfold.errors import BnfoldError, first_line

__all__ = ["NOISE_FACTOR", "TOLERANCES", "VerifyResult", "verify"]

NOISE_FACTOR = 4.0  # how many times the original's own rounding error a folded model may show
ROUNDING_DOMINATES = 1e-2  # a reference this far from float64 (of the output's scale) says little in float32

TOLERANCES = {
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
    "float64": (1e-10, 1e-12),
}
_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}


@dataclasses.dataclass
class OutputCheck:
    """One output on one runtime, worst over all input draws.

    Attributes:
        output: Output position.
        stats: Error statistics over the whole output.
        min_atol: The smallest absolute atol that passes with rtol = 0.
        min_rtol: The smallest rtol that passes with atol = 0.
        passed: The verdict of the per-element rule.
        failing: How many elements fail.
        worst: The elements furthest over their bound: ``(index, truth, candidate, allowed)``.
        channels: Failing channels (axis 1) or columns (last axis): ``(axis, [indices])``.
    """

    output: int
    stats: ErrorStats
    min_atol: float
    min_rtol: float
    passed: bool
    failing: int = 0
    worst: list[tuple[tuple[int, ...], float, float, float]] = dataclasses.field(default_factory=list)
    channels: tuple[int, list[int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "output": self.output,
            **self.stats.to_dict(),
            "min_atol": self.min_atol,
            "min_rtol": self.min_rtol,
            "passed": self.passed,
            "failing_elements": self.failing,
            "worst_elements": [
                {"index": list(i), "truth": t, "candidate": c, "allowed_error": a} for i, t, c, a in self.worst
            ],
            "failing_slices": {"axis": self.channels[0], "indices": self.channels[1]} if self.channels else None,
        }

    def describe(self) -> str:
        """Where a failing output fails, in one line."""
        parts = [f"{self.failing} element(s) over their bound"]
        if self.channels:
            axis, indices = self.channels
            shown = ", ".join(str(i) for i in indices[:12]) + (", ..." if len(indices) > 12 else "")
            parts.append(f"{'channels' if axis == 1 else f'axis-{axis} slices'} {shown}")
        parts += [
            f"worst at {list(i)}: truth {t:.6g}, candidate {c:.6g} (allowed error {a:.3g})"
            for i, t, c, a in self.worst[:3]
        ]
        return "; ".join(parts)


@dataclasses.dataclass
class RuntimeCheck:
    """The candidate on one runtime."""

    runtime: str
    passed: bool
    outputs: list[OutputCheck]
    first_divergence: str | None = None
    reference_error: list[OutputCheck] | None = None  # the reference's own error on this runtime, when it ran here

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "runtime": self.runtime,
            "passed": self.passed,
            "outputs": [o.to_dict() for o in self.outputs],
            "first_divergence": self.first_divergence,
            "reference_error": [o.to_dict() for o in self.reference_error] if self.reference_error else None,
        }


@dataclasses.dataclass
class VerifyResult:
    """The outcome of :func:`verify`."""

    passed: bool
    dtype: str
    rtol: float
    atol: float
    draws: int
    runtimes: list[RuntimeCheck]
    reference_error: list[OutputCheck]
    notes: list[str] = dataclasses.field(default_factory=list)
    atol_scaled: bool = True  # atol is a fraction of max|truth| (the default) rather than absolute
    power: Power | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "passed": self.passed,
            "dtype": self.dtype,
            "rtol": self.rtol,
            "atol": self.atol,
            "atol_scaled": self.atol_scaled,
            "draws": self.draws,
            "runtimes": [r.to_dict() for r in self.runtimes],
            "reference_error": [o.to_dict() for o in self.reference_error],
            "notes": list(self.notes),
            "power": self.power.to_dict() if self.power else None,
        }

    def __str__(self) -> str:
        """A table: one row per runtime and output, then the verdict."""
        lines = [f"{'runtime':<14} {'out':>3} {'max abs':>10} {'max rel':>10} {'rel L2':>10} {'of scale':>10}  result"]
        rows = [(r.runtime, o, "pass" if o.passed else "FAIL") for r in self.runtimes for o in r.outputs]
        rows += [("reference", o, "(own dtype)") for o in self.reference_error]
        rows += [(f"ref {r.runtime}", o, "(own dtype)") for r in self.runtimes for o in r.reference_error or []]
        for name, o, verdict in rows:
            s = o.stats
            lines.append(
                f"{name:<14} {o.output:>3} {s.max_abs:>10.3g} {s.max_rel:>10.3g} {s.rel_l2:>10.3g} "
                f"{s.scaled_max:>10.3g}  {verdict}"
            )
        for r in self.runtimes:
            for o in r.outputs:
                if not o.passed:
                    lines.append(f"{r.runtime} output {o.output}: {o.describe()}")
            if r.first_divergence:
                lines.append(f"{r.runtime}: first divergence at {r.first_divergence}")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.power is not None:
            lines.append(self.power.describe())
        verdict = "PASS" if self.passed else "MISMATCH"
        lines.append(
            f"{verdict}: {self.dtype} tolerances rtol={self.rtol:g}, atol={self.atol:g}"
            f"{' x max|truth|' if self.atol_scaled else ''}, "
            f"{self.draws} input draw(s)"
        )
        return "\n".join(lines)


# -- models as runners -----------------------------------------------------------------------


def _dtype_of(model: nn.Module | onnx.ModelProto) -> str:
    if is_module(model):
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        return str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    elem = next((t.data_type for t in model.graph.initializer if t.data_type in _ONNX_DTYPES), onnx.TensorProto.FLOAT)
    return _ONNX_DTYPES[elem]


def _onnx_input_specs(model: onnx.ModelProto) -> list[tuple[tuple[int, ...], np.dtype]]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = []
        for axis, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            elif axis == 0:
                shape.append(8)  # a dynamic batch: enough samples for per-channel scales (MIN_SLICE)
            else:
                raise BnfoldError(f"input '{value.name}' has a dynamic axis {axis}: pass inputs or --input-shape")
        specs.append((tuple(shape), helper.tensor_dtype_to_np_dtype(tensor.elem_type)))
    return specs


def _draws(specs: list[tuple[tuple[int, ...], Any]], count: int) -> list[list[np.ndarray]]:
    draws = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        batch = []
        for shape, dtype in specs:
            if np.issubdtype(dtype, np.floating):
                values = [rng.standard_normal(shape), rng.standard_normal(shape) * 10 + 3, rng.random(shape)][seed % 3]
                batch.append(values.astype(dtype))
            else:
                batch.append(rng.integers(0, 2, shape).astype(dtype))
        draws.append(batch)
    return draws


def _truth(reference: nn.Module | onnx.ModelProto, inputs: list[np.ndarray]) -> list[np.ndarray]:
    if is_module(reference):
        return run_torch64(reference, inputs)
    from bnfold.deploy.onnx_reference import reference_float64

    names = [i.name for i in reference.graph.input if i.name not in {t.name for t in reference.graph.initializer}]
    return reference_float64(reference, dict(zip(names, inputs, strict=True)))


def _run(model: nn.Module | onnx.ModelProto, inputs: list[np.ndarray], runtime: str) -> list[np.ndarray]:
    if is_module(model):
        return run_torch(model, inputs, runtime)
    feeds = [
        x.astype(np.float16) if _dtype_of(model) == "float16" and np.issubdtype(x.dtype, np.floating) else x
        for x in inputs
    ]
    return run_onnx(model, feeds, runtime)


def _noisier(a: list[np.ndarray], b: list[np.ndarray], truth: list[np.ndarray]) -> list[np.ndarray]:
    """Element by element, whichever of two runs of the reference is further from the truth."""
    out = []
    for x, y, t in zip(a, b, truth, strict=True):
        x64, y64, t64 = (np.asarray(v, dtype=np.float64) for v in (x, y, t))
        out.append(np.where(np.abs(y64 - t64) > np.abs(x64 - t64), y64, x64))
    return out


def _slice_max(values: np.ndarray, axis: int) -> np.ndarray:
    """Max of ``values`` over every axis but ``axis``, shaped to broadcast back."""
    others = tuple(a for a in range(values.ndim) if a != axis)
    return values.max(axis=others, keepdims=True) if values.size else values


MIN_SLICE = 4  # a slice with fewer elements says too little about its scale and noise: the whole output is used


def _slice_axes(shape: tuple[int, ...]) -> list[int | None]:
    """Axes whose slices (channel: axis 1; column: last axis) are large enough to judge; None: the whole output."""
    size = int(np.prod(shape)) if shape else 1
    axes = [a for a in sorted({1, len(shape) - 1}) if len(shape) >= 2 and shape[a] and size // shape[a] >= MIN_SLICE]
    return axes or [None]


def _allowed(t64: np.ndarray, own: np.ndarray | None, rtol: float, atol_factor: float) -> np.ndarray:
    """Each element's allowed error: its own magnitude, plus its tightest slice's scale and reference noise."""
    magnitude = np.abs(t64)
    noise = np.abs(own - t64) if own is not None else np.zeros_like(t64)
    noise = np.where(np.isfinite(noise), noise, 0.0)
    bounds = []
    for axis in _slice_axes(t64.shape):
        if axis is None:
            scale, slice_noise = magnitude.max(initial=0.0), noise.max(initial=0.0)
        else:
            scale, slice_noise = _slice_max(magnitude, axis), _slice_max(noise, axis)
        bounds.append(NOISE_FACTOR * slice_noise + atol_factor * scale)
    return (
        rtol * magnitude + np.minimum.reduce(np.broadcast_arrays(*bounds))
        if len(bounds) > 1
        else (rtol * magnitude + bounds[0])
    )


def _failing_slices(over: np.ndarray) -> tuple[int, list[int]] | None:
    """The channels (axis 1), else the last-axis slices, where elements fail."""
    if over.ndim < 2 or not over.any() or _slice_axes(over.shape) == [None]:
        return None
    for axis in _slice_axes(over.shape):
        others = tuple(a for a in range(over.ndim) if a != axis)
        hit = np.flatnonzero(over.any(axis=others))
        if len(hit) < over.shape[axis]:
            return axis, [int(i) for i in hit]
    return 1, [int(i) for i in np.flatnonzero(over.any(axis=tuple(a for a in range(over.ndim) if a != 1)))]


def _check(
    got: list[np.ndarray],
    truth: list[np.ndarray],
    rtol: float,
    atol: float | None,
    atol_factor: float,
    own: list[np.ndarray] | None = None,
) -> list[OutputCheck]:
    """Compare outputs element by element (module docstring); ``atol`` given means an absolute bound.

    Args:
        got: The candidate's outputs.
        truth: The float64 truth.
        rtol: Relative tolerance.
        atol: Absolute tolerance, or None for the per-slice rule.
        atol_factor: The per-slice fraction of the slice's scale.
        own: The reference's outputs in its own dtype (its rounding noise), when known.
    """
    if len(got) != len(truth):
        raise BnfoldError(f"the candidate has {len(got)} outputs, the reference {len(truth)}")
    checks = []
    for i, (g, t) in enumerate(zip(got, truth, strict=True)):
        if np.shape(g) != np.shape(t):
            raise BnfoldError(f"output {i}: shape {np.shape(g)} differs from the reference's {np.shape(t)}")
        g64, t64 = np.asarray(g, dtype=np.float64), np.asarray(t, dtype=np.float64)
        stats = error_stats(g64, t64)
        diff = np.abs(g64 - t64)
        diff = np.where(np.isnan(diff), np.inf, diff)
        if atol is not None:
            limit = atol + rtol * np.abs(t64)
        else:
            reference = np.asarray(own[i], dtype=np.float64) if own is not None else None
            limit = _allowed(t64, reference, rtol, atol_factor)
        over = ~(diff <= limit)
        nonzero = np.abs(t64) > 0
        min_rtol = float((diff[nonzero] / np.abs(t64[nonzero])).max()) if nonzero.any() else 0.0
        if (diff[~nonzero] > 0).any():
            min_rtol = float("inf")
        worst = []
        if over.any():
            excess = np.where(over, diff / np.maximum(limit, np.finfo(np.float64).tiny), -1.0)
            for flat in np.argsort(excess, axis=None)[::-1][:5]:
                index = tuple(int(k) for k in np.unravel_index(int(flat), t64.shape))
                if over[index]:
                    worst.append((index, float(t64[index]), float(g64[index]), float(limit[index])))
        checks.append(
            OutputCheck(
                i,
                stats,
                stats.max_abs,
                min_rtol,
                not over.any(),
                failing=int(over.sum()),
                worst=worst,
                channels=_failing_slices(over),
            )
        )
    return checks


def _worst(a: list[OutputCheck] | None, b: list[OutputCheck]) -> list[OutputCheck]:
    """Keep, per output, the draw that failed, else the one with the larger error."""
    if a is None:
        return b
    return [
        x if (not x.passed, x.stats.scaled_max) >= (not y.passed, y.stats.scaled_max) else y
        for x, y in zip(a, b, strict=True)
    ]


# -- localisation ------------------------------------------------------------------------------


def _torch_intermediates(
    model: nn.Module,
    inputs: list[np.ndarray],
    float64: bool,
    skip: frozenset[str] = frozenset(),
    ignore: frozenset[str] = frozenset(),
    order: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Output of every module's first call but those in ``skip``, in completion order.

    In float64 (the model cast to double) or in the model's own dtype; each a copy (later
    in-place ops would overwrite it), kept in the dtype it ran in, so a large model's
    intermediates cost what its activations do. A module whose output is the very tensor a
    skipped module returned (a Sequential ending in a folded conv) is skipped too; those in
    ``ignore`` are neither kept nor passed through. ``order``, if
    given, receives the names of all modules (skipped ones too) in the order their first calls
    finish.
    """
    import torch

    model = copy.deepcopy(model).eval().cpu()
    if float64:
        model = model.double()
    seen: dict[str, np.ndarray] = {}
    handles = []
    finished: set[str] = set()
    # outputs of skipped modules, by identity and version: a container passing one on unchanged is skipped too (an
    # in-place activation returns the same tensor, changed: its version moved)
    skipped: dict[int, tuple[weakref.ref, int]] = {}
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod: nn.Module, args: tuple, out: object, name: str = name) -> None:
            if name in finished:
                return
            finished.add(name)
            if order is not None:
                order.append(name)
            if not isinstance(out, torch.Tensor) or name in ignore:
                return
            ref, version = skipped.get(id(out), (None, -1))
            if name in skip or (ref is not None and ref() is out and out._version == version):
                skipped[id(out)] = (weakref.ref(out), out._version)
                return
            kept = out.detach().float() if out.dtype == torch.bfloat16 else out.detach().clone()
            seen[name] = kept.numpy()

        handles.append(module.register_forward_hook(hook))
    _forward(model, inputs, handles)
    return seen


def _forward(model: nn.Module, inputs: list[np.ndarray], handles: list[Any]) -> None:
    """Run ``model`` on ``inputs`` (floats cast to its dtype) without gradients, then remove the hook ``handles``."""
    import torch

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tensors = [torch.from_numpy(np.array(x)) for x in inputs]
    tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
    try:
        with torch.no_grad():
            model(*tensors)
    finally:
        for handle in handles:
            handle.remove()


def _torch_divergence(
    reference: nn.Module, candidate: nn.Module, inputs: list[np.ndarray], rtol: float, atol_factor: float
) -> str | None:
    """First module output, among those folding leaves unchanged, where the two models differ.

    Conv/Linear outputs (and BN outputs, for folds into the following layer)
    legitimately change when BN is folded; every other module's output must not.
    Each output is judged like a final one: against float64 truth, allowing the
    reference's own float32 rounding there. The layers run between the last matching
    point and the first diverging one are named, and the diverging module is checked
    for ill-conditioning (:func:`_conditioning`).
    """
    from torch import nn

    changed_by_folding = (nn.Identity, nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)
    modules = dict(candidate.named_modules())
    # outputs folding changes are not compared: not kept either (a detector's conv outputs are most of its memory).
    # An Identity the original has too (an attention's pool) is no fold's: not compared (its parent is, and says
    # more), but what it passes on is not a folding change either.
    originals = dict(reference.named_modules())
    own_identity = frozenset(
        n for n, m in modules.items() if isinstance(m, nn.Identity) and isinstance(originals.get(n), nn.Identity)
    )
    skip = frozenset(n for n, m in modules.items() if isinstance(m, changed_by_folding)) - own_identity
    truth = _torch_intermediates(reference, inputs, float64=True, skip=skip, ignore=own_identity)
    own = _torch_intermediates(reference, inputs, float64=False, skip=skip, ignore=own_identity)
    order: list[str] = []
    got = _torch_intermediates(candidate, inputs, float64=False, skip=skip, ignore=own_identity, order=order)
    last_good, between, matched = None, [], set()
    for name in order:
        module = modules.get(name)
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            between.append(name)
        value = got.get(name)
        if value is None or name not in truth or np.shape(truth[name]) != np.shape(value):
            continue
        noise = [own[name]] if name in own and np.shape(own[name]) == np.shape(value) else None
        check = _check([value], [truth[name]], rtol, None, atol_factor, noise)[0]
        if check.passed:
            last_good, between = name, []
            matched.add(name)
            continue
        where = f"after '{last_good}'" if last_good else "from the input"
        feeding = _feeding_layers(candidate, name, matched, order)
        if feeding is not None:  # the data flow is known: the layers whose outputs reach this one
            layers = f"; layers feeding it since the last matching values: {', '.join(feeding)}" if feeding else ""
        else:
            layers = f"; layers run in between: {', '.join(between)}" if between else ""
        conditioning = _conditioning(
            reference, candidate, name, inputs, truth[name], own.get(name), check.stats.scaled_max, (rtol, atol_factor)
        ) or _exact_candidate(
            _torch_output64(candidate, name, inputs), truth[name], noise, (rtol, atol_factor), "module"
        )
        return (
            f"module '{name}' ({type(module).__name__}) {where}: max abs {check.stats.max_abs:.3g}, "
            f"{check.stats.scaled_max:.3g} of its scale{layers}{conditioning}"
        )
    return None


def _torch_output64(model: nn.Module, name: str, inputs: list[np.ndarray]) -> np.ndarray | None:
    """Output of module ``name``'s first call with ``model`` cast to float64 (its stored weights), or None."""
    import torch

    model = copy.deepcopy(model).eval().cpu().double()
    captured: list[np.ndarray] = []

    def keep(mod: nn.Module, args: tuple, out: object) -> None:
        if not captured and isinstance(out, torch.Tensor):
            captured.append(out.detach().clone().numpy())

    try:
        _forward(model, inputs, [model.get_submodule(name).register_forward_hook(keep)])
    except Exception:  # noqa: BLE001 - a model that does not run in float64 (a fixed dtype inside): no verdict
        return None
    return captured[0] if captured else None


def _exact_candidate(
    value64: np.ndarray | None,
    truth: np.ndarray,
    noise: list[np.ndarray] | None,
    tolerances: tuple[float, float],
    kind: str,
) -> str:
    """The verdict where the candidate computed in float64 passes at its first divergence, or ``""``.

    ``value64`` is the diverging value with the candidate run in float64 on its own stored weights. A wrong
    weight, bias or epsilon is wrong at any precision, and this is the same check at the same layer, so passing
    there leaves only the candidate's float32 arithmetic: folded or merged layers round in another order than the
    original's, and a model that amplifies rounding makes that a divergence. Whether that is acceptable is the
    user's call (the error stays reported); it is not a wrong fold.
    """
    if value64 is None or np.shape(value64) != np.shape(truth):
        return ""
    rtol, atol_factor = tolerances
    if not _check([np.asarray(value64, dtype=np.float64)], [truth], rtol, None, atol_factor, noise)[0].passed:
        return ""
    return (
        f"; its weights are right there: the candidate computed in float64 on its own stored weights passes at this "
        f"{kind}, so this divergence is the candidate's float32 arithmetic (folded or merged layers round in another "
        "order than the original's), not a wrong fold; check with real inputs (--inputs)"
    )


def _feeding_layers(candidate: nn.Module, name: str, matched: set[str], order: list[str]) -> list[str] | None:
    """The Conv/Linear modules whose outputs reach module ``name``'s input without passing a matching value.

    Walks the candidate's data flow (torch.fx, no run) back from ``name``'s first call and stops at modules whose
    outputs matched the truth (``matched``) and at the model's inputs: a wrong fold that makes ``name`` diverge lies
    among the layers returned, in run order (``order``). Run order alone would also name layers of parallel
    branches and miss one that ran before the last matching module but feeds this one (a block whose output is
    multiplied by an SE gate computed after it).

    Returns:
        The layers, or None when fx cannot trace the candidate or ``name`` is not one of its calls.
    """
    from torch import nn

    from bnfold.torch_fold.dataflow import trace

    try:
        flow = trace(candidate, None)
    except Exception:  # noqa: BLE001 - fx fails in many ways on user code
        return None
    start = next((c for c in flow.calls if c.op == "module" and c.target == name), None)
    if start is None:
        return None
    found: set[str] = set()
    seen: set[int] = set()
    pending = list(start.inputs)
    while pending:
        value = pending.pop()
        call = flow.producer(value)
        if value in seen or call is None:
            continue
        seen.add(value)
        if call.op == "module" and call.target in matched:
            continue
        if call.op == "module" and isinstance(flow.modules.get(call.target), nn.modules.conv._ConvNd | nn.Linear):
            found.add(call.target)
        pending.extend(call.inputs)
    rank = {n: i for i, n in enumerate(order)}
    return sorted(found, key=lambda n: rank.get(n, len(rank)))


ILL_CONDITIONED = 0.5  # the exact layer on the candidate's input is off by at least this share of the divergence


def _conditioning(
    reference: nn.Module,
    candidate: nn.Module,
    name: str,
    inputs: list[np.ndarray],
    truth: np.ndarray,
    own_out: np.ndarray | None,
    diverged: float,
    tolerances: tuple[float, float],
) -> str:
    """Whether module ``name`` turns an input within rounding into the divergence (module doc).

    The module's inputs are taken on its first call in three runs: the reference in float64
    (truth), the reference in its own dtype (its rounding noise) and the candidate. When the
    candidate's inputs pass the check against the truth (allowing the reference's noise) and the
    reference's module, run alone in float64 on the candidate's inputs, is at least
    ILL_CONDITIONED of the divergence away from the truth, the layer itself turns rounding-sized
    input differences into the divergence (a near tie in a softmax or a max, cancellation, a
    steep activation in a channel of tiny values). A wrong fold upstream shows in the inputs,
    which then fail their check; one inside the module is not in the original's module, so
    the exact evaluation does not reproduce it.

    Returns:
        A clause to append to the divergence message, or ``""``.
    """
    import torch
    from torch.utils._pytree import tree_flatten, tree_map_only

    def first_call(model: nn.Module, float64: bool) -> Any:
        model = copy.deepcopy(model).eval().cpu()
        model = model.double() if float64 else model
        captured: list[Any] = []

        def keep(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if not captured:  # copies: an in-place module overwrites its input
                captured.append(copy.deepcopy((args, kwargs)))

        _forward(model, inputs, [model.get_submodule(name).register_forward_pre_hook(keep, with_kwargs=True)])
        return captured[0] if captured else None

    def leaves(value: Any) -> list[torch.Tensor]:
        return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]

    def to64(value: Any) -> Any:
        return tree_map_only(torch.Tensor, lambda t: t.double() if t.is_floating_point() else t, value)

    try:
        calls = [first_call(reference, True), first_call(reference, False), first_call(candidate, False)]
        if any(c is None for c in calls):
            return ""
        given = calls[2]
        with torch.no_grad():
            alone = copy.deepcopy(reference.get_submodule(name)).eval().cpu()
            kernel = alone(*copy.deepcopy(given[0]), **copy.deepcopy(given[1]))
            exact = alone.double()(*to64(given[0]), **to64(given[1]))
    except Exception:  # noqa: BLE001 - a module that does not run alone, or a run that fails: no diagnosis
        return ""
    truth_in, own_in, given_in = (leaves(c) for c in calls)
    if not isinstance(exact, torch.Tensor) or tuple(exact.shape) != np.shape(truth):
        return ""
    same = isinstance(kernel, torch.Tensor) and kernel.shape == exact.shape
    where = f"in {str(kernel.dtype).removeprefix('torch.')} on CPU" if same else ""
    return _amplified(
        f"'{name}'",
        [t.numpy() for t in truth_in],
        [t.float().numpy() for t in own_in],
        [t.float().numpy() for t in given_in],
        (exact.numpy(), kernel.float().numpy() if same else None, where),
        truth,
        own_out,
        diverged,
        tolerances,
    )


def _amplified(
    label: str,
    truth_in: list[np.ndarray],
    own_in: list[np.ndarray],
    given_in: list[np.ndarray],
    alone: tuple[np.ndarray, np.ndarray | None, str],
    truth: np.ndarray,
    own_out: np.ndarray | None,
    diverged: float,
    tolerances: tuple[float, float],
) -> str:
    """The conditioning clause, or ``""``: inputs within rounding, and the original layer alone on them as far off.

    ``alone`` is the original layer run alone on the candidate's inputs: exactly (float64), in the candidate's
    dtype on its runtime, and that runtime's name. Exactly "as far off" means the layer is ill-conditioned there;
    failing only on the runtime means that runtime's kernel is inaccurate there (a fast Sigmoid's absolute error on
    a channel of tiny values). Either way the original's own layer reproduces the divergence from inputs the check
    passes, so no fold caused it. "As far off" holds element by element too: the output fails the same check as
    the candidate (allowing the original's own rounding ``own_out``), so a divergence confined to a few small
    channels (a wrong epsilon) is not excused by a large but harmless rounding spread elsewhere.
    """
    shapes = [np.shape(v) for v in truth_in]
    if not truth_in or shapes != [np.shape(v) for v in own_in] or shapes != [np.shape(v) for v in given_in]:
        return ""
    rtol, atol_factor = tolerances
    if not all(c.passed for c in _check(given_in, truth_in, rtol, None, atol_factor, own_in)):
        return ""
    truth = np.asarray(truth, dtype=np.float64)
    noise = [own_out] if own_out is not None and np.shape(own_out) == np.shape(truth) else None
    exact, kernel, runtime = alone

    def reproduces(value: np.ndarray) -> tuple[float, OutputCheck]:
        check = _check([value], [truth], rtol, None, atol_factor, noise)[0]
        error = error_stats(np.asarray(value, dtype=np.float64), truth).scaled_max
        return (error if error >= ILL_CONDITIONED * diverged and not check.passed else 0.0), check

    error = reproduces(exact)[0]
    if error:
        return (
            f"; ill-conditioned there: the candidate's input to it is within the original's own rounding, and the "
            f"original {label} evaluated exactly on that input is {error:.3g} of its scale off too, so this "
            "divergence is rounding that layer amplifies, not the fold; check with real inputs (--inputs)"
        )
    if kernel is None or np.shape(kernel) != np.shape(truth):
        return ""
    error, check = reproduces(kernel)
    if not error or not check.worst:
        return ""
    _, true_value, value, _ = check.worst[0]
    return (
        f"; its own rounding there: the candidate's input to it is within the original's own rounding, and the "
        f"original {label} run alone {runtime} on that input is {error:.3g} of its scale off too (e.g. {value:.6g} "
        f"where the truth is {true_value:.6g}), though computed exactly it passes; so this divergence is that "
        f"layer's rounding {runtime} on a rounding-sized input change, not the fold; check with real inputs (--inputs)"
    )


def _onnx_conditioning(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    name: str,
    inputs: list[np.ndarray],
    runtime: str,
    own_out: np.ndarray | None,
    diverged: float,
    tolerances: tuple[float, float],
) -> str:
    """:func:`_conditioning` for the ONNX node writing ``name``: the reference's node run alone in float64.

    Its computed inputs are compared by name (the ONNX pass keeps value names); its constant
    inputs come from the reference.
    """
    from bnfold.deploy.onnx_reference import reference_float64

    node = next((n for n in reference.graph.node if name in n.output), None)
    if node is None or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return ""
    constants = {t.name: t for t in reference.graph.initializer}
    graph_inputs = [i.name for i in reference.graph.input if i.name not in constants]
    fed = dict(zip(graph_inputs, inputs, strict=True))
    names = [i for i in dict.fromkeys(node.input) if i and i not in constants]
    computed = [i for i in names if i not in fed]
    try:
        truth_v = _onnx_intermediates(reference, [*computed, name], inputs, True, runtime)
        own_v = _onnx_intermediates(reference, computed, inputs, False, runtime) if computed else {}
        given_v = _onnx_intermediates(candidate, computed, inputs, False, runtime, keep_dtype=True) if computed else {}
        if any(i not in given_v or i not in truth_v or i not in own_v for i in computed):
            return ""
        feeds = {i: np.asarray(fed[i]) if i in fed else given_v[i] for i in names}
        alone = helper.make_model(
            helper.make_graph(
                [node],
                "alone",
                [
                    helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(v.dtype), None)
                    for i, v in feeds.items()
                ],
                [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)],
                [constants[i] for i in dict.fromkeys(node.input) if i in constants],
            ),
            opset_imports=reference.opset_import,
            ir_version=reference.ir_version,
        )
        exact = reference_float64(alone, feeds)[0]
    except Exception:  # noqa: BLE001 - a node that does not run alone (an unknown op): no diagnosis
        return ""
    try:
        out_type = helper.np_dtype_to_tensor_dtype(own_out.dtype) if own_out is not None else onnx.TensorProto.FLOAT
        alone.graph.output[0].type.tensor_type.elem_type = out_type
        kernel = np.asarray(run_onnx(alone, list(feeds.values()), runtime)[0])
    except Exception:  # noqa: BLE001 - the runtime does not run it alone: the exact verdict only
        kernel = None
    if np.shape(exact) != np.shape(truth_v[name]):
        return ""
    floats = [i for i in computed if np.issubdtype(given_v[i].dtype, np.floating)]
    return _amplified(
        f"node '{node.name or node.op_type}'",
        [truth_v[i] for i in floats],
        [own_v[i] for i in floats],
        [given_v[i] for i in floats],
        (exact, kernel, f"on {runtime}"),
        truth_v[name],
        own_out,
        diverged,
        tolerances,
    )


def _onnx_output64(model: onnx.ModelProto, name: str, inputs: list[np.ndarray], runtime: str) -> np.ndarray | None:
    """Value ``name`` with ``model`` run in float64 by the reference evaluator (its stored weights), or None."""
    try:
        return _onnx_intermediates(model, [name], inputs, True, runtime).get(name)
    except Exception:  # noqa: BLE001 - an op the float64 evaluator does not run: no verdict
        return None


def _onnx_intermediates(
    model: onnx.ModelProto,
    names: list[str],
    inputs: list[np.ndarray],
    float64: bool,
    runtime: str,
    keep_dtype: bool = False,
) -> dict[str, np.ndarray]:
    """Values ``names`` of ``model`` on ``inputs``, exposed as extra outputs.

    In float64 by the reference evaluator, else on ``runtime``; cast to float64 unless ``keep_dtype``.
    """
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    outputs = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in outputs:
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))
    all_names = [o.name for o in exposed.graph.output]
    if float64:
        from bnfold.deploy.onnx_reference import reference_float64

        graph_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        values = reference_float64(exposed, dict(zip(graph_inputs, inputs, strict=True)))
    else:
        values = _run(exposed, inputs, runtime)
    return {
        n: np.asarray(v) if keep_dtype else np.asarray(v, dtype=np.float64)
        for n, v in zip(all_names, values, strict=True)
        if n in names
    }


def _first_divergence(
    reference: nn.Module | onnx.ModelProto,
    candidate: nn.Module | onnx.ModelProto,
    inputs: list[np.ndarray],
    runtime: str,
    rtol: float,
    atol_factor: float,
) -> str | None:
    if is_module(reference) and is_module(candidate):
        return _torch_divergence(reference, candidate, inputs, rtol, atol_factor)
    if not (isinstance(reference, onnx.ModelProto) and isinstance(candidate, onnx.ModelProto)):
        return None
    # the ONNX pass keeps value names: a folded layer writes under the BN's output name
    produced = {o for n in reference.graph.node for o in n.output}
    order = [o for n in candidate.graph.node for o in n.output if o and o in produced]
    describe = {
        o: f"node '{n.name or n.op_type}' ({n.op_type}, output '{o}')" for n in candidate.graph.node for o in n.output
    }
    truth = _onnx_intermediates(reference, order, inputs, True, runtime)
    own = _onnx_intermediates(reference, order, inputs, False, runtime, keep_dtype=True)
    got = _onnx_intermediates(candidate, order, inputs, False, runtime, keep_dtype=True)
    for name in order:
        if name not in truth or name not in got or np.shape(truth[name]) != np.shape(got[name]):
            continue
        noise = [own[name]] if name in own and np.shape(own[name]) == np.shape(got[name]) else None
        check = _check([got[name]], [truth[name]], rtol, None, atol_factor, noise)[0]
        if not check.passed:
            conditioning = _onnx_conditioning(
                reference, candidate, name, inputs, runtime, own.get(name), check.stats.scaled_max, (rtol, atol_factor)
            ) or _exact_candidate(
                _onnx_output64(candidate, name, inputs, runtime),
                truth[name],
                noise,
                (rtol, atol_factor),
                "node",
            )
            return (
                f"{describe[name]}: max abs {check.stats.max_abs:.3g}, {check.stats.scaled_max:.3g} of its scale"
                f"{conditioning}"
            )
    return None


# -- the API ----------------------------------------------------------------------------------


def _as_model(value: Any, label: str) -> nn.Module | onnx.ModelProto:
    if is_module(value) or isinstance(value, onnx.ModelProto):
        return value
    if isinstance(value, str) or hasattr(value, "__fspath__"):
        from bnfold.model_io.loading import load

        return load(value)
    raise BnfoldError(f"{label}: expected a torch module, an onnx.ModelProto or a path, got {type(value).__name__}")


def _input_draws(
    reference: nn.Module | onnx.ModelProto,
    candidate: nn.Module | onnx.ModelProto,
    inputs: Any,
    input_shapes: list[tuple[int, ...]] | None,
    draws: int,
) -> list[list[np.ndarray]]:
    if inputs is not None:
        if is_tensor(inputs) or isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if isinstance(inputs, dict):
            inputs = list(inputs.values())
        return [[x.detach().cpu().numpy() if is_tensor(x) else np.asarray(x) for x in inputs]]
    if input_shapes:
        return _draws([(tuple(s), np.float32) for s in input_shapes], draws)
    onnx_model = next((m for m in (candidate, reference) if isinstance(m, onnx.ModelProto)), None)
    if onnx_model is None:
        raise BnfoldError("cannot tell the input shape of a torch model: pass inputs or input shapes (--input-shape)")
    return _draws(
        [(shape, np.float32 if np.issubdtype(dt, np.floating) else dt) for shape, dt in _onnx_input_specs(onnx_model)],
        draws,
    )


def verify(
    reference: Any,
    candidate: Any,
    inputs: Any = None,
    *,
    runtimes: tuple[str, ...] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    input_shapes: list[tuple[int, ...]] | None = None,
    draws: int = 3,
    power: bool = True,
) -> VerifyResult:
    """Check that ``candidate`` computes what ``reference`` computes.

    Args:
        reference: The original: ``nn.Module``, ``onnx.ModelProto`` or a path.
        candidate: The model to check (e.g. the folded one), same kinds.
        inputs: One set of inputs (tensor, array, list or dict); by default
            ``draws`` seeded random draws (normal, scaled and shifted, uniform).
        runtimes: Where the candidate runs; default ``torch-cpu`` for a module,
            ``ort-cpu`` for ONNX.
        rtol: Relative tolerance; default by the candidate's dtype (module doc).
        atol: Absolute tolerance; default scales with max |truth|.
        input_shapes: Input shapes for torch models when no inputs are given.
        draws: Number of random draws.
        power: Also measure what the check could catch on these inputs
            (:mod:`bnfold.deploy.verify_power`): the smallest single-layer weight
            change that fails it, and how much the output depends on the input.

    Returns:
        Per-runtime, per-output statistics and the verdict.

    Raises:
        BnfoldError: Unusable arguments, an absent runtime, mismatched outputs.
    """
    reference, candidate = _as_model(reference, "reference"), _as_model(candidate, "candidate")
    candidate_is_module = is_module(candidate)
    runtimes = tuple(runtimes or (("torch-cpu",) if candidate_is_module else ("ort-cpu",)))
    for runtime in runtimes:
        check_available(runtime)
        allowed = TORCH_RUNTIMES if candidate_is_module else ONNX_RUNTIMES
        if runtime not in allowed:
            kind = "a torch module" if candidate_is_module else "an ONNX model"
            raise BnfoldError(f"runtime {runtime} cannot run {kind}; choose from {', '.join(allowed)}")
    dtype = _dtype_of(candidate)
    default_rtol, atol_factor = TOLERANCES.get(dtype, TOLERANCES["float32"])
    rtol = default_rtol if rtol is None else rtol
    batches = _input_draws(reference, candidate, inputs, input_shapes, draws)
    own_runtime = "torch-cpu" if is_module(reference) else "ort-cpu"
    notes: list[str] = []
    # the reference also runs on each candidate runtime it can run on: its rounding there (TF32 convolutions on
    # a GPU, another runtime's kernels) is noise the candidate may show too. A module reference of an ONNX
    # candidate runs there as its own export (BN kept): the exporter's ops and ONNX Runtime's kernels round it
    same_kind = TORCH_RUNTIMES if is_module(reference) else ONNX_RUNTIMES
    also_here = [r for r in runtimes if r != own_runtime and r in same_kind]
    twin = _exported_twin(reference, batches[0], notes) if is_module(reference) and not candidate_is_module else None
    if twin is not None:
        also_here = list(runtimes)
    twin_refused = False
    results: dict[str, list[OutputCheck] | None] = {r: None for r in runtimes}
    reference_here: dict[str, list[OutputCheck] | None] = {r: None for r in also_here}
    reference_error: list[OutputCheck] | None = None
    failing_batch: dict[str, list[np.ndarray]] = {}
    first: tuple[list[np.ndarray], list[np.ndarray]] | None = None
    for batch in batches:
        truth = _truth(reference, batch)
        own = _run(reference, batch, own_runtime)
        first = first or (truth, own)
        reference_error = _worst(reference_error, _check(own, truth, rtol, atol, atol_factor, own))
        for runtime in runtimes:
            noise = own
            if runtime in reference_here:
                here = _run(twin if twin is not None else reference, batch, runtime)
                usable = [np.shape(h) for h in here] == [np.shape(o) for o in own]
                if usable and twin is not None:
                    # the export must itself match the module within the module's own rounding: a trace that
                    # froze a branch or a numpy call into a constant would otherwise widen the allowance
                    usable = all(c.passed for c in _check(here, truth, rtol, atol, atol_factor, own))
                    twin_refused = twin_refused or not usable
                if usable:
                    reference_here[runtime] = _worst(
                        reference_here[runtime], _check(here, truth, rtol, atol, atol_factor, here)
                    )
                    noise = _noisier(own, here, truth)
            checks = _check(_run(candidate, batch, runtime), truth, rtol, atol, atol_factor, noise)
            if not all(c.passed for c in checks):
                failing_batch.setdefault(runtime, batch)
            results[runtime] = _worst(results[runtime], checks)
    if twin is not None:
        notes.append(
            "the reference also ran on the candidate's runtime as its own ONNX export (BN kept); its rounding there "
            "counts as noise"
            + (
                ""
                if not twin_refused
                else "; on some draws the export itself is off the module beyond the module's own rounding, so a "
                "mismatch there may be the exporter's or ONNX Runtime's rather than the fold's (the export's "
                "rounding is not counted on those draws)"
            )
        )
    own_worst = max((o.stats.scaled_max for o in reference_error or []), default=0.0)
    if own_worst > ROUNDING_DOMINATES:
        notes.append(
            f"the reference itself, in its own dtype, is {own_worst:.2g} of the output's scale away from float64 on "
            "these inputs: its outputs are dominated by rounding (random weights or unnormalised activations "
            "amplify it), so a mismatch here may not be the candidate's; check with real inputs (--inputs)"
        )
    checks_by_runtime = []
    for runtime in runtimes:
        outputs = results[runtime] or []
        passed = all(o.passed for o in outputs)
        divergence = None
        if not passed:
            divergence = _first_divergence(reference, candidate, failing_batch[runtime], runtime, rtol, atol_factor)
            if divergence is None:
                notes.append(
                    "no layer could be singled out (the two models are in different formats, or only the "
                    "final outputs diverge)"
                )
        checks_by_runtime.append(RuntimeCheck(runtime, passed, outputs, divergence, reference_here.get(runtime)))
    measured = None
    if power and first is not None:
        measured = _power(reference, batches[0], first, own_runtime, (rtol, atol, atol_factor), notes)
    return VerifyResult(
        passed=all(r.passed for r in checks_by_runtime),
        dtype=dtype,
        rtol=rtol,
        atol=atol if atol is not None else atol_factor,
        atol_scaled=atol is None,
        draws=len(batches),
        runtimes=checks_by_runtime,
        reference_error=reference_error or [],
        notes=notes,
        power=measured,
    )


def _exported_twin(reference: nn.Module, batch: list[np.ndarray], notes: list[str]) -> onnx.ModelProto | None:
    """The reference module exported to ONNX with its BN kept, to run on an ONNX candidate's runtime, or None.

    The candidate (a folded export) rounds like an export on ONNX Runtime, not like the module in torch; the
    reference's export shows how much of that is the exporter's and the runtime's, which a fold did not cause.
    It is used only on draws where it matches the module within the module's own rounding.
    """
    import torch

    from bnfold.deploy.export import export_keeping_bn

    try:
        example = tuple(torch.from_numpy(np.array(x)) for x in batch)
        return export_keeping_bn(copy.deepcopy(reference), example, dynamic_batch=False)
    except Exception as error:  # noqa: BLE001 - a model neither exporter takes: only its torch rounding counts
        notes.append(
            f"the reference could not be exported to ONNX to run on the candidate's runtime "
            f"({type(error).__name__}): only its rounding in torch counts as noise"
        )
        return None


def _fresh_like(batch: list[np.ndarray]) -> list[np.ndarray]:
    """An independent input of the same shapes and dtypes (integers drawn from the range the batch uses)."""
    rng = np.random.default_rng(2**31 - 1)
    fresh = []
    for x in batch:
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            fresh.append(rng.standard_normal(x.shape).astype(x.dtype))
        elif np.issubdtype(x.dtype, np.integer) and x.size:
            fresh.append(rng.integers(int(x.min()), int(x.max()) + 1, x.shape).astype(x.dtype))
        else:
            fresh.append(x.copy())
    return fresh


def _power(
    reference: nn.Module | onnx.ModelProto,
    batch: list[np.ndarray],
    outputs: tuple[list[np.ndarray], list[np.ndarray]],
    runtime: str,
    tolerances: tuple[float, float | None, float],
    notes: list[str],
) -> Power | None:
    """The check's power on ``batch`` and the reference's input dependence (a note when it is near zero).

    Args:
        reference: The reference model.
        batch: The input the changes are judged on.
        outputs: The float64 truth and the reference's own outputs on ``batch``.
        runtime: Where the reference and its changed copies run.
        tolerances: ``(rtol, atol, atol_factor)`` as in :func:`_check`.
        notes: Receives the warning when the output hardly depends on the input.
    """
    truth, own = outputs
    rtol, atol, atol_factor = tolerances

    def caught(changed: nn.Module | onnx.ModelProto) -> bool:
        return not all(c.passed for c in _check(_run(changed, batch, runtime), truth, rtol, atol, atol_factor, own))

    try:
        result = measure_power(reference, caught)
    except Exception as error:  # noqa: BLE001 - a model that cannot be copied or changed: the verdict stands
        notes.append(f"power not measured: a changed copy of the reference could not be run ({first_line(error)})")
        return None
    dependence = input_dependence(own, _run(reference, _fresh_like(batch), runtime))
    result.input_dependence = dependence
    if dependence < INDEPENDENT_BELOW:
        notes.append(
            f"the output hardly depends on the input (two independent inputs give outputs {dependence:.2g} apart, "
            "relative to their size): this check mostly saw the model's constants; pass real inputs "
            "(--inputs x.npz) or another input distribution"
        )
    return result
