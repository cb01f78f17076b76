"""``bnfold train``: train a BN network, then give it population statistics, on one process or under torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from bnfold import zoo
from bnfold.errors import BnfoldError
from bnfold.model_io.checkpoint import build_arch, trained_checkpoint
from bnfold.model_io.outputs import atomic_write
from bnfold.training import distributed
from bnfold.training.data import Dataset, load_dataset
from bnfold.training.population import population_statistics

__all__ = ["TrainConfig", "TrainResult", "input_shape_for", "train"]


@dataclasses.dataclass
class TrainConfig:
    """Everything that decides a training run (saved in the checkpoint)."""

    arch: str = "resnet-tiny"
    arch_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: str = "digits"
    optimizer: str = "adam"
    lr: float = 0.01
    epochs: int = 5
    steps: int | None = None
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    sync_bn: bool = False
    input_shape: tuple[int, ...] | None = None


@dataclasses.dataclass
class TrainResult:
    """A trained model with its population statistics, and what was measured."""

    model: nn.Module
    config: TrainConfig
    input_shape: tuple[int, ...]  # one example, without the batch axis
    metrics: dict[str, Any]
    statistics: dict[str, Any]

    def checkpoint(self) -> dict[str, Any]:
        """A self-describing, weights-only-loadable checkpoint."""
        config = dataclasses.asdict(self.config)
        config["arch_kwargs"] = json.dumps(config["arch_kwargs"])
        config["input_shape"] = list(self.input_shape)
        return trained_checkpoint(
            self.model,
            self.config.arch,
            self.config.arch_kwargs,
            self.input_shape,
            statistics=self.statistics,
            config=config,
            metrics=self.metrics,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the checkpoint atomically."""
        payload = self.checkpoint()
        atomic_write(path, lambda tmp: torch.save(payload, tmp))


def input_shape_for(arch: str, data: Dataset, given: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """One example's shape for ``arch`` on ``data`` (zoo shapes adapt to the image size)."""
    if given:
        return given
    template = zoo.ZOO[arch].input_shape if arch in zoo.ZOO else (data.features,)
    if len(template) == 1:
        return (data.features,)
    if len(template) == 2:
        return (1, data.features)
    return (*template[:-2], data.side, data.side)


def _arch_kwargs(arch: str, data: Dataset, kwargs: dict[str, Any]) -> dict[str, Any]:
    if arch in ("mlp-bn", "mlp-bn-before") and "in_features" not in kwargs:
        return {**kwargs, "in_features": data.features}
    return kwargs


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), 512):
            logits = model(x[start : start + 512].to(device))
            correct += int((logits.argmax(1).cpu() == y[start : start + 512]).sum())
    return correct / max(1, len(x))


def _check_config(config: TrainConfig) -> None:
    if config.optimizer not in ("adam", "sgd"):
        raise BnfoldError(f"--optimizer {config.optimizer}: use adam or sgd")
    if config.batch_size < 2 or config.lr <= 0 or (config.steps is not None and config.steps < 1) or config.epochs < 1:
        raise BnfoldError("batch size must be at least 2; lr, steps and epochs positive")
    if config.sync_bn and config.device != "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BnfoldError(
            "--sync-bn: PyTorch's SyncBatchNorm runs on GPUs only; add --device cuda (population "
            "statistics are pooled across ranks either way)"
        )


@dataclasses.dataclass
class _Progress:
    """Steps taken and running training loss / accuracy."""

    step: int = 0
    epoch: int = 0
    loss: float = 0.0
    correct: int = 0
    seen: int = 0


