"""One command, the whole path: load, fold, export, verify, benchmark, with a summary."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from bnfold.affine import float64
from bnfold.deploy.verify import VerifyResult, verify
from bnfold.errors import BnfoldError, first_line
from bnfold.lazy import is_script_module, is_tensor
from bnfold.model_io.loading import Loaded, load_detailed
from bnfold.model_io.outputs import atomic_write
from bnfold.onnx_fold import fold_onnx, save_onnx
from bnfold.onnx_fold.files import Scratch, keeps_data_apart, uses_external_data
from bnfold.report import FoldReport

if TYPE_CHECKING:  # the torch half is imported only for torch models: ONNX jobs never load torch
    import torch
    from torch import nn

    from bnfold.deploy.ab import ABResult

__all__ = ["OUTPUT_SUFFIXES", "PipelineResult", "run_pipeline", "summary_text"]

OUTPUT_SUFFIXES = (".onnx", ".pt", ".pth", ".pt2", ".safetensors")


@dataclasses.dataclass
class PipelineResult:
    """Everything one ``bnfold fold`` run did.

    Attributes:
        input_format: What the input file was.
        report: The fold report.
        onnx_report: The second sweep over an ONNX export, when there was one.
        output: The file written, if any.
        checks: Verification per result checked (``torch``: the folded module, ``onnx``: the ONNX file).
        ab: Original vs folded latency, when benchmarked.
        bn_left_in_output: BatchNormalization nodes in an ONNX output.
        notes: Anything else a user should know.
    """

    input_format: str
    report: FoldReport
    onnx_report: FoldReport | None = None
    output: str | None = None
    checks: dict[str, VerifyResult] = dataclasses.field(default_factory=dict)
    ab: ABResult | None = None
    bn_left_in_output: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        """False only when verification ran and failed."""
        return all(check.passed for check in self.checks.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the fold report's keys (``bn_total``, ``layers``, ...) plus what else ran."""
        verify = {"passed": self.passed, **{k: c.to_dict() for k, c in self.checks.items()}} if self.checks else None
        bench = None
        if self.ab is not None:
            bench = {
                "ab": self.ab.to_dict(),
                "compare": {"rows": [r.to_dict() for r in self.ab.rows], "text": str(self.ab)},
            }
        return {
            **self.report.to_dict(),
            "input_format": self.input_format,
            "onnx_report": self.onnx_report.to_dict() if self.onnx_report else None,
            "output": self.output,
            "bn_left_in_output": self.bn_left_in_output,
            "verify": verify,
            "bench": bench,
            "notes": list(self.report.notes) + list(self.notes),
        }


def _inputs(loaded: Loaded, shapes: list[tuple[int, ...]] | None) -> tuple[torch.Tensor, ...] | None:
    shapes = shapes or ([loaded.input_shape] if loaded.input_shape else None)
    if not shapes:
        return None
    import torch

    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=generator) for s in shapes)


def _check_inputs(model: nn.Module, inputs: tuple[torch.Tensor, ...] | None, source: str) -> None:
    if inputs is None:
        return
    import torch

    try:
        with torch.no_grad():
            model.eval()(*inputs)
    except Exception as error:  # noqa: BLE001 - the model decides what it accepts
        shapes = ", ".join(",".join(str(d) for d in x.shape) for x in inputs)
        first = first_line(error)
        raise BnfoldError(f"{source}: the model rejects input shape {shapes}: {first}") from None


def _check_statistics(model: nn.Module | onnx.ModelProto, source: str) -> None:
    """Refuse statistics no BN can have (a damaged or mis-converted checkpoint), naming the BN."""
    if isinstance(model, onnx.ModelProto):
        from bnfold.onnx_fold.tensors import decode

        values = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "BatchNormalization" and len(node.input) == 5 and node.input[4] in values:
                var = decode(values[node.input[4]], source).astype("float64")
                _check_var(var, f"{source}: BatchNormalization '{node.name or node.output[0]}'")
        return
    for name, module in model.named_modules():
        var = getattr(module, "running_var", None)
        mean = getattr(module, "running_mean", None)
        if is_tensor(var) and is_tensor(mean):
            _check_var(float64(var), f"{source}: {name or 'the model'}")
            if not np.isfinite(float64(mean)).all():
                raise BnfoldError(f"{source}: {name} has a non-finite running_mean")


def _check_var(var: np.ndarray, where: str) -> None:
    if not np.isfinite(var).all():
        raise BnfoldError(f"{where} has a non-finite running_var")
    if (var < 0).any():
        raise BnfoldError(f"{where} has a negative running_var")


