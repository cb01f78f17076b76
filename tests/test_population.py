"""Population statistics (Algorithm 2) against a direct float64 computation, and across 2 processes."""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from bnfold.errors import BnfoldError
from bnfold.training import population_statistics


def _expected(batches, reduce_dims):
    """The formula written out: E = sum m_B mu_B / sum m_B, Var = sum m_B sigma_B^2 / sum (m_B - 1)."""
    means, biased_vars, ms = [], [], []
    for x in batches:
        x = x.double()
        means.append(x.mean(dim=reduce_dims))
        biased_vars.append(x.var(dim=reduce_dims, unbiased=False))
        ms.append(x.numel() // x.shape[1])
    m = torch.tensor(ms, dtype=torch.float64)[:, None]
    mean = (torch.stack(means) * m).sum(0) / m.sum()
    var = (torch.stack(biased_vars) * m).sum(0) / (m - 1).sum()
    return mean, var


@pytest.mark.parametrize(
    "bn,shapes,dims",
    [
        (nn.BatchNorm1d(3), [(8, 3), (8, 3), (8, 3)], (0,)),
        (nn.BatchNorm1d(3), [(4, 3, 5), (4, 3, 5)], (0, 2)),
        (nn.BatchNorm2d(3), [(4, 3, 2, 5), (4, 3, 2, 5)], (0, 2, 3)),
        (nn.BatchNorm3d(2), [(2, 2, 2, 3, 4), (2, 2, 2, 3, 4)], (0, 2, 3, 4)),
        (nn.BatchNorm2d(3), [(6, 3, 4, 4), (6, 3, 4, 4), (1, 3, 4, 4)], (0, 2, 3)),  # a short last batch
    ],
)
def test_matches_the_formula(bn, shapes, dims):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(s, generator=g) * 3 + 1 for s in shapes]
    model = nn.Sequential(bn)
    stats = population_statistics(model, batches, progress=False)
    mean, var = _expected(batches, dims)
    assert torch.allclose(bn.running_mean.double(), mean, rtol=1e-6)
    assert torch.allclose(bn.running_var.double(), var, rtol=1e-6)
    assert stats.batches == len(shapes) and not model.training


def test_equal_batches_are_algorithm_2_exactly():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(10, 4, generator=g) for _ in range(5)]
    bn = nn.BatchNorm1d(4)
    population_statistics(nn.Sequential(bn), batches, progress=False)
    m = 10
    mu = torch.stack([b.double().mean(0) for b in batches]).mean(0)
    var = m / (m - 1) * torch.stack([b.double().var(0, unbiased=False) for b in batches]).mean(0)
    assert torch.allclose(bn.running_mean.double(), mu, rtol=1e-6)
    assert torch.allclose(bn.running_var.double(), var, rtol=1e-6)


def test_deeper_bns_see_batch_normalised_inputs_and_targets_are_ignored():
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    batches = [(torch.randn(16, 4, generator=g), torch.zeros(16)) for _ in range(3)]
    population_statistics(model, batches, num_batches=2, progress=False)
    # the second BN sees what training-mode BN1 produces
    inner = []
    reference = nn.Sequential(*[m for m in model[:4]]).train()
    with torch.no_grad():
        for x, _ in batches[:2]:
            inner.append(reference(x))
    mean, var = _expected(inner, (0,))
    assert torch.allclose(model[4].running_mean.double(), mean, rtol=1e-5)
    assert torch.allclose(model[4].running_var.double(), var, rtol=1e-5)


def test_errors():
    with pytest.raises(BnfoldError, match="no BatchNorm"):
        population_statistics(nn.Linear(2, 2), [torch.randn(2, 2)], progress=False)
    with pytest.raises(BnfoldError, match="batch 0"):
        population_statistics(nn.Sequential(nn.BatchNorm1d(2)), [torch.randn(1, 2)], progress=False)
    with pytest.raises(BnfoldError, match="1 value"):
        population_statistics(nn.Sequential(nn.BatchNorm2d(2)), [torch.randn(1, 2, 1, 1)], progress=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, batches, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        bn = nn.BatchNorm2d(3)
        stats = population_statistics(nn.Sequential(bn), batches[rank::world], progress=False)
        out[rank] = (bn.running_mean.clone(), bn.running_var.clone(), stats.world_size)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo test uses fork")
def test_two_gloo_processes_match_one_process_over_the_union():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 3, 4, 4, generator=g) * 2 - 1 for n in (5, 7, 3, 6)]
    single = nn.BatchNorm2d(3)
    population_statistics(nn.Sequential(single), batches, progress=False)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), batches, out), nprocs=2, join=True)
    for rank in (0, 1):
        mean, var, world = out[rank]
        assert world == 2
        assert torch.allclose(mean, single.running_mean, rtol=1e-6, atol=1e-7)
        assert torch.allclose(var, single.running_var, rtol=1e-6, atol=1e-7)
