"""The ``bnfold`` command line: parse arguments, call the API, print."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from bnfold.errors import BnfoldError, first_line
from bnfold.model_io.outputs import atomic_write, check_output, check_outputs

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


def _emit(ctx_json: bool, quiet: bool, payload: dict[str, Any], text: str) -> None:
    if ctx_json:
        click.echo(json.dumps(payload, indent=2))
    elif not quiet:
        click.echo(text)


EXIT_CODES = """\b
Exit status: 0 success; 1 verification mismatch (and nothing else);
2 bad input, usage or environment (unreadable file, cannot write,
disk full, missing runtime); 3 internal error (a bug: --debug shows
the traceback)."""


@contextlib.contextmanager
def signal_handlers() -> Iterator[None]:
    """While a command runs, SIGTERM (and SIGHUP) end it through the normal error path: no temporary file is left.

    The previous handlers come back when the command returns, so a program that runs commands in-process (a test
    runner, a pipeline) keeps its own.
    """
    import signal

    def terminated(signum: int, _frame: object) -> None:
        raise BnfoldError(f"terminated by {signal.Signals(signum).name}; no partial file is left")

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            try:
                previous[name] = signal.signal(getattr(signal, name), terminated)
            except ValueError:  # not the main thread (an embedding program): leave its handlers alone
                break
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


class _Group(click.Group):
    """Maps every outcome to the exit-code contract: one line on stderr, never a traceback unless --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        if not debug:  # libraries' deprecation notices are not the user's business; --debug shows them
            import warnings

            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category)
        try:
            with signal_handlers():
                return super().invoke(ctx)
        except BnfoldError as error:
            click.echo(f"bnfold: error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("bnfold: interrupted; no output was written", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("bnfold: error: out of memory; nothing was written", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001 - the contract: anything else is a bug, exit 3
            if debug:
                import traceback

                traceback.print_exc()
            first = first_line(error, 200)
            hint = "" if debug else "; run again with --debug for the traceback"
            click.echo(
                f"bnfold: internal error (a bug, please report it): {type(error).__name__}: {first}{hint}", err=True
            )
            sys.exit(3)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(package_name="bnfold")
@click.option("--debug", is_flag=True, help="Show the traceback of an internal error.")
def main(debug: bool) -> None:
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
_merge_option = click.option(
    "--no-merge",
    is_flag=True,
    help="Do not merge parallel branches summed into one conv (RepVGG / MobileOne / ACNet blocks) in ONNX graphs.",
)
_unsafe_option = click.option(
    "--unsafe-pickle",
    is_flag=True,
    help="Allow files whose loading RUNS CODE from them (pickled modules, TorchScript, torch.export .pt2). "
    "Only for files you trust.",
)
_trust_option = click.option(
    "--trust-arch",
    is_flag=True,
    help="Build the package.module:callable that a bnfold checkpoint names (IMPORTS AND RUNS that code). "
    "Without it such a file needs --arch naming the same code; zoo architectures need neither.",
)


def _shapes(texts: tuple[str, ...]) -> list[tuple[int, ...]] | None:
    return [parse_shape(t) for t in texts] or None


def _stage(quiet: bool) -> Callable[[str], None]:
    def report(message: str) -> None:
        if not quiet:
            click.echo(f"bnfold: {message}...", err=True)

    return report


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output: .onnx, .pt, .pt2 or .safetensors.")
@_arch_option
@_kwargs_option
@_shape_option
@_allow_option
@_merge_option
@_unsafe_option
@_trust_option
@click.option("--verify", "do_verify", is_flag=True, help="Check the result against the original in float64.")
@click.option("--bench", "do_bench", is_flag=True, help="Time the original and the result.")
@click.option(
    "--runtime", "runtimes", multiple=True, help="For --verify/--bench: torch-cpu, ort-cpu, ort-cpu-opt, ort-cuda, ..."
)
@click.option("--rtol", type=float, help="--verify: relative tolerance (default by dtype).")
@click.option("--atol", type=float, help="--verify: absolute tolerance (default: per-element rule).")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), help="--verify: inputs as .npy or .npz.")
@click.option("--no-power", is_flag=True, help="--verify: skip measuring the smallest change the check catches.")
@click.option("--batch-size", "batch_sizes", multiple=True, type=int, help="--bench: repeatable batch sizes.")
@click.option("--warmup", default=10, show_default=True, help="--bench: untimed calls first.")
@click.option("--iterations", default=50, show_default=True, help="--bench: timed calls per model.")
@click.option("--rounds", default=10, show_default=True, help="--bench: interleaved A/B rounds.")
@click.option("--threads", type=int, help="--bench: CPU threads (default: the physical cores).")
@click.option("--simplify", is_flag=True, help="Run onnx-simplifier on an ONNX output (kept only if it verifies).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the summary as JSON.")
@click.option("--force", is_flag=True, help="Replace existing output files.")
@_json_option
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@click.option("--summary", is_flag=True, help="Counts by outcome and reason instead of one row per BN.")
def fold(
    model_path: str,
    output: str | None,
    arch: str | None,
    arch_kwargs: str | None,
    input_shapes: tuple[str, ...],
    allow_initializer_inputs: bool,
    no_merge: bool,
    unsafe_pickle: bool,
    trust_arch: bool,
    do_verify: bool,
    do_bench: bool,
    runtimes: tuple[str, ...],
    rtol: float | None,
    atol: float | None,
    inputs_path: str | None,
    no_power: bool,
    batch_sizes: tuple[int, ...],
    warmup: int,
    iterations: int,
    rounds: int,
    threads: int | None,
    simplify: bool,
    report_path: str | None,
    force: bool,
    as_json: bool,
    quiet: bool,
    summary: bool,
) -> None:
    """Fold every foldable BN of MODEL; optionally export, verify and benchmark the result.

    MODEL is any file bnfold reads (ONNX, state_dict + --arch, safetensors + --arch,
    bnfold checkpoints, TorchScript, torch.export .pt2). The output's suffix picks its
    format: .onnx, .pt, .pt2 or .safetensors.

    \b
    Examples:
      bnfold fold model.onnx -o model.folded.onnx
      bnfold fold weights.pt --arch resnet-tiny -o model.onnx --verify --bench
      bnfold fold ckpt.pt -o folded.pt --report fold.json --json

    \b
    Exit status: 0 done; 1 the result does not match the original (--verify);
    2 bad input, usage or environment; 3 internal error (a bug).
    """
    from bnfold.pipeline import run_pipeline, summary_text

    if quiet:
        import warnings

        warnings.simplefilter("ignore")
    check_outputs({"-o": output, "--report": report_path}, force=force, inputs=[model_path])
    from bnfold.deploy.runtimes import check_available

    for runtime in runtimes:
        check_available(runtime)
    if iterations < 1 or warmup < 0 or any(b < 1 for b in batch_sizes) or rounds < 2 or (threads or 1) < 1:
        raise BnfoldError("--iterations, --threads and --batch-size must be positive, --rounds at least 2")
    verify_options: dict[str, Any] = {"runtimes": runtimes or None, "rtol": rtol, "atol": atol, "power": not no_power}
    verify_options["inputs"] = _read_inputs(inputs_path)
    bench_options = {
        "runtimes": runtimes or None,
        "batch_sizes": batch_sizes or None,
        "warmup": warmup,
        "rounds": rounds,
        "threads": threads,
    }
    result = run_pipeline(
        model_path,
        output,
        arch=arch,
        arch_kwargs=_arch_kwargs(arch_kwargs),
        input_shapes=_shapes(input_shapes),
        unsafe_pickle=unsafe_pickle,
        trust_arch=trust_arch,
        allow_initializer_inputs=allow_initializer_inputs,
        merge_branches=not no_merge,
        do_verify=do_verify,
        do_bench=do_bench,
        simplify=simplify,
        stage=_stage(quiet),
        bench_iterations=iterations,
        verify_options=verify_options,
        bench_options=bench_options,
    )
    if report_path:
        atomic_write(report_path, lambda tmp: tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n"))
    _emit(as_json, quiet, result.to_dict(), summary_text(result, summary=summary))
    if not result.passed:
        sys.exit(1)


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@_arch_option
@_kwargs_option
@_shape_option
@_allow_option
@_merge_option
@_unsafe_option
@_trust_option
@_json_option
@click.option("--summary", is_flag=True, help="Counts by outcome and reason instead of one row per BN.")
def inspect(
    model_path: str,
    arch: str | None,
    arch_kwargs: str | None,
    input_shapes: tuple[str, ...],
    allow_initializer_inputs: bool,
    no_merge: bool,
    unsafe_pickle: bool,
    trust_arch: bool,
    as_json: bool,
    summary: bool,
) -> None:
    """List every BN of MODEL and whether (or why not) it would fold. Writes nothing.

    \b
    Examples:
      bnfold inspect model.onnx
      bnfold inspect weights.pt --arch resnet-tiny --summary
      bnfold inspect ckpt.pt --json

    \b
    Exit status: 0 done; 2 bad input, usage or environment; 3 internal error (a bug).
    """
    from bnfold.pipeline import run_pipeline

    result = run_pipeline(
        model_path,
        None,
        arch=arch,
        arch_kwargs=_arch_kwargs(arch_kwargs),
        input_shapes=_shapes(input_shapes),
        unsafe_pickle=unsafe_pickle,
        trust_arch=trust_arch,
        allow_initializer_inputs=allow_initializer_inputs,
        merge_branches=not no_merge,
    )
    _emit(as_json, False, result.report.to_dict(), result.report.render(dry_run=True, summary=summary))


@main.command(name="verify")
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@_arch_option
@_kwargs_option
@_shape_option
@_unsafe_option
@_trust_option
@click.option("--runtime", "runtimes", multiple=True, help="torch-cpu, torch-cuda, ort-cpu, ort-cuda, ort-tensorrt.")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), help="Inputs as .npy or .npz.")
@click.option("--rtol", type=float, help="Relative tolerance (default by dtype).")
@click.option("--atol", type=float, help="Absolute tolerance (default scales with the output).")
@click.option("--no-power", is_flag=True, help="Skip measuring the smallest single-layer change the check catches.")
@_json_option
def verify_command(
    reference: str,
    candidate: str,
    arch: str | None,
    arch_kwargs: str | None,
    input_shapes: tuple[str, ...],
    unsafe_pickle: bool,
    trust_arch: bool,
    runtimes: tuple[str, ...],
    inputs_path: str | None,
    rtol: float | None,
    atol: float | None,
    no_power: bool,
    as_json: bool,
) -> None:
    """Check that CANDIDATE computes what REFERENCE computes, against float64 truth.

    Each element is judged on its own scale: its channel's (or column's) largest
    value and the original's own rounding error there. The verdict states the
    check's power (the smallest random change to one layer's weights that it
    catches on these inputs) and warns when the output hardly depends on the input.

    \b
    Examples:
      bnfold verify model.onnx model.folded.onnx
      bnfold verify weights.pt folded.pt --arch resnet-tiny --input-shape 8,1,8,8
      bnfold verify a.onnx b.onnx --inputs real_batch.npz --runtime ort-cpu --json

    \b
    Exit status: 0 match; 1 mismatch; 2 bad input, usage or environment;
    3 internal error (a bug).
    """
    from bnfold.deploy.verify import verify
    from bnfold.model_io.loading import load_detailed

    kwargs = _arch_kwargs(arch_kwargs)
    ref = load_detailed(reference, arch, kwargs, unsafe_pickle=unsafe_pickle, trust_arch=trust_arch)
    cand = load_detailed(candidate, arch, kwargs, unsafe_pickle=unsafe_pickle, trust_arch=trust_arch)
    shapes = _shapes(input_shapes) or ([ref.input_shape] if ref.input_shape else None)
    result = verify(
        ref.model,
        cand.model,
        _read_inputs(inputs_path),
        runtimes=runtimes or None,
        rtol=rtol,
        atol=atol,
        input_shapes=shapes,
        power=not no_power,
    )
    _emit(as_json, False, result.to_dict(), str(result))
    if not result.passed:
        sys.exit(1)