def _check_output_kind(loaded: Loaded, out: Path) -> None:
    """Refuse, before any work, an output format that cannot hold what was loaded."""
    scripted = is_script_module(loaded.model)
    if isinstance(loaded.model, onnx.ModelProto):
        if out.suffix != ".onnx":
            raise BnfoldError(f"{out}: an ONNX input is written as .onnx")
    elif scripted and out.suffix == ".pt2":
        raise BnfoldError(f"{out}: a TorchScript model cannot be written as .pt2 (torch.export takes no ScriptModule)")
    elif out.suffix in (".pt", ".pth") and not loaded.arch and not scripted:
        raise BnfoldError(f"{out}: a .pt output needs the architecture (--arch); write .onnx or .pt2 instead")
    elif out.suffix == ".safetensors" and not loaded.arch:
        raise BnfoldError(f"{out}: a .safetensors output needs the architecture (--arch)")


def _save_torch(output: Path, folded: nn.Module, report: FoldReport, loaded: Loaded, inputs: tuple | None) -> None:
    import torch

    from bnfold.model_io.checkpoint import save_folded

    suffix = output.suffix
    if suffix in (".pt", ".pth"):
        if is_script_module(folded):
            atomic_write(output, lambda tmp: torch.jit.save(folded, str(tmp)))
            return
        if not loaded.arch:
            raise BnfoldError(f"{output}: a .pt output needs the architecture (--arch); write .onnx or .pt2 instead")
        save_folded(output, folded, report, loaded.arch, loaded.arch_kwargs)
    elif suffix == ".pt2":
        if inputs is None:
            raise BnfoldError(f"{output}: a .pt2 output needs an input shape (--input-shape)")
        program = torch.export.export(folded, inputs)
        atomic_write(output, lambda tmp: torch.export.save(program, str(tmp)))
    elif suffix == ".safetensors":
        from safetensors.torch import save_file

        if not loaded.arch:
            raise BnfoldError(f"{output}: a .safetensors output needs the architecture (--arch)")
        meta = {
            "format": "bnfold.folded/1",
            "arch": loaded.arch,
            "arch_kwargs": json.dumps(loaded.arch_kwargs),
            "replaced": json.dumps({e.name: e.kind for e in report.layers if e.folded}),
        }
        state = {k: v.detach().contiguous() for k, v in folded.state_dict().items()}
        atomic_write(output, lambda tmp: save_file(state, str(tmp), metadata=meta))


def run_pipeline(
    path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_shapes: list[tuple[int, ...]] | None = None,
    unsafe_pickle: bool = False,
    trust_arch: bool = False,
    allow_initializer_inputs: bool = False,
    merge_branches: bool = True,
    do_verify: bool = False,
    do_bench: bool = False,
    simplify: bool = False,
    bench_iterations: int = 50,
    stage: Callable[[str], None] = lambda message: None,
    verify_options: dict[str, Any] | None = None,
    bench_options: dict[str, Any] | None = None,
) -> PipelineResult:
    """Load ``path``, fold it, write ``output`` (format from its suffix), verify and benchmark.

    Args:
        path: Any file :func:`bnfold.load` reads.
        output: ``.onnx`` (fold, export, second ONNX sweep), ``.pt``, ``.pt2`` or ``.safetensors``.
        arch: Architecture for bare weights.
        arch_kwargs: Its keyword arguments.
        input_shapes: Input shapes where the file does not say.
        unsafe_pickle: Allow whole pickled modules (runs code from the file).
        trust_arch: Build the code a bnfold file's recipe names (see :func:`bnfold.load`).
        allow_initializer_inputs: See :func:`bnfold.fold_onnx`.
        merge_branches: Merge parallel branches in ONNX graphs (the input's or the export's), see
            :func:`bnfold.fold_onnx`.
        do_verify: Compare the result with the original against float64.
        do_bench: Time the original and the result.
        simplify: Run onnx-simplifier on an ONNX output (kept only if it verifies).
        bench_iterations: Timed calls per measurement (unless ``bench_options`` says).
        verify_options: ``runtimes``, ``rtol``, ``atol``, ``inputs`` for :func:`bnfold.deploy.verify`
            (runtimes that cannot run a model are left out for it).
        bench_options: ``runtimes``, ``batch_sizes``, ``warmup``, ``iterations`` for :func:`bnfold.benchmark`.
        stage: Called with a short message as each stage starts.

    Returns:
        What was done; ``passed`` is False when verification failed.

    Raises:
        BnfoldError: Any user-fixable problem, before anything is written.
    """
    options = _Options(
        _verify_kwargs(verify_options),
        {"iterations": bench_iterations, "progress": False, **(bench_options or {})},
        input_shapes,
        do_verify,
        do_bench,
        simplify,
        stage,
        merge_branches,
    )
    out = Path(output) if output else None
    if out is not None and out.suffix not in OUTPUT_SUFFIXES:
        raise BnfoldError(
            f"{out}: unsupported output suffix {out.suffix or '(none)'}; use {', '.join(OUTPUT_SUFFIXES)}"
        )
    stage("load")
    # an ONNX file is folded and saved here: its weights can stay in the file until then
    loaded = load_detailed(path, arch, arch_kwargs, unsafe_pickle=unsafe_pickle, trust_arch=trust_arch, lazy_onnx=True)
    if out is not None:
        _check_output_kind(loaded, out)
    if not is_script_module(loaded.model):
        _check_statistics(loaded.model, str(path))
    if isinstance(loaded.model, onnx.ModelProto):
        return _run_onnx(loaded, str(path), out, options, allow_initializer_inputs)
    return _run_torch(loaded, str(path), out, options)


