"""Planted changes for testing the verifier itself: what ``verify`` must catch, and what it must let pass.

A *real* change alters the model's function by more than rounding: one output
channel's weights scaled, one bias entry shifted, one BN statistic changed, a
conv kernel transposed, a channel's sign flipped. A *rounding-level* change
moves every weight of one layer by about one unit in the last place. The
mutation suite (``tests/test_verify_mutations.py``, ``benchmarks/verify_mutations.py``)
plants both kinds in random layers and measures verify's detection rate and the
smallest relative change it catches (its power on those inputs).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

__all__ = ["REAL_KINDS", "Mutation", "layers", "plant", "plant_rounding"]

REAL_KINDS = ("channel-weight", "bias", "bn-statistic", "transposed-kernel", "sign-flip")


@dataclasses.dataclass
class Mutation:
    """A mutated copy of a model and what was changed."""

    model: nn.Module
    kind: str
    layer: str
    detail: str


def _fits(module: nn.Module, kind: str) -> bool:
    if kind == "bn-statistic":
        return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.modules.conv._ConvNd | nn.Linear) or not isinstance(weight, torch.Tensor):
        return False
    if kind == "bias":
        return module.bias is not None
    if kind == "transposed-kernel":
        return weight.dim() >= 4 and weight.shape[-1] == weight.shape[-2] >= 2
    return True


def layers(model: nn.Module, kind: str) -> list[str]:
    """Names of the modules a mutation of ``kind`` can be planted in."""
    return [name for name, module in model.named_modules() if _fits(module, kind)]


def plant(model: nn.Module, kind: str, rng: np.random.Generator, size: float = 0.1) -> Mutation | None:
    """A copy of ``model`` with one real change of ``kind`` in a random layer, or None where none fits.

    Args:
        model: Not modified.
        kind: One of :data:`REAL_KINDS`.
        rng: Picks the layer and channel.
        size: Relative size of the change (scale factor 1 + size, or a shift of size x the layer's scale).
    """
    names = layers(model, kind)
    if not names:
        return None
    mutant = copy.deepcopy(model)
    name = names[int(rng.integers(len(names)))]
    module = mutant.get_submodule(name)
    with torch.no_grad():
        if kind == "bn-statistic":
            channel = int(rng.integers(module.running_var.numel()))
            module.running_var[channel] *= 1 + size
            return Mutation(mutant, kind, name, f"running_var[{channel}] x {1 + size:g}")
        weight = module.weight
        channel = int(rng.integers(weight.shape[0]))
        if kind == "channel-weight":
            weight[channel] *= 1 + size
            return Mutation(mutant, kind, name, f"weight[{channel}] x {1 + size:g}")
        if kind == "bias":
            scale = float(module.bias.abs().max()) or float(weight.abs().max())
            module.bias[channel] += size * scale
            return Mutation(mutant, kind, name, f"bias[{channel}] + {size:g} x {scale:.3g}")
        if kind == "sign-flip":
            weight[channel] *= -1
            return Mutation(mutant, kind, name, f"weight[{channel}] x -1")
        if kind == "transposed-kernel":
            if torch.equal(weight, weight.transpose(-1, -2)):
                return None
            weight.copy_(weight.transpose(-1, -2).contiguous())
            return Mutation(mutant, kind, name, "every kernel transposed")
    raise ValueError(f"unknown mutation kind {kind!r}")


def plant_rounding(model: nn.Module, rng: np.random.Generator, ulps: float = 1.0) -> Mutation | None:
    """A copy with one layer's weights moved by about ``ulps`` units in the last place (each up or down)."""
    names = layers(model, "channel-weight")
    if not names:
        return None
    mutant = copy.deepcopy(model)
    name = names[int(rng.integers(len(names)))]
    weight = mutant.get_submodule(name).weight
    eps = torch.finfo(weight.dtype).eps
    with torch.no_grad():
        signs = torch.from_numpy(rng.choice([-1.0, 1.0], size=tuple(weight.shape))).to(weight.dtype)
        weight.mul_(1 + signs * ulps * eps / 2)
    return Mutation(mutant, "rounding", name, f"every weight x (1 +- {ulps:g} ulp)")


def effect(reference: nn.Module, mutant: nn.Module, input_shapes: list[tuple[int, ...]], draws: int = 3) -> float:
    """How far beyond verify's bound a mutation moves the output, computed exactly (float64).

    The mutant runs in float64, so rounding plays no part: a value over 1 means
    the change itself, not noise, exceeds what verify allows (the original's own
    float32 error on the element's slice and the slice's scale); under 1, it is
    within that bound. Same inputs and bound as :func:`bnfold.deploy.verify.verify`.
    """
    from bnfold.deploy.verify import TOLERANCES, _allowed, _draws, _run, _truth

    rtol, atol_factor = TOLERANCES["float32"]
    worst = 0.0
    for batch in _draws([(tuple(s), np.float32) for s in input_shapes], draws):
        truth = _truth(reference, batch)
        own = _run(reference, batch, "torch-cpu")
        moved = _truth(mutant, batch)
        for t, o, m in zip(truth, own, moved, strict=True):
            limit = _allowed(np.asarray(t, np.float64), np.asarray(o, np.float64), rtol, atol_factor)
            ratio = np.abs(np.asarray(m, np.float64) - t) / np.maximum(limit, np.finfo(np.float64).tiny)
            worst = max(worst, float(ratio.max()))
    return worst
