"""Helpers for users' own test suites: ``assert_folded_equivalent`` in one line of pytest."""

from __future__ import annotations

from typing import Any

from torch import nn

from bnfold.deploy.verify import verify
from bnfold.report import FoldReport
from bnfold.torch_fold import fold

__all__ = ["assert_folded_equivalent"]


def assert_folded_equivalent(
    model: nn.Module,
    inputs: Any = None,
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    require_all_folded: bool = False,
    runtimes: tuple[str, ...] | None = None,
) -> tuple[nn.Module, FoldReport]:
    """Fold ``model`` and assert the result computes what ``model.eval()`` computes (against float64).

    Args:
        model: The model under test (not modified).
        inputs: Example inputs (tensor or tuple); or give ``input_shapes``.
        input_shapes: Shapes for seeded random inputs.
        rtol: Relative tolerance (default by dtype, see :mod:`bnfold.deploy.verify`).
        atol: Absolute tolerance.
        require_all_folded: Also fail when any BN is kept (the message lists why).
        runtimes: Where the folded model runs (default ``torch-cpu``).

    Returns:
        The folded model and its report.

    Raises:
        AssertionError: With the verify statistics (or the fold report) as the message.
    """
    example = inputs if inputs is None or isinstance(inputs, tuple) else (inputs,)
    folded, report = fold(model, example)
    if require_all_folded and report.bn_kept:
        raise AssertionError(f"{report.bn_kept} BatchNorm(s) were not folded:\n{report}")
    result = verify(
        model,
        folded,
        list(example) if example else None,
        input_shapes=input_shapes,
        rtol=rtol,
        atol=atol,
        runtimes=runtimes,
    )
    if not result.passed:
        raise AssertionError(f"the folded model does not match the original:\n{result}")
    return folded, report
