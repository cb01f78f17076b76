"""Latency and throughput of a model on CPU and GPU runtimes, and original-vs-folded comparisons.

Every measurement warms up first, then times ``iterations`` single calls: p50/p90/p99
and mean latency in milliseconds, throughput in samples per second. ONNX Runtime is
measured with graph optimisations off (``ort-cpu``) and at its default level
(``ort-cpu-opt``, which folds Conv+BN itself), so a gain is shown honestly. On a GPU,
torch calls are synchronised and ORT uses IO binding with device-resident inputs, so
host copies are not timed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from bnfold.deploy.runtimes import ONNX_RUNTIMES, TORCH_RUNTIMES, check_available, ort_providers
from bnfold.errors import BnfoldError, first_line
from bnfold.lazy import is_module, torch_if_loaded

if TYPE_CHECKING:
    from torch import nn

__all__ = ["BenchResult", "BenchRow", "benchmark", "compare", "runner", "timed", "torch_threads"]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int | None]:
    """Set torch's CPU threads for a block (when torch is loaded at all); yields the count in use."""
    torch = torch_if_loaded()
    if torch is None:  # ONNX-only work: threads go to each ONNX Runtime session
        yield threads
        return
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@dataclasses.dataclass
class BenchRow:
    """One (runtime, batch size) measurement."""

    runtime: str
    batch_size: int
    p50: float
    p90: float
    p99: float
    mean: float
    throughput: float
    session_ms: float
    iterations: int


