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

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from bnfold.deploy.bench import _fixed_batch, _onnx_shape, runner, timed, torch_threads
from bnfold.errors import BnfoldError
from bnfold.lazy import is_module

if TYPE_CHECKING:
    from torch import nn
from bnfold.deploy.runtimes import ONNX_RUNTIMES, TORCH_RUNTIMES, check_available

__all__ = ["ABResult", "ABRow", "ab_compare", "compare_models", "default_threads"]

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
    rows = []
    with torch_threads(threads):
        for runtime in runtimes:
            for batch in batch_sizes:
                if input_shape is not None:
                    shape = (batch, *input_shape[1:])
                else:
                    shape = _onnx_shape(original if isinstance(original, onnx.ModelProto) else folded, batch)
                calls = [runner(original, shape, runtime, threads)[0], runner(folded, shape, runtime, threads)[0]]
                for call in calls:
                    timed(call, warmup)
                a, b = [], []
                for i in range(rounds):
                    order = (0, 1) if i % 2 == 0 else (1, 0)
                    for which in order:
                        (a if which == 0 else b).append(timed(calls[which], per_round))
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
    return ABResult(rows, threads, rounds, per_round)


def compare_models(
    original: nn.Module | onnx.ModelProto,
    folded: nn.Module | onnx.ModelProto,
    *,
    input_shape: tuple[int, ...] | None = None,
    runtimes: tuple[str, ...] | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    warmup: int = 10,
    iterations: int = 50,
    rounds: int = 10,
    threads: int | None = None,
) -> ABResult:
    """:func:`ab_compare` with the defaults that fit the models (``bench A B`` and ``fold --bench``).

    Runtimes that cannot run this kind of model are left out (default: torch-cpu for
    modules, ort-cpu and ort-cpu-opt for ONNX); the batch is the one an ONNX model
    fixes, else 1; ``iterations`` calls of each model are spread over ``rounds``.

    Raises:
        BnfoldError: Models of two kinds, an absent runtime, or a torch model without an input shape.
    """
    module = is_module(original)
    if module != is_module(folded):
        raise BnfoldError("bench compares two models of one kind (two ONNX files, or two torch models)")
    allowed = TORCH_RUNTIMES if module else ONNX_RUNTIMES
    chosen = tuple(r for r in runtimes or () if r in allowed)
    chosen = chosen or (("torch-cpu",) if module else ("ort-cpu", "ort-cpu-opt"))
    for runtime in chosen:
        check_available(runtime)
    if module and input_shape is None:
        raise BnfoldError("benchmarking torch models needs an input shape (--input-shape)")
    fixed = None if module else _fixed_batch(folded)
    return ab_compare(
        original,
        folded,
        runtimes=chosen,
        batch_sizes=tuple(batch_sizes or (fixed or 1,)),
        input_shape=input_shape,
        warmup=warmup,
        rounds=max(2, rounds),
        per_round=max(1, -(-iterations // max(2, rounds))),
        threads=threads,
    )