@dataclasses.dataclass
class _Options:
    """What to do after the fold, shared by the ONNX and the PyTorch path."""

    verify: dict[str, Any]
    bench: dict[str, Any]
    input_shapes: list[tuple[int, ...]] | None
    do_verify: bool
    do_bench: bool
    simplify: bool
    stage: Callable[[str], None]
    merge_branches: bool


def _run_onnx(
    loaded: Loaded, path: str, out: Path | None, options: _Options, allow_initializer_inputs: bool
) -> PipelineResult:
    """ONNX in, ONNX out: the ONNX pass, then verify and bench against the input model."""
    if out is not None and out.suffix != ".onnx":
        raise BnfoldError(f"{out}: an ONNX input is written as .onnx")
    options.stage("fold (ONNX pass)")
    # a model whose weights stay on disk: its folded weights go to a file beside the output, not to memory
    scratch = Scratch(out.parent, out.name) if out is not None and uses_external_data(loaded.model) else None
    try:
        input_external = keeps_data_apart(loaded.model)
        # the original is needed again only to verify or benchmark against: otherwise fold it in place
        folded, report = fold_onnx(
            loaded.model,
            allow_initializer_inputs=allow_initializer_inputs,
            copy=options.do_verify or options.do_bench,
            merge_branches=options.merge_branches,
            scratch=scratch,
        )
    except BnfoldError as error:
        raise BnfoldError(f"{path}: {error}") from None
    result = PipelineResult(loaded.format, report)
    if out is not None:
        # an input that kept its weights as external data gets an output that does too
        save_onnx(folded, out, external_data=True if input_external else None, scratch=scratch)
        result.output = str(out)
        result.bn_left_in_output = _bn_nodes(folded)
    if options.do_verify:
        options.stage("verify")
        kwargs = _for(options.verify, onnx=True)
        result.checks["onnx"] = verify(loaded.model, folded, input_shapes=options.input_shapes, **kwargs)
    if options.do_bench:
        options.stage("bench")
        shape = options.input_shapes[0] if options.input_shapes else None
        result.ab = _bench_ab(loaded.model, folded, shape, options.bench, onnx=True)
    return result


def _run_torch(loaded: Loaded, path: str, out: Path | None, options: _Options) -> PipelineResult:
    """A PyTorch model in: the PyTorch pass, the output written (export + ONNX sweep for .onnx), verify, bench."""
    from bnfold.torch_fold import fold as fold_torch
    from bnfold.torch_fold.torchscript import fold_torchscript

    model = loaded.model
    inputs = _inputs(loaded, options.input_shapes)
    for flag, wanted in (
        ("--verify", options.do_verify),
        ("--bench", options.do_bench),
        (str(out), out and out.suffix in (".onnx", ".pt2")),
    ):
        if wanted and inputs is None:
            raise BnfoldError(f"{flag} needs an input shape (--input-shape 1,3,224,224); nothing was written")
    _check_inputs(model, inputs, path)
    options.stage("fold (PyTorch pass)")
    if is_script_module(model):
        folded, report = fold_torchscript(model)
    else:
        # a .pt / .safetensors output is the architecture's own state_dict: merged blocks would not load into it
        merge = options.merge_branches and (out is None or out.suffix in (".onnx", ".pt2"))
        folded, report = fold_torch(model, inputs, merge_branches=merge)
    result = PipelineResult(loaded.format, report)
    exported = _write_torch_result(result, out, folded, loaded, inputs, options) if out is not None else None
    if options.do_verify:
        options.stage("verify")
        shapes = [tuple(x.shape) for x in inputs]
        result.checks["torch"] = verify(model, folded, input_shapes=shapes, **_for(options.verify, onnx=False))
        if exported is not None:
            result.checks["onnx"] = verify(model, exported, input_shapes=shapes, **_for(options.verify, onnx=True))
    if options.do_bench:
        options.stage("bench")
        result.ab = _bench_torch(result, model, folded, exported, loaded, inputs, options)
    return result