@dataclasses.dataclass
class BenchResult:
    """All measurements of one model."""

    label: str
    rows: list[BenchRow]
    threads: int
    file_mb: float | None
    device: str
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; latencies in milliseconds."""
        return {
            "label": self.label,
            "threads": self.threads,
            "file_mb": self.file_mb,
            "device": self.device,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        """A table: one row per runtime and batch size."""
        lines = [
            f"{self.label}: {self.device}, {self.threads} CPU threads"
            + (f", file {self.file_mb:.2f} MB" if self.file_mb is not None else ""),
            f"{'runtime':<12} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9} "
            f"{'samples/s':>10} {'session ms':>10}",
        ]
        for r in self.rows:
            lines.append(
                f"{r.runtime:<12} {r.batch_size:>5} {r.p50:>9.3f} {r.p90:>9.3f} {r.p99:>9.3f} {r.mean:>9.3f} "
                f"{r.throughput:>10.1f} {r.session_ms:>10.1f}"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _stats(samples: list[float], runtime: str, batch: int, session_ms: float) -> BenchRow:
    ms = sorted(1000 * s for s in samples)

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, int(round(q * (len(ms) - 1))))]

    mean = statistics.fmean(ms)
    return BenchRow(runtime, batch, pct(0.5), pct(0.9), pct(0.99), mean, 1000 * batch / mean, session_ms, len(ms))


def runner(
    model: nn.Module | onnx.ModelProto, shape: tuple[int, ...], runtime: str, threads: int | None = None
) -> tuple[Callable[[], None], float]:
    """A zero-argument function that runs ``model`` once on ``runtime``, and its set-up time in ms.

    The model is moved to its device (torch) or given a session (ONNX Runtime;
    graph optimisations off but for ``ort-cpu-opt``; IO binding with device-resident
    inputs on a GPU), and called once untimed: a rejected input shape is a
    :class:`BnfoldError` here, not inside a timing loop. GPU calls are synchronised.
    """
    if is_module(model):
        import torch

        device = torch.device("cuda" if runtime == "torch-cuda" else "cpu")
        start = time.perf_counter()
        module = copy.deepcopy(model).eval().to(device)
        setup_ms = 1000 * (time.perf_counter() - start)
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def run_torch() -> None:
            with torch.inference_mode():
                module(x)
            sync()

        try:
            run_torch()
        except Exception as error:  # noqa: BLE001 - the model decides what it accepts
            raise BnfoldError(
                f"the model rejects input shape {','.join(map(str, shape))}: {first_line(error)}"
            ) from None
        return run_torch, setup_ms
    import onnxruntime as ort

    from bnfold.deploy.onnx_reference import ort_errors

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if runtime == "ort-cpu-opt"
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    from bnfold.onnx_fold.files import session_source

    source = session_source(model)
    start = time.perf_counter()
    with ort_errors():
        session = ort.InferenceSession(source, options, providers=ort_providers(runtime))
    setup_ms = 1000 * (time.perf_counter() - start)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise BnfoldError(f"bench feeds one input; the model has {len(inputs)}")
    elem = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
    x = np.random.default_rng(0).standard_normal(shape).astype(elem.get(inputs[0].type, np.float32))
    if runtime in ("ort-cuda", "ort-tensorrt"):
        binding = session.io_binding()
        binding.bind_ortvalue_input(inputs[0].name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda")

        def run_bound() -> None:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        call = run_bound
    else:
        feeds = {inputs[0].name: x}

        def call() -> None:
            session.run(None, feeds)

    with ort_errors():
        call()
    return call, setup_ms


def timed(call: Callable[[], None], count: int) -> list[float]:
    """Seconds taken by each of ``count`` calls."""
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return samples


def _measure(
    model: nn.Module | onnx.ModelProto,
    shape: tuple[int, ...],
    runtime: str,
    warmup: int,
    iterations: int,
    threads: int | None,
) -> BenchRow:
    call, setup_ms = runner(model, shape, runtime, threads)
    timed(call, warmup)
    return _stats(timed(call, iterations), runtime, shape[0], setup_ms)


def _onnx_shape(model: onnx.ModelProto, batch: int) -> tuple[int, ...]:
    initializers = {t.name for t in model.graph.initializer}
    value = next(i for i in model.graph.input if i.name not in initializers)
    dims = value.type.tensor_type.shape.dim
    shape = []
    for axis, dim in enumerate(dims):
        if axis == 0:
            if dim.HasField("dim_value") and dim.dim_value != batch:
                raise BnfoldError(f"the model's batch axis is fixed at {dim.dim_value}; cannot run batch {batch}")
            shape.append(batch)
        elif dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        else:
            raise BnfoldError(f"input axis {axis} is dynamic: pass an input shape")
    return tuple(shape)


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size an ONNX model's first input fixes, if it fixes one."""
    initializers = {t.name for t in model.graph.initializer}
    value = next((i for i in model.graph.input if i.name not in initializers), None)
    dims = value.type.tensor_type.shape.dim if value is not None else []
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def benchmark(
    model: nn.Module | onnx.ModelProto | str | os.PathLike,
    *,
    runtimes: tuple[str, ...] | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    warmup: int = 10,
    iterations: int = 100,
    input_shape: tuple[int, ...] | None = None,
    label: str = "model",
    progress: bool = True,
    threads: int | None = None,
) -> BenchResult:
    """Measure latency and throughput of ``model`` on each runtime and batch size.

    Args:
        model: A torch module, an ONNX model, or a path to either.
        runtimes: Default ``torch-cpu`` for a module, ``ort-cpu`` and ``ort-cpu-opt`` for ONNX.
        batch_sizes: Batch sizes to measure; by default the batch an ONNX model fixes, else 1.
        warmup: Untimed calls first.
        iterations: Timed calls.
        input_shape: One input's shape (the batch axis is replaced); needed for torch modules.
        label: Name shown in tables and JSON.
        progress: Show a progress bar on stderr.
        threads: CPU threads for torch (and ONNX Runtime); default torch's current setting.

    Returns:
        One row per runtime and batch size.

    Raises:
        BnfoldError: A runtime that cannot run this kind of model or is absent,
            or no usable input shape.
    """
    file_mb = None
    if isinstance(model, str | os.PathLike):
        file_mb = Path(model).stat().st_size / 2**20
        from bnfold.model_io.loading import load

        model = load(model)
    module = is_module(model)
    if isinstance(model, onnx.ModelProto) and file_mb is None:
        file_mb = model.ByteSize() / 2**20
    runtimes = tuple(runtimes or (("torch-cpu",) if module else ("ort-cpu", "ort-cpu-opt")))
    allowed = TORCH_RUNTIMES if module else ONNX_RUNTIMES
    kind = "a torch module" if module else "an ONNX model"
    skipped = [r for r in runtimes if r not in allowed]
    runtimes = tuple(r for r in runtimes if r in allowed)
    if not runtimes:
        raise BnfoldError(f"runtime {', '.join(skipped)} cannot run {kind}; choose from {', '.join(allowed)}")
    for runtime in runtimes:
        check_available(runtime)
    if module and input_shape is None:
        raise BnfoldError("benchmarking a torch module needs an input shape (--input-shape)")
    if not batch_sizes:
        fixed = _fixed_batch(model) if isinstance(model, onnx.ModelProto) else None
        batch_sizes = (fixed or 1,)
    if iterations < 1 or warmup < 0 or any(b < 1 for b in batch_sizes):
        raise BnfoldError("iterations and batch sizes must be positive, warmup non-negative")
    jobs = [(r, b) for r in runtimes for b in batch_sizes]
    from tqdm import tqdm

    from bnfold.deploy.ab import default_threads

    rows = []
    with torch_threads(threads) as used:
        for runtime, batch in tqdm(jobs, desc=f"bench {label}", disable=not progress, leave=False):
            shape = (batch, *input_shape[1:]) if input_shape else _onnx_shape(model, batch)
            rows.append(_measure(model, shape, runtime, warmup, iterations, threads))
    used = used or default_threads()
    device = _gpu_name() if any("cuda" in r or "tensorrt" in r for r in runtimes) else "CPU"
    notes = [f"{r} skipped: it cannot run {kind} (bench the checkpoint for torch, the .onnx for ORT)" for r in skipped]
    return BenchResult(label, rows, used, file_mb, device, notes)


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - no torch, or a torch without CUDA: ONNX Runtime still ran on the GPU
        return "GPU"