def _train_steps(
    wrapped: nn.Module,
    loader: DataLoader,
    sampler: DistributedSampler | None,
    optimizer: torch.optim.Optimizer,
    total: int,
    device: torch.device,
    bar: Any,  # noqa: ANN401 - a tqdm bar
) -> _Progress:
    """Mini-batch training (the BN paper's Algorithm 1 in every BN) for ``total`` steps."""
    loss_fn = nn.CrossEntropyLoss()
    done = _Progress()
    while done.step < total:
        if sampler is not None:
            sampler.set_epoch(done.epoch)
        wrapped.train()
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            logits = wrapped(xb)
            loss = loss_fn(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done.step += 1
            done.loss += float(loss.detach()) * len(yb)
            done.correct += int((logits.argmax(1) == yb).sum())
            done.seen += len(yb)
            bar.update(1)
            bar.set_postfix(loss=f"{done.loss / done.seen:.3f}", acc=f"{done.correct / done.seen:.3f}")
            if done.step >= total:
                break
        done.epoch += 1
    return done


def _setup(
    config: TrainConfig, device: torch.device, rank: int, world: int
) -> tuple[TrainConfig, nn.Module, TensorDataset, DataLoader, DistributedSampler | None, tuple]:
    """The data (sharded under torchrun), the model, and the config with its input shape and kwargs filled in."""
    data = load_dataset(config.data, config.seed)
    shape = input_shape_for(config.arch, data, config.input_shape)
    kwargs = _arch_kwargs(config.arch, data, config.arch_kwargs)
    config = dataclasses.replace(config, arch_kwargs=kwargs, input_shape=shape)
    model = build_arch(config.arch, kwargs).to(device)
    if config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    x_train, y_train = data.tensors(shape, "train")
    dataset = TensorDataset(x_train, y_train)
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=config.seed) if world > 1 else None
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        dataset, config.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True, generator=generator
    )
    if len(loader) == 0:
        raise BnfoldError(f"batch size {config.batch_size} exceeds the {len(dataset) // world} training examples")
    return config, model, dataset, loader, sampler, data.tensors(shape, "test")


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train ``config.arch`` on ``config.data``, then compute population statistics (Algorithm 2).

    Under torchrun (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel
    (gloo on CPU, nccl on GPU), the data is sharded, and the population statistics are
    pooled across ranks, so every rank holds the same model.

    Raises:
        BnfoldError: Bad configuration or data.
    """
    _check_config(config)
    rank, world = distributed.start(config.device)
    device = distributed.device_for(config.device)
    torch.manual_seed(config.seed)
    config, model, dataset, loader, sampler, (x_test, y_test) = _setup(config, device, rank, world)
    kwargs, shape = config.arch_kwargs, config.input_shape
    wrapped: nn.Module = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = (torch.optim.Adam if config.optimizer == "adam" else torch.optim.SGD)(
        wrapped.parameters(), lr=config.lr
    )
    total = config.steps or config.epochs * len(loader)
    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"train {config.arch}", disable=not progress or rank != 0, leave=False)
    start = time.perf_counter()
    done = _train_steps(wrapped, loader, sampler, optimizer, total, device, bar)
    bar.close()
    seconds = time.perf_counter() - start
    moving = _accuracy(model, x_test, y_test, device)
    if config.sync_bn:  # same buffers as the architecture's own BNs: plain BN, portable and free of collectives
        plain = build_arch(config.arch, kwargs).to(device)
        plain.load_state_dict(model.state_dict())
        model = plain
    # each rank takes every world-th example, without the padding a DistributedSampler adds: the pooled
    # statistics are then exactly those of one process over the training set
    shard = Subset(dataset, range(rank, len(dataset), world))
    stats_loader = DataLoader(shard, config.batch_size, shuffle=False)
    pop = population_statistics(model, stats_loader, device=device, progress=progress and rank == 0)
    metrics = {
        "steps": done.step,
        "epochs": done.epoch,
        "train_seconds": round(seconds, 2),
        "train_loss": done.loss / max(1, done.seen),
        "train_accuracy": done.correct / max(1, done.seen),
        "test_accuracy_moving_average": moving,
        "test_accuracy": _accuracy(model, x_test, y_test, device),
        "test_examples": len(x_test),
        "world_size": world,
    }
    statistics = {
        "method": "population statistics (BN paper, Algorithm 2): E[x] = sum m_B mu_B / sum m_B, "
        "Var[x] = sum m_B sigma_B^2 / sum (m_B - 1), over one pass of the training set in train mode "
        "(under torch.distributed each rank takes every world-th example and the sums are all-reduced)",
        "batches": pop.batches,
        "batch_size": config.batch_size,
        "world_size": world,
    }
    return TrainResult(model.cpu().eval(), config, shape, metrics, statistics)
