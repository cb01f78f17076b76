"""``bnfold stats``: recompute every BN's population statistics (Algorithm 2) on a user's model and data.

A checkpoint's running statistics are moving averages, or went stale after pruning,
quantization or fine-tuning. This module runs :func:`population_statistics` over the
user's data (one process, or every rank of a torchrun job on its own shard, sums
all-reduced), reports what changed per BN, and measures accuracy before and after when
the data has labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.errors import BnfoldError, first_line
from bnfold.training.distributed import all_reduce_sum, device_for
from bnfold.training.population import PopulationStats, population_statistics
from bnfold.training.sources import ImageOptions, Source, open_source

__all__ = ["BNChange", "StatsResult", "recompute_statistics"]


@dataclasses.dataclass
class BNChange:
    """How one BN's statistics moved: the stored moving average against the population value.

    Attributes:
        name: The BN's qualified name.
        mean_shift: Largest ``|new mean - old mean| / old std`` over channels.
        var_ratio: ``(min, max)`` over channels of ``new var / old var``.
        channel: The channel with the largest mean shift.
    """

    name: str
    mean_shift: float
    var_ratio: tuple[float, float]
    channel: int


@dataclasses.dataclass
class StatsResult:
    """What :func:`recompute_statistics` did."""

    statistics: PopulationStats
    changes: list[BNChange]
    source: str
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            **self.statistics.to_dict(),
            "source": self.source,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "changes": [dataclasses.asdict(c) for c in self.changes],
            "notes": list(self.notes),
        }

    def text(self, rows: int = 10) -> str:
        """A summary and the BNs that moved most."""
        s = self.statistics
        lines = [
            f"population statistics of {s.bn_layers} BN(s) from {s.batches} batch(es) of {self.source}"
            + (f" on {s.world_size} processes" if s.world_size > 1 else "")
        ]
        if self.accuracy_before is not None and self.accuracy_after is not None:
            lines.append(f"accuracy before {self.accuracy_before:.4f}, after {self.accuracy_after:.4f}")
        lines.append(f"{'BN':<32} {'mean shift (old std)':>20} {'var new/old':>17}")
        for change in sorted(self.changes, key=lambda c: -c.mean_shift)[:rows]:
            low, high = change.var_ratio
            lines.append(f"{change.name[:32]:<32} {change.mean_shift:>20.4g} {low:>8.3g}-{high:<8.3g}")
        if len(self.changes) > rows:
            lines.append(f"... {len(self.changes) - rows} more in --json")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _bn_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (m.running_mean.detach().double().cpu().clone(), m.running_var.detach().double().cpu().clone())
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
    }


def _changes(before: dict[str, tuple[torch.Tensor, torch.Tensor]], model: nn.Module) -> list[BNChange]:
    after = _bn_state(model)
    changes = []
    for name, (old_mean, old_var) in before.items():
        new_mean, new_var = after[name]
        std = old_var.clamp_min(1e-12).sqrt()
        shift = (new_mean - old_mean).abs() / std
        ratio = new_var / old_var.clamp_min(1e-12)
        changes.append(
            BNChange(name, float(shift.max()), (float(ratio.min()), float(ratio.max())), int(shift.argmax()))
        )
    return changes


def _accuracy(model: nn.Module, source: Source, device: torch.device, limit: int | None) -> float | None:
    """Top-1 accuracy in eval mode over the source (all ranks together), or None without usable labels."""
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for i, (x, y) in enumerate(source.batches):
            if limit is not None and i >= limit:
                break
            if y is None:
                return None
            logits = model(x.to(device))
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or y.dim() != 1:
                return None
            correct += int((logits.argmax(1).cpu() == y.cpu()).sum())
            total += len(y)
    counts = torch.tensor([correct, total], dtype=torch.float64)
    all_reduce_sum(counts)
    return float(counts[0] / counts[1]) if counts[1] else None


def recompute_statistics(
    model: nn.Module,
    data: str,
    *,
    batch_size: int = 64,
    num_batches: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    labels: str | None = None,
    images: ImageOptions | None = None,
    device: str = "cpu",
    accuracy: bool = True,
    progress: bool = True,
    stage: Callable[[str], None] = lambda message: None,
) -> StatsResult:
    """Replace the running statistics of every BN in ``model`` with population statistics over ``data``.

    Args:
        model: The PyTorch model (changed in place; left in eval mode).
        data: A source :func:`bnfold.training.sources.open_source` reads.
        batch_size: Samples per batch (the BNs see batch statistics of this size).
        num_batches: Stop after this many batches per process.
        input_shape: One sample's shape as the model takes it (checked against the data).
        labels: A separate labels file.
        images: Image folder options.
        device: ``cpu`` or ``cuda``.
        accuracy: Measure accuracy before and after when the data has labels.
        progress: Show progress bars.
        stage: Called with a short message as each stage starts.

    Returns:
        Counts, per-BN changes and accuracies.

    Raises:
        BnfoldError: Unusable data or device, a model that rejects the data.
    """
    target = device_for(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    model.to(target)

    def source() -> Source:
        return open_source(
            data, batch_size=batch_size, input_shape=input_shape, labels=labels, images=images, rank=rank, world=world
        )

    opened = source()
    result_notes = []
    before_accuracy = None
    if accuracy and opened.has_labels:
        stage("accuracy before")
        before_accuracy = _guarded(lambda: _accuracy(model, opened, target, num_batches), "before")
        opened = source()
        if before_accuracy is None:
            result_notes.append("accuracy not measured: the data has no labels the model's output can be scored on")
    before = _bn_state(model)
    stage("population statistics")
    statistics = _guarded(
        lambda: population_statistics(
            model, (x for x, _ in opened.batches), num_batches=num_batches, device=target, progress=progress
        ),
        "statistics",
    )
    after_accuracy = None
    if before_accuracy is not None:
        stage("accuracy after")
        after_accuracy = _guarded(lambda: _accuracy(model, source(), target, num_batches), "after")
    model.eval()
    return StatsResult(statistics, _changes(before, model), opened.kind, before_accuracy, after_accuracy, result_notes)


def _guarded(run: Callable[[], Any], what: str) -> Any:  # noqa: ANN401 - the call's own result
    try:
        return run()
    except BnfoldError:
        raise
    except (RuntimeError, ValueError, TypeError) as error:
        raise BnfoldError(f"the model rejects the data ({what}): {first_line(error)}") from None