def _read_inputs(path: str | None) -> list | None:
    if path is None:
        return None
    import numpy as np

    if path.endswith(".npz") and Path(path).is_file():
        from bnfold.model_io.formats import check_npz

        check_npz(Path(path))
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise BnfoldError(f"{path}: not a readable .npy/.npz file ({error})") from None
    if isinstance(data, np.ndarray):
        return [data]
    return [data[key] for key in data.files]


@main.command(name="bench")
@click.argument("models", metavar="MODEL [FOLDED]", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_arch_option
@_kwargs_option
@_shape_option
@_unsafe_option
@_trust_option
@click.option("--runtime", "runtimes", multiple=True, help="torch-cpu, torch-cuda, ort-cpu, ort-cpu-opt, ort-cuda, ...")
@click.option(
    "--batch-size", "batch_sizes", multiple=True, type=int, help="Repeatable; default the model's fixed batch, else 1."
)
@click.option("--warmup", default=10, show_default=True, help="Untimed calls first.")
@click.option("--iterations", default=100, show_default=True, help="Timed calls per measurement.")
@click.option("--chart", type=click.Path(dir_okay=False), help="With two models: write a PNG bar chart.")
@click.option("--force", is_flag=True, help="Replace an existing --chart file.")
@click.option("--rounds", default=10, show_default=True, help="With two models: interleaved A/B rounds.")
@click.option("--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: the physical cores).")
@_json_option
def bench_command(
    models: tuple[str, ...],
    arch: str | None,
    arch_kwargs: str | None,
    input_shapes: tuple[str, ...],
    unsafe_pickle: bool,
    trust_arch: bool,
    runtimes: tuple[str, ...],
    batch_sizes: tuple[int, ...],
    warmup: int,
    iterations: int,
    chart: str | None,
    force: bool,
    rounds: int,
    threads: int | None,
    as_json: bool,
) -> None:
    """Latency (p50/p90/p99 ms) and throughput of MODEL, or of MODEL vs FOLDED side by side.

    Two models are timed in interleaved rounds (A B, B A, ...); the speed-up comes
    with a 95% bootstrap interval, and "no significant difference" where the
    interval does not clear +-3%.

    \b
    Examples:
      bnfold bench model.onnx
      bnfold bench original.onnx folded.onnx --batch-size 1 --batch-size 32 --chart speed.png
      bnfold bench ckpt.pt --runtime torch-cpu --iterations 500 --json

    \b
    Exit status: 0 done; 2 bad input, usage or environment (a runtime that is not
    installed included); 3 internal error (a bug).
    """
    from bnfold.deploy.bench import benchmark
    from bnfold.model_io.loading import load_detailed

    if len(models) > 2:
        raise BnfoldError("bench takes one model, or an original and a folded model")
    if chart and len(models) != 2:
        raise BnfoldError("--chart needs two models (an original and a folded one)")
    if iterations < 1 or warmup < 0 or rounds < 2 or (threads is not None and threads < 1):
        raise BnfoldError("--iterations and --threads must be positive, --rounds at least 2, --warmup non-negative")
    check_outputs({"--chart": chart}, force=force, inputs=models)
    kwargs = _arch_kwargs(arch_kwargs)
    shapes = _shapes(input_shapes)
    loaded = [load_detailed(p, arch, kwargs, unsafe_pickle=unsafe_pickle, trust_arch=trust_arch) for p in models]
    shape = shapes[0] if shapes else loaded[0].input_shape
    if len(loaded) == 2:
        text, payload = _bench_pair(
            loaded[0].model, loaded[1].model, shape, runtimes, batch_sizes, warmup, iterations, rounds, threads, chart
        )
        _emit(as_json, False, payload, text)
        return
    result = benchmark(
        loaded[0].model,
        runtimes=runtimes or None,
        batch_sizes=batch_sizes or None,
        warmup=warmup,
        iterations=iterations,
        input_shape=shape,
        label=Path(models[0]).name,
        progress=not as_json,
        threads=threads,
    )
    _emit(as_json, False, {"results": [result.to_dict()]}, str(result))


def _bench_pair(
    original: Any,
    folded: Any,
    shape: tuple[int, ...] | None,
    runtimes: tuple[str, ...],
    batch_sizes: tuple[int, ...],
    warmup: int,
    iterations: int,
    rounds: int,
    threads: int | None,
    chart: str | None,
) -> tuple[str, dict[str, Any]]:
    """Original vs folded, interleaved, with intervals (:mod:`bnfold.deploy.ab`); the chart from its rows."""
    from bnfold.deploy.ab import compare_models
    from bnfold.deploy.bench import _chart

    result = compare_models(
        original,
        folded,
        input_shape=shape,
        runtimes=runtimes,
        batch_sizes=batch_sizes,
        warmup=warmup,
        iterations=iterations,
        rounds=rounds,
        threads=threads,
    )
    rows = [r.to_dict() for r in result.rows]
    if chart:
        _chart(rows, chart)
    return str(result), {"ab": result.to_dict(), "compare": rows}


@main.command(name="train")
@click.option("--arch", default="resnet-tiny", show_default=True, help="Zoo name or package.module:callable.")
@_kwargs_option
@click.option(
    "--data", default="digits", show_default=True, help="digits, a directory of MNIST IDX files, or x/y .npz."
)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--lr", default=0.01, show_default=True, type=float)
@click.option("--epochs", default=5, show_default=True, type=int)
@click.option("--steps", type=int, help="Train this many steps instead of --epochs.")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--sync-bn", is_flag=True, help="Under torchrun: convert BN to SyncBatchNorm.")
@click.option("--experiment", type=click.Choice(["paper-mnist"]), help="Run the BN paper's Figure 1 instead.")
@click.option("--eval-every", default=500, show_default=True, help="paper-mnist: evaluation interval in steps.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Checkpoint (.pt); paper-mnist: figure (.png).")
@click.option("--force", is_flag=True, help="Replace existing output files.")
@_json_option
def train_command(
    arch: str,
    arch_kwargs: str | None,
    data: str,
    optimizer: str,
    lr: float,
    epochs: int,
    steps: int | None,
    batch_size: int,
    seed: int,
    device: str,
    sync_bn: bool,
    experiment: str | None,
    eval_every: int,
    output: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Train a BN network and give it population statistics (Algorithm 2); also under torchrun.

    The checkpoint is self-describing: `bnfold fold CKPT` needs no --arch.

    \b
    Examples:
      bnfold train --arch resnet-tiny --epochs 10 -o ckpt.pt
      torchrun --nproc-per-node 2 -m bnfold train --arch resnet-tiny -o ddp.pt
      bnfold train --experiment paper-mnist -o figure.png

    \b
    Exit status: 0 done; 2 bad input, usage or environment; 3 internal error (a bug).
    """
    import os

    rank = int(os.environ.get("RANK", "0"))
    if experiment == "paper-mnist":
        from bnfold.training.paper import PaperConfig, run_paper_experiment, write_figure

        png = Path(output or "paper-mnist.png")
        json_path = png.with_suffix(".json")
        check_outputs({"-o": png, "JSON": json_path}, force=force)
        config = PaperConfig(data=data, steps=steps or 50_000, eval_every=eval_every, seed=seed)
        result = run_paper_experiment(config, progress=not as_json)
        write_figure(result, png, json_path)
        final = {k: result[k]["accuracy"][-1] for k in ("without_bn", "with_bn")}
        _emit(
            as_json,
            False,
            {"final_accuracy": final, "png": str(png), "json": str(json_path)},
            f"final held-out accuracy: without BN {final['without_bn']:.4f}, with BN {final['with_bn']:.4f}\n"
            f"wrote {png} and {json_path}",
        )
        return
    from bnfold.training.trainer import TrainConfig, train

    if output and rank == 0:
        check_output(output, force=force)
    config = TrainConfig(
        arch=arch,
        arch_kwargs=_arch_kwargs(arch_kwargs),
        data=data,
        optimizer=optimizer,
        lr=lr,
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        device=device,
        sync_bn=sync_bn,
    )
    result = train(config, progress=not as_json)
    if rank != 0:
        return
    if output:
        result.save(output)
    m = result.metrics
    text = (
        f"{arch}: {m['steps']} steps in {m['train_seconds']} s on {m['world_size']} process(es); held-out "
        f"accuracy {m['test_accuracy']:.4f} with population statistics ({m['test_accuracy_moving_average']:.4f} "
        "with moving averages)" + (f"\nwrote {output}" if output else "")
    )
    _emit(as_json, False, {"metrics": m, "statistics": result.statistics, "output": output}, text)


@main.command(name="stats")
@click.argument("model_path", metavar="CKPT", type=click.Path(dir_okay=False))
@click.option("--data", "data", required=True, help="A .npy/.npz file, an IDX file, an image folder or module:name.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The checkpoint to write (.pt).")
@_arch_option
@_kwargs_option
@_shape_option
@_unsafe_option
@_trust_option
@click.option("--labels", type=click.Path(dir_okay=False), help="A separate labels file (.npy/.npz or IDX).")
@click.option("--batch-size", default=64, show_default=True, help="Samples per batch (BN sees this batch size).")
@click.option("--num-batches", type=int, help="Stop after this many batches per process.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--resize", type=int, help="Image folder: resize the shorter side to this.")
@click.option("--crop", type=int, help="Image folder: centre crop to this square side.")
@click.option(
    "--mean", "mean_text", help="Image folder: per-channel mean after scaling to [0,1], e.g. 0.485,0.456,0.406."
)
@click.option("--std", "std_text", help="Image folder: per-channel std, e.g. 0.229,0.224,0.225.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@_json_option
def stats_command(
    model_path: str,
    data: str,
    output: str,
    arch: str | None,
    arch_kwargs: str | None,
    input_shapes: tuple[str, ...],
    unsafe_pickle: bool,
    trust_arch: bool,
    labels: str | None,
    batch_size: int,
    num_batches: int | None,
    device: str,
    resize: int | None,
    crop: int | None,
    mean_text: str | None,
    std_text: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Recompute every BN's population statistics (the BN paper's Algorithm 2) over your data.

    Streams the data once with the network in training mode, keeps float64 sums per
    channel, and writes CKPT with its running mean and variance replaced. Under torchrun
    each rank reads its own shard, the sums are all-reduced and rank 0 writes. Reports
    how far each BN's statistics moved and, when the data has labels, the accuracy
    before and after. The output is self-describing when the architecture is known, so
    it folds with no --arch:

    \b
    Examples:
      bnfold stats weights.pt --arch resnet-tiny --data calib.npz -o fresh.pt
      bnfold stats ckpt.pt --data images/ --resize 256 --crop 224 \\
          --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 -o fresh.pt
      torchrun --nproc-per-node 2 -m bnfold stats ckpt.pt --data calib.npz -o fresh.pt
      bnfold stats ckpt.pt --data calib.npz -o fresh.pt && bnfold fold fresh.pt -o model.onnx --verify

    \b
    Exit status: 0 done; 2 bad input, usage or environment; 3 internal error (a bug).
    """
    import os

    from bnfold.lazy import is_module, is_script_module
    from bnfold.model_io.loading import load_detailed
    from bnfold.training.distributed import start
    from bnfold.training.sources import ImageOptions
    from bnfold.training.stats import recompute_statistics

    rank = int(os.environ.get("RANK", "0"))
    out = Path(output)
    if out.suffix not in (".pt", ".pth"):
        raise BnfoldError(f"{out}: bnfold stats writes a .pt checkpoint")
    if rank == 0:
        check_outputs({"-o": output}, force=force, inputs=[model_path, data] + ([labels] if labels else []))
    kwargs = _arch_kwargs(arch_kwargs)
    loaded = load_detailed(model_path, arch, kwargs, unsafe_pickle=unsafe_pickle, trust_arch=trust_arch)
    if not is_module(loaded.model) or is_script_module(loaded.model) or loaded.format == "torch-export":
        raise BnfoldError(
            f"{model_path}: population statistics need the PyTorch module (a state_dict with --arch, or a bnfold "
            f"checkpoint), not a {loaded.format} file"
        )
    shapes = _shapes(input_shapes)
    shape = shapes[0][1:] if shapes else (loaded.input_shape[1:] if loaded.input_shape else None)
    images = ImageOptions(resize=resize, crop=crop, mean=_floats(mean_text, "--mean"), std=_floats(std_text, "--std"))
    start(device)
    result = recompute_statistics(
        loaded.model,
        data,
        batch_size=batch_size,
        num_batches=num_batches,
        input_shape=tuple(shape) if shape else None,
        labels=labels,
        images=images,
        device=device,
        progress=not as_json,
        stage=_stage(as_json),
    )
    if rank == 0:
        _write_stats_checkpoint(out, loaded, result, tuple(shape) if shape else None)
    _leave_process_group()  # every rank waits for the write, then leaves together (gloo aborts a rank left alone)
    if rank == 0:
        payload = {**result.to_dict(), "output": str(out)}
        _emit(as_json, False, payload, result.text() + f"\nwrote {out}")


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _floats(text: str | None, flag: str) -> tuple[float, ...]:
    if text is None:
        return (0.0,) if flag == "--mean" else (1.0,)
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise BnfoldError(f"{flag} {text}: expected comma-separated numbers") from None
    if flag == "--std" and any(v <= 0 for v in values):
        raise BnfoldError(f"{flag} {text}: every value must be positive")
    return values


def _write_stats_checkpoint(out: Path, loaded: Any, result: Any, shape: tuple[int, ...] | None) -> None:  # noqa: ANN401
    """A trainer-format checkpoint when the architecture is known (folds without --arch), else a state_dict."""
    import torch

    from bnfold.model_io.checkpoint import trained_checkpoint

    if loaded.arch and shape is not None:
        payload = trained_checkpoint(loaded.model, loaded.arch, loaded.arch_kwargs, shape, statistics=result.to_dict())
    else:
        payload = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
    atomic_write(out, lambda tmp: torch.save(payload, tmp))


@main.command(name="zoo")
def zoo_command() -> None:
    """List the built-in architectures.

    \b
    Example:
      bnfold zoo
    Exit status: 0.
    """
    from bnfold import zoo

    for name, entry in zoo.ZOO.items():
        shape = ",".join(str(d) for d in entry.input_shape)
        click.echo(f"{name:<15} input N,{shape:<10} {entry.description}")


@main.command()
@click.option(
    "--checkpoint", type=click.Path(dir_okay=False), help="A trained checkpoint (default: train one briefly)."
)
@click.option("--arch", default=None, help="One zoo model instead of all of them.")
@_json_option
def demo(checkpoint: str | None, arch: str | None, as_json: bool) -> None:
    """The main job end to end: a trained model folded, exported and verified; then every zoo model folded.

    \b
    Examples:
      bnfold demo --checkpoint models/resnet-tiny.pt
      bnfold demo --arch cnn-bn --json

    \b
    Exit status: 0 done; 2 bad input or environment; 3 internal error (a bug).
    """
    from bnfold import zoo
    from bnfold.demo import run_demo, run_trained_demo

    trained = run_trained_demo(checkpoint)
    zoo_result = run_demo([arch] if arch else list(zoo.ZOO))
    payload = {"trained": trained.rows[0], **zoo_result.to_dict()}
    _emit(as_json, False, payload, trained.text + "\n\n" + zoo_result.text)
