"""Small BatchNorm architectures, addressable by name, for the demo, tests and training.

Every model takes a 64-value digit (scikit-learn's 8x8 digits) in the shape its
``input_shape`` gives and returns 10 logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["ZOO", "ZooEntry", "build", "example_input", "randomize_batchnorm"]


def mlp_bn(
    hidden: int = 100, depth: int = 3, activation: str = "sigmoid", in_features: int = 64, batchnorm: bool = True
) -> nn.Sequential:
    """The BN paper's MNIST net: ``depth`` x (Linear, BN, activation), then Linear; ``batchnorm=False`` drops BN."""
    act = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden) if batchnorm else nn.Identity(), act()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, 10))


def mlp_bn_before() -> nn.Sequential:
    """BN *before* each Linear: only a fold into the following layer removes it."""
    return nn.Sequential(nn.BatchNorm1d(64), nn.Linear(64, 64), nn.ReLU(), nn.BatchNorm1d(64), nn.Linear(64, 10))


def cnn_bn(width: int = 16) -> nn.Sequential:
    """Conv -> BN -> ReLU twice, then a classifier."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


class BasicBlock(nn.Module):
    """A ResNet basic block: two conv-BN pairs and a residual, projected when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNetTiny(nn.Module):
    """A ResNet-style net: stem, two stages of basic blocks, pooled classifier."""

    def __init__(self, width: int = 16, blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages: list[nn.Module] = []
        cin = width
        for stage in range(2):
            cout = width * 2**stage
            for b in range(blocks):
                stages.append(BasicBlock(cin, cout, stride=2 if stage and b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def conv1d_bn(width: int = 16) -> nn.Sequential:
    """1-D convolutions over the 64 pixels as a sequence."""
    return nn.Sequential(
        nn.Conv1d(1, width, 5, padding=2),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Conv1d(width, width, 5, stride=2),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )


def conv3d_bn(width: int = 8) -> nn.Sequential:
    """3-D convolutions over the digit as a 1x8x8 volume."""
    return nn.Sequential(
        nn.Conv3d(1, width, (1, 3, 3), padding=(0, 1, 1)),
        nn.BatchNorm3d(width),
        nn.ReLU(),
        nn.Conv3d(width, width, (1, 3, 3)),
        nn.BatchNorm3d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )


def deconv_groups(width: int = 8) -> nn.Sequential:
    """An encoder-decoder whose ConvTranspose layers use groups (Cin == Cout hides axis mistakes)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, stride=2, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.ConvTranspose2d(width, width, 2, stride=2, groups=4),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.ConvTranspose2d(width, 2 * width, 3, padding=1, groups=2),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


class ConcatBN(nn.Module):
    """Two conv branches concatenated on channels, then one BN over the concat."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.branch3 = nn.Conv2d(1, width, 3, padding=1)
        self.branch1 = nn.Conv2d(1, 2 * width, 1)
        self.bn = nn.BatchNorm2d(3 * width)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3 * width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.bn(torch.cat([self.branch3(x), self.branch1(x)], dim=1)))


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """A named architecture and the input it takes (without the batch axis)."""

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str


ZOO: dict[str, ZooEntry] = {
    "mlp-bn": ZooEntry(mlp_bn, (64,), "the BN paper's MLP: 3 x (Linear, BN, sigmoid), Linear"),
    "mlp-bn-before": ZooEntry(mlp_bn_before, (64,), "MLP with BN before its Linear layers"),
    "cnn-bn": ZooEntry(cnn_bn, (1, 8, 8), "two Conv2d-BN-ReLU, pooled classifier"),
    "resnet-tiny": ZooEntry(ResNetTiny, (1, 8, 8), "ResNet-style basic blocks with a projected residual"),
    "conv1d-bn": ZooEntry(conv1d_bn, (1, 64), "Conv1d-BN1d net"),
    "conv3d-bn": ZooEntry(conv3d_bn, (1, 1, 8, 8), "Conv3d-BN3d net"),
    "deconv-groups": ZooEntry(deconv_groups, (1, 8, 8), "ConvTranspose2d with groups, then BN"),
    "concat-bn": ZooEntry(ConcatBN, (1, 8, 8), "BN after a channel concat of two convs"),
}


def build(name: str, **kwargs: object) -> nn.Module:
    """Build the zoo model ``name``.

    Raises:
        KeyError: ``name`` is not in :data:`ZOO`.
    """
    return ZOO[name].factory(**kwargs)


def example_input(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded random input for the zoo model ``name``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *ZOO[name].input_shape), generator=generator)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters (for demos and tests).

    Means spread around +-1, variances over [0.1, 4], gamma of both signs: a
    freshly built BN (mean 0, var 1, gamma 1, beta 0) would hide most fold bugs.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator))
                module.running_var.copy_(torch.rand(c, generator=generator) * 3.9 + 0.1)
                if module.affine:
                    module.weight.copy_(torch.randn(c, generator=generator))
                    module.bias.copy_(torch.randn(c, generator=generator))
    return model