def _write_torch_result(
    result: PipelineResult,
    out: Path,
    folded: nn.Module,
    loaded: Loaded,
    inputs: tuple | None,
    options: _Options,
) -> onnx.ModelProto | None:
    """Write the folded model to ``out``; for ``.onnx``, export it and return the exported model."""
    from bnfold.deploy.export import export_onnx

    result.output = str(out)
    if out.suffix != ".onnx":
        options.stage("write")
        _save_torch(out, folded, result.report, loaded, inputs)
        return None
    options.stage("export + ONNX sweep")
    exported = export_onnx(folded, inputs, out, simplify=options.simplify, merge_branches=options.merge_branches)
    result.onnx_report = exported.onnx_report
    result.notes += [f"exported with the {exported.exporter} exporter, opset {exported.opset}", *exported.notes]
    model = onnx.load(str(out))
    result.bn_left_in_output = _bn_nodes(model)
    return model


def _bench_torch(
    result: PipelineResult,
    model: nn.Module,
    folded: nn.Module,
    exported: onnx.ModelProto | None,
    loaded: Loaded,
    inputs: tuple,
    options: _Options,
) -> ABResult:
    """The original against the folded module, or against the ONNX export when one was written."""
    from bnfold.deploy.export import export_keeping_bn

    shape = tuple(inputs[0].shape)
    bench = dict(options.bench)
    if loaded.format == "torch-export" and not bench.get("batch_sizes"):
        bench["batch_sizes"] = (shape[0],)  # a torch.export program runs the shapes it was exported with
    if exported is None:
        return _bench_ab(model, folded, shape, bench, onnx=False)
    original = export_keeping_bn(model, inputs)
    result.notes.append("bench baseline: the original exported by the TorchScript exporter with every BN kept")
    return _bench_ab(original, exported, shape, bench, onnx=True)


def _bench_ab(
    before: nn.Module | onnx.ModelProto,
    after: nn.Module | onnx.ModelProto,
    shape: tuple[int, ...] | None,
    options: dict[str, Any],
    *,
    onnx: bool,
) -> ABResult:
    """Original vs folded in interleaved rounds with a bootstrap interval (:func:`bnfold.deploy.ab.compare_models`)."""
    from bnfold.deploy.ab import compare_models

    options = {k: v for k, v in _for(options, onnx=onnx).items() if k != "progress" and v is not None}
    return compare_models(before, after, input_shape=shape, **options)


def _verify_kwargs(options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(options or {})
    unknown = set(options) - {"runtimes", "rtol", "atol", "inputs", "power"}
    if unknown:
        raise BnfoldError(f"unknown verify option(s): {', '.join(sorted(unknown))}")
    return options


def _for(options: dict[str, Any], *, onnx: bool) -> dict[str, Any]:
    """The options with only the runtimes that can run this kind of model (None: that kind's default)."""
    from bnfold.deploy.runtimes import ONNX_RUNTIMES, TORCH_RUNTIMES

    result = dict(options)
    if "runtimes" in result:
        allowed = ONNX_RUNTIMES if onnx else TORCH_RUNTIMES
        result["runtimes"] = tuple(r for r in result["runtimes"] or () if r in allowed) or None
    return result


def _bn_nodes(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def summary_text(result: PipelineResult, *, summary: bool = False) -> str:
    """The final summary a person reads (``summary``: counts by outcome and reason, not one row per BN)."""
    lines = [result.report.render(summary=summary)]
    if result.onnx_report is not None:
        sweep = result.onnx_report
        if sweep.bn_total:
            lines += ["second sweep over the ONNX export:", sweep.render(summary=summary)]
        else:
            lines.append("second sweep over the ONNX export: no BatchNormalization left by the exporter")
    if result.output:
        lines.append(f"wrote {result.output}")
    if result.bn_left_in_output is not None:
        lines.append(f"BatchNormalization nodes in {result.output}: {result.bn_left_in_output}")
    for key, check in result.checks.items():
        lines += _check_lines(key, check)
    if result.ab is not None:
        lines.append(str(result.ab))
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _check_lines(key: str, check: VerifyResult) -> list[str]:
    """The verdict of one verification, its first divergence, power and notes."""
    worst = max(o.stats.scaled_max for r in check.runtimes for o in r.outputs)
    own = max((o.stats.scaled_max for o in check.reference_error), default=0.0)
    verdict = "pass" if check.passed else "MISMATCH"
    lines = [
        f"verify ({key}): {verdict}; max error {worst:.3g} of output scale vs float64 "
        f"(the original in its own dtype: {own:.3g})"
    ]
    lines += [f"  first divergence: {r.first_divergence}" for r in check.runtimes if r.first_divergence]
    if check.power is not None:
        lines.append(f"  {check.power.describe()}")
    return lines + [f"  note: {n}" for n in check.notes]