def compare(original: BenchResult, folded: BenchResult, chart: str | os.PathLike | None = None) -> dict[str, Any]:
    """Original vs folded side by side, with the speed-up of the median latency.

    Args:
        original: The unfolded model's measurements.
        folded: The folded model's, on the same runtimes and batch sizes.
        chart: Write a PNG bar chart here (needs matplotlib).

    Returns:
        ``{"rows": [...], "text": table}``.
    """
    theirs = {(r.runtime, r.batch_size): r for r in folded.rows}
    rows, lines = [], [f"{'runtime':<12} {'batch':>5} {'original p50':>13} {'folded p50':>11} {'speed-up':>9}"]
    for r in original.rows:
        f = theirs.get((r.runtime, r.batch_size))
        if f is None:
            continue
        speedup = r.p50 / f.p50 if f.p50 else float("nan")
        rows.append(
            {
                "runtime": r.runtime,
                "batch_size": r.batch_size,
                "original_p50": r.p50,
                "folded_p50": f.p50,
                "original_throughput": r.throughput,
                "folded_throughput": f.throughput,
                "speedup": speedup,
            }
        )
        lines.append(f"{r.runtime:<12} {r.batch_size:>5} {r.p50:>13.3f} {f.p50:>11.3f} {speedup:>8.2f}x")
    if chart is not None:
        _chart(rows, chart)
    return {"rows": rows, "text": "\n".join(lines)}


def _chart(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise BnfoldError("--chart needs matplotlib (pip install matplotlib)") from error
    from bnfold.model_io.outputs import atomic_write

    labels = [f"{r['runtime']}\nbatch {r['batch_size']}" for r in rows]
    xs = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(rows)), 3.5))
    ax.bar(xs - 0.2, [r["original_p50"] for r in rows], 0.4, label="original")
    ax.bar(xs + 0.2, [r["folded_p50"] for r in rows], 0.4, label="folded")
    ax.set_xticks(xs, labels)
    ax.set_ylabel("p50 latency (ms)")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
