"""The BN paper's MNIST experiment (Figure 1), by default on scikit-learn's digits.

Two networks, identical but for BN: 3 fully connected hidden layers of 100 sigmoid
units and a 10-way softmax, weights drawn from N(0, init_std^2), biases zero, trained
with plain SGD (the paper names no optimiser; ours is documented in the README) on
mini-batches of 60 drawn uniformly at random. Every ``eval_every`` steps: (a) held-out
accuracy, and (b, c) the 15th, 50th and 85th percentiles over the held-out set of the
input to one sigmoid of the last hidden layer (unit 0), with the network in inference
mode (BN uses its moving averages, as PyTorch keeps them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnfold.model_io.outputs import atomic_write
from bnfold.training.data import load_dataset
from bnfold.zoo import mlp_bn

__all__ = ["PaperConfig", "run_paper_experiment", "write_figure"]


@dataclasses.dataclass
class PaperConfig:
    """The experiment's settings."""

    data: str = "digits"
    steps: int = 50_000
    eval_every: int = 500
    batch_size: int = 60
    lr: float = 0.5
    init_std: float = 0.1
    seed: int = 0
    unit: int = 0


def _network(features: int, batchnorm: bool, init_std: float) -> nn.Sequential:
    model = mlp_bn(hidden=100, depth=3, activation="sigmoid", in_features=features, batchnorm=batchnorm)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, init_std)
            nn.init.zeros_(module.bias)
    return model


def _run(config: PaperConfig, batchnorm: bool, data: Any, progress: bool) -> dict[str, list[float]]:
    torch.manual_seed(config.seed)
    x, y = (torch.from_numpy(a) for a in (data.x_train, data.y_train))
    xt, yt = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    model = _network(x.shape[1], batchnorm, config.init_std)
    last_sigmoid = [m for m in model if isinstance(m, nn.Sigmoid)][-1]
    captured: list[torch.Tensor] = []
    last_sigmoid.register_forward_pre_hook(lambda m, args: captured.append(args[0][:, config.unit].detach()))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(config.seed)
    curves: dict[str, list[float]] = {"step": [], "accuracy": [], "p15": [], "p50": [], "p85": []}
    from tqdm import tqdm

    label = "with BN" if batchnorm else "without BN"
    for step in tqdm(range(config.steps + 1), desc=f"paper-mnist {label}", disable=not progress, leave=False):
        if step % config.eval_every == 0:
            model.eval()
            captured.clear()
            with torch.no_grad():
                accuracy = float((model(xt).argmax(1) == yt).float().mean())
            values = captured[0].numpy()
            p15, p50, p85 = np.percentile(values, [15, 50, 85])
            for key, value in zip(
                ("step", "accuracy", "p15", "p50", "p85"), (step, accuracy, p15, p50, p85), strict=True
            ):
                curves[key].append(float(value))
            model.train()
        if step == config.steps:
            break
        index = torch.randint(0, len(x), (config.batch_size,), generator=generator)
        captured.clear()
        loss = loss_fn(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return curves


def run_paper_experiment(config: PaperConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train both networks and return their curves (JSON-ready)."""
    data = load_dataset(config.data, config.seed)
    return {
        "config": dataclasses.asdict(config),
        "dataset": {"name": data.name, "train": len(data.x_train), "test": len(data.x_test)},
        "without_bn": _run(config, False, data, progress),
        "with_bn": _run(config, True, data, progress),
    }


def write_figure(result: dict[str, Any], png: str | os.PathLike, json_path: str | os.PathLike) -> None:
    """The three panels of Figure 1 as a PNG, and the curves as JSON, both written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label, style in (("without_bn", "Without BN", "--"), ("with_bn", "With BN", "-")):
        c = result[key]
        axes[0].plot(c["step"], c["accuracy"], style, label=label)
    axes[0].set(title="(a) held-out accuracy", xlabel="training steps", ylabel="accuracy")
    axes[0].legend()
    for ax, key, title in ((axes[1], "without_bn", "(b) without BN"), (axes[2], "with_bn", "(c) with BN")):
        c = result[key]
        for q in ("p15", "p50", "p85"):
            ax.plot(c["step"], c[q], label=q.replace("p", "") + "th pct")
        ax.set(title=f"{title}: input to a last-layer sigmoid", xlabel="training steps")
        ax.legend()
    low = min(min(result[k][q]) for k in ("without_bn", "with_bn") for q in ("p15",))
    high = max(max(result[k][q]) for k in ("without_bn", "with_bn") for q in ("p85",))
    for ax in axes[1:]:
        ax.set_ylim(low - 0.1 * abs(high - low), high + 0.1 * abs(high - low))
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
