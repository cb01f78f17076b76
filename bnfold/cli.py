"""The ``bnfold`` command line: parse arguments, call the API, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import torch

from bnfold import zoo
from bnfold.checkpoint import build_arch, load_into, load_state_dict, save_folded
from bnfold.compare import fold_error
from bnfold.errors import BnfoldError
from bnfold.formats import detect_format
from bnfold.io import atomic_write, check_output
from bnfold.onnx_fold import fold_onnx, save_onnx
from bnfold.torch_fold import fold as fold_model

__all__ = ["main"]


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``1,3,224,224`` into a shape.

    Raises:
        BnfoldError: Not a comma-separated list of positive integers.

    """
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise BnfoldError(f"--input-shape {text!r}: expected positive integers such as 1,3,224,224")
    return shape


def _arch_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise BnfoldError(f"--arch-kwargs: not JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise BnfoldError("--arch-kwargs: expected a JSON object")
    return value


def _example_inputs(arch: str, shapes: tuple[str, ...]) -> tuple[torch.Tensor, ...] | None:
    if shapes:
        generator = torch.Generator().manual_seed(0)
        return tuple(torch.randn(parse_shape(s), generator=generator) for s in shapes)
    if arch in zoo.ZOO:
        return (zoo.example_input(arch),)
    return None


def _load_model(path: str, arch: str | None, arch_kwargs: str | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    if not arch:
        raise BnfoldError(f"{path}: a state_dict needs --arch (a zoo name or package.module:callable)")
    kwargs = _arch_kwargs(arch_kwargs)
    state = load_state_dict(path)
    model = build_arch(arch, kwargs)
    return load_into(model, state, path).eval(), kwargs


def _emit(ctx_json: bool, quiet: bool, payload: dict[str, Any], text: str) -> None:
    if ctx_json:
        click.echo(json.dumps(payload, indent=2))
    elif not quiet:
        click.echo(text)


class _Group(click.Group):
    """Turns a :class:`BnfoldError` into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BnfoldError as error:
            click.echo(f"bnfold: error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("bnfold: interrupted; no output was written", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnfold")
def main() -> None:
    """Fold BatchNorm into neighbouring Conv/Linear layers, with a report for every BN."""


_arch_option = click.option("--arch", help="Zoo name (see `bnfold zoo`) or package.module:callable.")
_kwargs_option = click.option("--arch-kwargs", help="JSON object of keyword arguments for --arch.")
_shape_option = click.option(
    "--input-shape", "input_shapes", multiple=True, help="Input shape such as 1,3,224,224; repeat for more inputs."
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


_allow_option = click.option(
    "--allow-initializer-inputs",
    is_flag=True,
    help="ONNX: treat initializers listed as graph inputs as constants (and drop them from the inputs).",
)


def _fold_torch(checkpoint: str, arch: str | None, arch_kwargs: str | None, input_shapes: tuple[str, ...]):  # noqa: ANN202
    model, kwargs = _load_model(checkpoint, arch, arch_kwargs)
    inputs = _example_inputs(arch or "", input_shapes)
    folded, report = fold_model(model, inputs)
    return model, kwargs, inputs, folded, report


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the folded model here (.pt or .onnx).")
@_arch_option
@_kwargs_option
@_shape_option
@_allow_option
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the fold report as JSON.")
@click.option("--force", is_flag=True, help="Replace existing output files.")
@_json_option
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
def fold(
    model_path: str,
    output: str | None,
    arch: str | None,
    arch_kwargs: str | None,
    input_shapes: tuple[str, ...],
    allow_initializer_inputs: bool,
    report_path: str | None,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Fold every foldable BN of MODEL: an ONNX file, or a state_dict plus --arch."""
    for target in (output, report_path):
        if target:
            check_output(target, force=force, inputs=[model_path])
    kind = detect_format(model_path)
    suffix = Path(output).suffix if output else ""
    wanted = (".onnx",) if kind == "onnx" else (".pt", ".pth")
    if output and suffix not in wanted:
        raise BnfoldError(f"{output}: a {kind} input is written as {' or '.join(wanted)}, not {suffix or 'no suffix'}")
    payload: dict[str, Any] = {}
    lines: list[str] = []
    if kind == "onnx":
        folded_proto, report = fold_onnx(model_path, allow_initializer_inputs=allow_initializer_inputs)
        lines.append(str(report))
        if output:
            save_onnx(folded_proto, output)
    else:
        model, kwargs, inputs, folded, report = _fold_torch(model_path, arch, arch_kwargs, input_shapes)
        lines.append(str(report))
        if inputs is not None:
            stats = fold_error(model, folded, inputs)
            payload["error"] = stats.to_dict()
            lines.append(
                f"max error vs the float64 original: {stats.scaled_max:.3g} of the output scale "
                f"(max abs {stats.max_abs:.3g})"
            )
        if output:
            save_folded(output, folded, report, arch or "", kwargs)
    payload["report"] = report.to_dict()
    if output:
        payload["output"] = output
        lines.append(f"wrote {output}")
    if report_path:
        atomic_write(report_path, lambda tmp: tmp.write_text(report.to_json() + "\n"))
        lines.append(f"wrote {report_path}")
    _emit(as_json, quiet, payload, "\n".join(lines))


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@_arch_option
@_kwargs_option
@_shape_option
@_allow_option
@_json_option
def inspect(
    model_path: str,
    arch: str | None,
    arch_kwargs: str | None,
    input_shapes: tuple[str, ...],
    allow_initializer_inputs: bool,
    as_json: bool,
) -> None:
    """List every BN of MODEL and whether (or why not) it would fold. Writes nothing."""
    if detect_format(model_path) == "onnx":
        _, report = fold_onnx(model_path, allow_initializer_inputs=allow_initializer_inputs)
    else:
        report = _fold_torch(model_path, arch, arch_kwargs, input_shapes)[-1]
    _emit(as_json, False, report.to_dict(), str(report))


@main.command(name="zoo")
def zoo_command() -> None:
    """List the built-in architectures."""
    for name, entry in zoo.ZOO.items():
        shape = ",".join(str(d) for d in entry.input_shape)
        click.echo(f"{name:<15} input N,{shape:<10} {entry.description}")


@main.command()
@click.option("--arch", default=None, help="One zoo model instead of all of them.")
@_json_option
def demo(arch: str | None, as_json: bool) -> None:
    """Fold the zoo models (random non-trivial BN statistics) and print reports and measured errors."""
    from bnfold.demo import run_demo

    result = run_demo([arch] if arch else list(zoo.ZOO))
    _emit(as_json, False, result.to_dict(), result.text)
