"""Property: random small architectures with random BN statistics fold to the same function."""

import torch
from conftest import assert_equivalent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bnfold
from bnfold.zoo import randomize_batchnorm

BLOCKS = ["conv_bn", "bn_conv", "convt_bn", "relu", "bn", "conv_pad", "bn_conv_pad", "sum_bn"]


class SumBN(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.a(x) + self.b(x))


def _build(blocks, channels, groups_choice):
    layers, c = [], 4
    for i, block in enumerate(blocks):
        out = channels[i % len(channels)]
        g = groups_choice if c % groups_choice == 0 and out % groups_choice == 0 else 1
        if block == "conv_bn":
            layers += [nn.Conv2d(c, out, 3, padding=1, groups=g), nn.BatchNorm2d(out)]
            c = out
        elif block == "bn_conv":
            layers += [nn.BatchNorm2d(c), nn.Conv2d(c, out, 1, groups=g)]
            c = out
        elif block == "convt_bn":
            layers += [nn.ConvTranspose2d(c, out, 1, groups=g), nn.BatchNorm2d(out)]
            c = out
        elif block == "conv_pad":
            layers += [nn.Conv2d(c, out, 3, padding=1)]
            c = out
        elif block == "bn_conv_pad":
            layers += [nn.BatchNorm2d(c), nn.Conv2d(c, out, 3, padding=1)]
            c = out
        elif block == "sum_bn":
            layers.append(SumBN(c, out))
            c = out
        elif block == "relu":
            layers.append(nn.ReLU())
        else:
            layers.append(nn.BatchNorm2d(c))
    layers += [nn.Flatten(), nn.BatchNorm1d(c * 16), nn.Linear(c * 16, 3), nn.BatchNorm1d(3)]
    return nn.Sequential(*layers)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=6),
    channels=st.lists(st.sampled_from([2, 4, 6, 8]), min_size=1, max_size=3),
    groups=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
    with_inputs=st.booleans(),
)
def test_random_architecture_folds_to_the_same_function(blocks, channels, groups, seed, with_inputs):
    model = randomize_batchnorm(_build(blocks, channels, groups), seed).eval()
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    folded, report = bnfold.fold(model, x if with_inputs else None)
    assert report.bn_total == sum(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in model.modules())
    remaining = sum(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in folded.modules())
    assert remaining == report.bn_kept
    for entry in report.layers:
        assert entry.folded or entry.reason
    assert_equivalent(model, folded, x, tolerance=1e-4)
