"""Original vs folded timed as benchmarking tools do it: interleaved rounds and a bootstrap confidence interval.

Both models are loaded and warmed up, then timed in alternating blocks (A B, B A,
A B, ...), so drift of the machine (frequency, other jobs) falls on both alike.
The speed-up is the ratio of median latencies; its 95% interval comes from a
bootstrap over rounds (each resample draws whole rounds, keeping each round's A
and B together). A difference is claimed only where the whole interval clears
the equivalence margin of +-3%; otherwise the row says "no significant
difference", not a ratio. The machine is called noisy when p99/p50 exceeds 3 or
round medians spread by more than 10%.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from bnfold.errors import BnfoldError

__all__ = ["ABResult", "ABRow", "ab_compare", "default_threads"]

EQUIVALENCE = 0.03  # speed-ups within +-3% are not called a difference, however tight the interval


def default_threads() -> int:
    """The physical cores (logical cores / 2 where hyper-threading is likely), at least 1."""
    logical = os.cpu_count() or 1
    try:
        siblings = open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read()  # noqa: SIM115
        per_core = len([p for p in siblings.strip().replace("-", ",").split(",") if p])
    except OSError:
        per_core = 1
    return max(1, logical // max(1, per_core))


@dataclasses.dataclass
class ABRow:
    """One runtime and batch size: both models' medians, the speed-up and its interval."""

    runtime: str
    batch_size: int
    original_p50: float
    folded_p50: float
    speedup: float
    low: float
    high: float
    verdict: str  # "faster", "slower" or "no significant difference"
    noisy: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (latencies in ms)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ABResult:
    """Every (runtime, batch size) comparison."""

    rows: list[ABRow]
    threads: int
    rounds: int
    per_round: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "threads": self.threads,
            "rounds": self.rounds,
            "per_round": self.per_round,
            "rows": [r.to_dict() for r in self.rows],
        }

    def __str__(self) -> str:
        """A table with the interval and verdict of each row."""
        lines = [
            f"A/B in {self.rounds} interleaved rounds of {self.per_round} calls each, {self.threads} thread(s); "
            "speed-up = original p50 / folded p50, 95% bootstrap interval",
            f"{'runtime':<12} {'batch':>5} {'original p50':>13} {'folded p50':>11}  speed-up",
        ]
        for r in self.rows:
            if r.verdict == "no significant difference":
                ratio = f"no significant difference ({r.low:.2f}-{r.high:.2f})"
            else:
                ratio = f"{r.speedup:.2f}x ({r.low:.2f}-{r.high:.2f}), {r.verdict}"
            lines.append(f"{r.runtime:<12} {r.batch_size:>5} {r.original_p50:>13.3f} {r.folded_p50:>11.3f}  {ratio}")
        lines += [f"warning: {r.runtime} batch {r.batch_size}: {r.noisy}" for r in self.rows if r.noisy]
        return "\n".join(lines)


def _call(model: nn.Module | onnx.ModelProto, shape: tuple[int, ...], runtime: str, threads: int) -> Callable:
    """A zero-argument function that runs ``model`` once on ``runtime`` (synchronised on a GPU)."""
    if isinstance(model, nn.Module):
        device = torch.device("cuda" if runtime == "torch-cuda" else "cpu")
        module = copy.deepcopy(model).eval().to(device)
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def run_torch() -> None:
            with torch.inference_mode():
                module(x)
            sync()

        return run_torch
    import onnxruntime as ort

    from bnfold.onnx_eval import ort_errors
    from bnfold.runtimes import ort_providers

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if runtime == "ort-cpu-opt"
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    with ort_errors():
        session = ort.InferenceSession(model.SerializeToString(), options, providers=ort_providers(runtime))
    first = session.get_inputs()
    if len(first) != 1:
        raise BnfoldError(f"bench feeds one input; the model has {len(first)}")
    elem = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
    feeds = {first[0].name: np.random.default_rng(0).standard_normal(shape).astype(elem.get(first[0].type, np.float32))}
    with ort_errors():
        session.run(None, feeds)
    return lambda: session.run(None, feeds)


