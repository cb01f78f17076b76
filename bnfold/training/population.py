"""Population statistics for every BatchNorm: the BN paper's Algorithm 2, on one process or many.

For each BN, over the batches given, with the network in training mode (so every BN
normalises with its batch statistics, as in training) and gradients off:

    E[x]   = sum_B m_B * mu_B / sum_B m_B
    Var[x] = sum_B m_B * sigma_B^2 / sum_B (m_B - 1)

where ``m_B`` is the number of values per channel in batch B (batch size times spatial
positions) and ``sigma_B^2`` the biased batch variance. With equal batches this is
exactly Algorithm 2's ``E_B[mu_B]`` and ``m/(m-1) * E_B[sigma_B^2]``; with unequal ones
each batch weighs by its number of values (a short last batch counts for what it holds),
and the variance is the pooled unbiased within-batch variance. Sums are kept in float64
per channel; under torch.distributed they are all-reduced, so every rank ends with the
statistics one process would compute over the union of the batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.errors import BnfoldError, first_line
from bnfold.training.distributed import all_reduce_sum

__all__ = ["PopulationStats", "population_statistics"]


@dataclasses.dataclass
class _Sums:
    total: torch.Tensor  # sum of x per channel
    within: torch.Tensor  # sum over batches of sum (x - mu_B)^2 per channel
    values: torch.Tensor  # sum of m_B (float64 scalar)
    batches: torch.Tensor  # number of batches seen (float64 scalar)


@dataclasses.dataclass
class PopulationStats:
    """What :func:`population_statistics` did."""

    batches: int  # on all ranks together
    bn_layers: int
    values_per_channel: dict[str, int]
    world_size: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def _default_forward(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        model(batch[0])
    else:
        raise BnfoldError("batches must be tensors or (input, target) pairs; pass forward= for other formats")


def _run_batches(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None,
    forward: Callable[[nn.Module, Any], None],
    device: torch.device,
    progress: bool,
) -> int:
    """Run the batches through the model in train mode (the hooks sum what each BN sees); return how many ran."""
    from tqdm import tqdm

    count = 0
    with torch.no_grad():
        for batch in tqdm(batches, total=num_batches, desc="population statistics", disable=not progress, leave=False):
            if num_batches is not None and count >= num_batches:
                break
            if isinstance(batch, torch.Tensor):
                batch = batch.to(device)
            elif isinstance(batch, list | tuple):
                batch = type(batch)(b.to(device) if isinstance(b, torch.Tensor) else b for b in batch)
            try:
                forward(model, batch)
            except (ValueError, RuntimeError) as error:
                raise BnfoldError(f"the model failed on batch {count} in train mode: {first_line(error)}") from None
            count += 1
    return count


def _write_statistics(name: str, module: _BatchNorm, s: _Sums) -> int:
    """Set one BN's running mean and (unbiased, Algorithm 2) variance from its sums; return values per channel."""
    dof = float(s.values - s.batches)
    if float(s.values) == 0 or dof <= 0:
        raise BnfoldError(f"BN {name} saw {int(s.values)} value(s) per channel; population statistics need more")
    with torch.no_grad():
        module.running_mean.copy_((s.total / s.values).to(module.running_mean.dtype))
        module.running_var.copy_((s.within / dof).to(module.running_var.dtype))
        if module.num_batches_tracked is not None:
            module.num_batches_tracked.fill_(int(s.batches))
    return int(s.values)


def population_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], None] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> PopulationStats:
    """Replace every BN's running mean and variance with population statistics.

    Args:
        model: The network; its BNs (all ``_BatchNorm`` kinds, SyncBatchNorm
            included) get new ``running_mean`` / ``running_var``.
        batches: An iterable of tensors or ``(input, target)`` pairs.
        num_batches: Stop after this many batches.
        forward: ``forward(model, batch)`` for other batch formats.
        device: Move tensor batches here first (default: the model's device).
        progress: Show a progress bar on stderr.

    Returns:
        Counts of what was used. The model is left in eval mode.

    Raises:
        BnfoldError: No BN with running statistics, or fewer than two values per channel.
    """
    forward = forward or _default_forward
    bns = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.running_mean is not None}
    if not bns:
        raise BnfoldError("the model has no BatchNorm that tracks running statistics")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sums = {
        name: _Sums(
            torch.zeros(m.num_features, dtype=torch.float64, device=device),
            torch.zeros(m.num_features, dtype=torch.float64, device=device),
            torch.zeros((), dtype=torch.float64, device=device),
            torch.zeros((), dtype=torch.float64, device=device),
        )
        for name, m in bns.items()
    }

    def hook_for(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().to(torch.float64)
            x = x.transpose(0, 1).reshape(x.shape[1], -1)  # channels x (batch * spatial)
            m = x.shape[1]
            mean = x.mean(dim=1)
            s = sums[name]
            s.total += x.sum(dim=1)
            s.within += ((x - mean[:, None]) ** 2).sum(dim=1)
            s.values += m
            s.batches += 1

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in bns.items()]
    was_training = model.training
    model.train()
    try:
        count = _run_batches(model, batches, num_batches, forward, device, progress)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        for s in sums.values():
            for t in (s.total, s.within, s.values, s.batches):
                all_reduce_sum(t)
    per_channel = {name: _write_statistics(name, module, sums[name]) for name, module in bns.items()}
    model.eval()
    calls = int(next(iter(sums.values())).batches)  # batches seen by the first BN, on all ranks together
    return PopulationStats(calls if world > 1 else count, len(bns), per_channel, world)
