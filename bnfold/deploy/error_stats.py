"""Error statistics between a candidate output and a float64 reference."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from bnfold.affine import float64

if TYPE_CHECKING:
    import torch

__all__ = ["ErrorStats", "error_stats", "fold_error"]


@dataclasses.dataclass(frozen=True)
class ErrorStats:
    """How far a candidate is from the reference.

    Attributes:
        max_abs: Largest absolute difference.
        max_rel: Largest ``|c - r| / (|r| + tiny)`` over elements with ``|r| > 1e-6 * max|r|``.
        rel_l2: ``||c - r|| / ||r||``.
        scaled_max: ``max|c - r| / max|r|``: error relative to the output's scale.
        worst_index: Where the largest absolute difference is.
    """

    max_abs: float
    max_rel: float
    rel_l2: float
    scaled_max: float
    worst_index: tuple[int, ...]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def error_stats(candidate: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> ErrorStats:
    """Compare ``candidate`` with ``reference`` in float64."""
    c, r = float64(candidate), float64(reference)
    if c.shape != r.shape:
        raise ValueError(f"shape {c.shape} differs from the reference's {r.shape}")
    if r.size == 0:
        return ErrorStats(0.0, 0.0, 0.0, 0.0, ())
    diff = np.abs(c - r)
    diff = np.where(np.isnan(diff), np.inf, diff)
    scale = float(np.abs(r).max())
    significant = np.abs(r) > 1e-6 * scale
    max_rel = float((diff[significant] / np.abs(r[significant])).max()) if significant.any() else 0.0
    norm = float(np.linalg.norm(r))
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    return ErrorStats(
        max_abs=float(diff.max()),
        max_rel=max_rel,
        rel_l2=float(np.linalg.norm(np.where(np.isinf(diff), 0, c - r)) / norm) if norm else float(diff.max()),
        scaled_max=float(diff.max()) / scale if scale else float(diff.max()),
        worst_index=worst,
    )


def fold_error(original: torch.nn.Module, folded: torch.nn.Module, inputs: tuple) -> ErrorStats:
    """Error of ``folded`` (in its own dtype) against ``original`` evaluated in float64, on the first output.

    Args:
        original: The unfolded model; a float64 copy of it is the truth.
        folded: The folded model, run in its own dtype.
        inputs: Example inputs (floating tensors are cast to each model's dtype).
    """
    import torch

    from bnfold.deploy.runtimes import run_torch, run_torch64

    arrays = [
        x.detach().cpu().float().numpy() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy() for x in inputs
    ]
    return error_stats(run_torch(folded, arrays)[0], run_torch64(original, arrays)[0])