def _timed(call: Callable, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return samples


def _interval(a: list[list[float]], b: list[list[float]], draws: int, seed: int) -> tuple[float, float]:
    """95% bootstrap interval of median(a)/median(b), resampling whole rounds."""
    rng = np.random.default_rng(seed)
    a_rounds, b_rounds = [np.asarray(r) for r in a], [np.asarray(r) for r in b]
    ratios = []
    for _ in range(draws):
        pick = rng.integers(0, len(a_rounds), len(a_rounds))
        ratios.append(
            np.median(np.concatenate([a_rounds[i] for i in pick]))
            / np.median(np.concatenate([b_rounds[i] for i in pick]))
        )
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def _noise(a: list[list[float]], b: list[list[float]]) -> str | None:
    reasons = []
    for label, rounds in (("original", a), ("folded", b)):
        flat = np.concatenate([np.asarray(r) for r in rounds])
        tail = np.percentile(flat, 99) / np.median(flat)
        medians = np.asarray([np.median(r) for r in rounds])
        spread = medians.std() / medians.mean() if medians.mean() else 0.0
        if tail > 3:
            reasons.append(f"{label} p99/p50 = {tail:.1f}")
        if spread > 0.10:
            reasons.append(f"{label} round medians spread {100 * spread:.0f}%")
    return "noisy machine (" + ", ".join(reasons) + "): close other work or add rounds" if reasons else None


def ab_compare(
    original: nn.Module | onnx.ModelProto,
    folded: nn.Module | onnx.ModelProto,
    *,
    runtimes: tuple[str, ...],
    batch_sizes: tuple[int, ...],
    input_shape: tuple[int, ...] | None = None,
    warmup: int = 10,
    rounds: int = 10,
    per_round: int = 20,
    threads: int | None = None,
    bootstrap: int = 2000,
    seed: int = 0,
) -> ABResult:
    """Time ``original`` and ``folded`` in interleaved rounds; speed-up with a bootstrap 95% interval.

    Args:
        original: The unfolded model (torch module or ONNX).
        folded: The folded model, of the same kind.
        runtimes: Runtimes both models can run on.
        batch_sizes: Batch sizes.
        input_shape: One input's shape (batch axis replaced); ONNX models may give theirs.
        warmup: Untimed calls of each model first.
        rounds: Alternating rounds (A then B, then B then A, ...).
        per_round: Timed calls of each model per round.
        threads: CPU threads for torch and ONNX Runtime (default: the physical cores).
        bootstrap: Resamples for the interval.
        seed: Seed of the resampling.

    Returns:
        One row per runtime and batch size.

    Raises:
        BnfoldError: Unusable counts, or a model a runtime cannot run.
    """
    if rounds < 2 or per_round < 1 or warmup < 0:
        raise BnfoldError("A/B timing needs at least 2 rounds and 1 call per round (warmup non-negative)")
    threads = threads or default_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    from bnfold.bench import _onnx_shape

    rows = []
    try:
        for runtime in runtimes:
            for batch in batch_sizes:
                if input_shape is not None:
                    shape = (batch, *input_shape[1:])
                else:
                    shape = _onnx_shape(original if isinstance(original, onnx.ModelProto) else folded, batch)
                calls = [_call(original, shape, runtime, threads), _call(folded, shape, runtime, threads)]
                for call in calls:
                    _timed(call, warmup)
                a, b = [], []
                for i in range(rounds):
                    order = (0, 1) if i % 2 == 0 else (1, 0)
                    for which in order:
                        (a if which == 0 else b).append(_timed(calls[which], per_round))
                a_p50 = 1000 * float(np.median(np.concatenate(a)))
                b_p50 = 1000 * float(np.median(np.concatenate(b)))
                low, high = _interval(a, b, bootstrap, seed)
                speedup = a_p50 / b_p50 if b_p50 else float("nan")
                # a difference only where the whole interval clears the equivalence margin
                verdict = (
                    "faster"
                    if low > 1 + EQUIVALENCE
                    else "slower"
                    if high < 1 - EQUIVALENCE
                    else "no significant difference"
                )
                rows.append(ABRow(runtime, batch, a_p50, b_p50, speedup, low, high, verdict, _noise(a, b)))
    finally:
        torch.set_num_threads(previous)
    return ABResult(rows, threads, rounds, per_round)
