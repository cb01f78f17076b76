"""Every fold rule on every graph kind: one table of tiny models, each with its must-not-fold twin.

Each row runs as a torch module (``bnfold.fold``), as a torch.export program and as an
ONNX export with every BN kept (``fold_onnx``). The row states how many BN must stay
(per graph kind where they differ) and a word the report must show (a note when
folded, the reason when kept); every result is compared with the float64 original.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import randomized
from torch import nn

import bnfold
from bnfold.deploy.export import export_keeping_bn
from bnfold.deploy.onnx_reference import run_ort
from bnfold.onnx_fold import fold_onnx

KINDS = ("modules", "torch.export", "onnx")


class Row(NamedTuple):
    """One rule case: the model, its input shape, BN left (per graph kind), a word the report shows."""

    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    kept: int | dict[str, int]
    word: str = ""


class Net(nn.Module):
    """A model from a forward function over named layers."""

    def __init__(self, forward: Callable, **layers: nn.Module) -> None:
        super().__init__()
        self.fn = forward
        for name, layer in layers.items():
            self.add_module(name, layer)

    def forward(self, x):
        return self.fn(self, x)


def _signed(bn: nn.BatchNorm2d, negative: bool = False) -> nn.BatchNorm2d:
    """Scales of one sign, kept through ``randomized`` (a max pool commutes only with positive ones)."""
    original = bn.reset_running_stats

    def fixed() -> None:
        original()

    bn.reset_running_stats = fixed
    bn._bnfold_sign = -1.0 if negative else 1.0
    return bn


def _conv(cin=3, cout=4, k=3, **kw):
    return nn.Conv2d(cin, cout, k, **kw)


def _bn(c=4):
    return nn.BatchNorm2d(c)


def _residual(m, x):
    y = m.a(x)
    return m.bn(y) + y


def _rows_bn(m, x):
    """timm LeViT's LinearNorm: a Linear on (B, N, C), BatchNorm1d over its rows, reshaped back."""
    y = m.fc(x)
    return m.bn(y.flatten(0, 1)).reshape_as(y)


def _positions_bn(m, x):
    """The twin: BatchNorm1d over (B, N * C), one channel per position and feature: no per-feature map."""
    return m.bn(m.fc(x).flatten(1))


def _sum2(m, x):
    return m.bn(m.a(x) + m.b(x))


def _sum3(m, x):
    return m.bn((m.a(x) + m.b(x)) + m.c(x))


def _sum_input(m, x):
    return m.bn(m.a(torch.relu(x)) + x)  # not parallel branches of one tensor, so no merge either


def _sum3_inner_read(m, x):
    ab = m.a(x) + m.b(x)
    return m.bn(ab + m.c(x)) + ab


def _cat(dim, second):
    def forward(m, x):
        return m.bn(torch.cat([m.a(x), second(m, x)], dim))

    return forward


def _pool_before(m, x):
    return m.bn(m.pool(m.a(x)))


def _pool_after(m, x):
    return m.a(m.pool(m.bn(x)))


def _flatten_linear(m, x):
    return m.fc(torch.flatten(m.bn(x), 1))


def _view_linear(m, x):
    y = m.bn(x)
    return m.fc(y.view(y.size(0), -1))


def _view_linear_twin(m, x):
    y = m.bn(x)
    return m.fc(y.view(y.size(0), 4, -1))


def _shared_bn(m, x):
    return m.bn(m.a(x)) + m.bn(m.b(x))


def _shared_bn_twin(m, x):
    return m.bn(m.a(torch.relu(x))) + m.bn(x)


def _repvgg(m, x):
    return torch.relu(m.kxk(x) + m.one(x) + m.identity(x))


def _repvgg_twin(m, x):
    return torch.relu(m.kxk(x) + m.one(x) + m.identity(torch.relu(x)))


def _branches(identity_c=4):
    return {
        "kxk": nn.Sequential(_conv(4, 4, 3, padding=1, bias=False), _bn()),
        "one": nn.Sequential(_conv(4, 4, 1, bias=False), _bn()),
        "identity": _bn(identity_c),
    }


def _repvit(m, x):
    """timm RepViT's RepVggDw after a stem: BN on the sum of two convs and the stem's output itself."""
    x = m.stem(x)
    return m.bn(m.kxk(x) + m.one(x) + x)


def _repvit_twin(m, x):
    x = m.stem(x)
    return m.bn(m.kxk(x) + m.one(x) + torch.tanh(x))  # a branch that is not linear in x: no merge, BN stays


def _repvit_layers():
    return {
        "stem": nn.Sequential(_conv(4, 4, 1), _bn()),
        "kxk": nn.Sequential(_conv(4, 4, 3, padding=1, groups=4, bias=False), _bn()),
        "one": _conv(4, 4, 1, groups=4),
        "bn": _bn(),
    }


def _repghost(m, x):
    """timm RepGhost's module: a depthwise conv + BN of ``x1`` plus BN(Identity(x1)), then a shortcut of ``x``."""
    x1 = torch.relu(m.primary(x))
    return m.act(m.cheap(x1) + m.fusion_bn(m.fusion_conv(x1))) + x


def _repghost_twin(m, x):
    x1 = torch.relu(m.primary(x))
    return m.act(m.cheap(x1) + m.fusion_bn(m.fusion_conv(x))) + x  # the BN branch reads x, not x1


def _repghost_layers():
    return {
        "primary": nn.Sequential(_conv(4, 4, 1, bias=False), _bn()),
        "cheap": nn.Sequential(_conv(4, 4, 3, padding=1, groups=4, bias=False), _bn()),
        "fusion_conv": nn.Identity(),
        "fusion_bn": _bn(),
        "act": nn.Identity(),
    }


def _repmixer(m, x):
    """timm FastViT's RepMixer: ``x + scale * (mixer(x) - norm(x))``, mixer a conv + BN and BN branch, norm a BN."""
    return x + 0.5 * (m.kxk(x) + m.id1(x) - m.id2(x))


def _repmixer_twin(m, x):
    return x + 0.5 * (m.kxk(x) + m.id1(x) - m.id2(torch.tanh(x)))  # the subtracted BN reads another tensor


def _repmixer_layers():
    return {"kxk": nn.Sequential(_conv(4, 4, 3, padding=1, groups=4, bias=False), _bn()), "id1": _bn(), "id2": _bn()}


def _linear_cat(dim):
    def forward(m, x):
        return m.bn(torch.cat([m.a(x), m.b(x)], dim))

    return forward


ROWS = {
    "preceding": Row(lambda: nn.Sequential(_conv(), _bn()), (2, 3, 6, 6), 0),
    "preceding/twin-output-read-twice": Row(lambda: Net(_residual, a=_conv(), bn=_bn()), (2, 3, 6, 6), 1, "read by"),
    "following": Row(lambda: nn.Sequential(_bn(3), _conv()), (2, 3, 6, 6), 0),
    "following/twin-zero-padded": Row(lambda: nn.Sequential(_bn(3), _conv(padding=1)), (2, 3, 6, 6), 1, "zero-pads"),
    "following-through-flatten": Row(
        lambda: Net(_flatten_linear, bn=_bn(3), fc=nn.Linear(48, 5)), (2, 3, 4, 4), 0, "through"
    ),
    "following-through-view-of-batch-size": Row(
        lambda: Net(_view_linear, bn=_bn(3), fc=nn.Linear(48, 5)), (2, 3, 4, 4), 0, "through"
    ),
    "following-through-view/twin-3d": Row(
        lambda: Net(_view_linear_twin, bn=_bn(3), fc=nn.Linear(12, 5)), (2, 3, 4, 4), 1
    ),
    "following-through-dropout": Row(
        lambda: nn.Sequential(nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 5)), (4, 6), 0, "through"
    ),
    "following-through-dropout/twin-activation": Row(
        lambda: nn.Sequential(nn.BatchNorm1d(6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 5)), (4, 6), 1
    ),
    "following-through-pool-flatten-dropout": Row(  # timm's classifier head (visformer): pool, flatten, drop, fc
        lambda: nn.Sequential(_bn(3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(3, 5)),
        (2, 3, 4, 4),
        0,
        "through",
    ),
    "following-through-pool-flatten-dropout/twin-activation": Row(
        lambda: nn.Sequential(_bn(3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.ReLU(), nn.Linear(3, 5)),
        (2, 3, 4, 4),
        1,
    ),
    "preceding-through-identity": Row(
        lambda: nn.Sequential(nn.Linear(6, 5), nn.Identity(), nn.BatchNorm1d(5)), (4, 6), 0
    ),
    "preceding-through-row-reshape": Row(
        lambda: Net(_rows_bn, fc=nn.Linear(6, 4), bn=nn.BatchNorm1d(4)), (2, 3, 6), 0, "through"
    ),
    "preceding-through-row-reshape/twin-positions-as-channels": Row(
        lambda: Net(_positions_bn, fc=nn.Linear(6, 4), bn=nn.BatchNorm1d(12)), (2, 3, 6), 1, "last axis"
    ),
    "sum-of-two": Row(lambda: Net(_sum2, a=_conv(), b=_conv(), bn=_bn()), (2, 3, 6, 6), 0),
    "sum-of-three": Row(lambda: Net(_sum3, a=_conv(), b=_conv(), c=_conv(), bn=_bn()), (2, 3, 6, 6), 0),
    "sum/twin-input-summand": Row(lambda: Net(_sum_input, a=_conv(3, 3, 1), bn=_bn(3)), (2, 3, 6, 6), 1, "input"),
    "sum-of-three/twin-inner-sum-read": Row(
        lambda: Net(_sum3_inner_read, a=_conv(), b=_conv(), c=_conv(), bn=_bn()), (2, 3, 6, 6), 1
    ),
    "concat-channels": Row(
        lambda: Net(_cat(1, lambda m, x: m.b(x)), a=_conv(), b=_conv(3, 2), bn=_bn(6)), (2, 3, 6, 6), 0
    ),
    "concat-channels/twin-non-layer": Row(
        lambda: Net(_cat(1, lambda m, x: torch.relu(m.b(x))), a=_conv(), b=_conv(3, 2), bn=_bn(6)),
        (2, 3, 6, 6),
        1,
        "not a",
    ),
    "concat-spatial": Row(
        lambda: Net(_cat(2, lambda m, x: m.b(x)), a=_conv(), b=_conv(), bn=_bn()), (2, 3, 6, 6), 0, "whole BN"
    ),
    "concat-spatial/twin-input-part": Row(
        lambda: Net(_cat(2, lambda m, x: x), a=_conv(3, 3, 1), bn=_bn(3)), (2, 3, 6, 6), 1, "input"
    ),
    "concat-linear": Row(
        lambda: Net(_linear_cat(1), a=nn.Linear(6, 3), b=nn.Linear(6, 2), bn=nn.BatchNorm1d(5)), (4, 6), 0
    ),
    "concat-linear-batch-axis": Row(
        lambda: Net(_linear_cat(0), a=nn.Linear(6, 3), b=nn.Linear(6, 3), bn=nn.BatchNorm1d(3)), (4, 6), 0
    ),
    "max-pool-before": Row(
        lambda: Net(_pool_before, a=_conv(), pool=nn.MaxPool2d(2), bn=_signed(_bn())), (2, 3, 6, 6), 0, "through"
    ),
    "max-pool-before/twin-negative-scale": Row(
        lambda: Net(_pool_before, a=_conv(), pool=nn.MaxPool2d(2), bn=_signed(_bn(), negative=True)),
        (2, 3, 6, 6),
        1,
        "not positive",
    ),
    "avg-pool-after": Row(
        lambda: Net(_pool_after, bn=_bn(3), pool=nn.AvgPool2d(2), a=_conv()), (2, 3, 8, 8), 0, "through"
    ),
    "avg-pool-after/twin-padded-pool": Row(
        lambda: Net(_pool_after, bn=_bn(3), pool=nn.AvgPool2d(2, padding=1), a=_conv()), (2, 3, 8, 8), 1
    ),
    "adaptive-avg-pool-before": Row(
        lambda: Net(_pool_before, a=_conv(), pool=nn.AdaptiveAvgPool2d(1), bn=_bn()), (2, 3, 6, 6), 0
    ),
    "merge-parallel-branches": Row(lambda: Net(_repvgg, **_branches()), (2, 4, 6, 6), 0, "branch of"),
    "merge-parallel-branches/twin-identity-reads-another-tensor": Row(
        lambda: Net(_repvgg_twin, **_branches()), (2, 4, 6, 6), 1
    ),
    "merge-then-fold-bn-after-the-sum": Row(lambda: Net(_repvit, **_repvit_layers()), (2, 4, 6, 6), 0),
    "merge-then-fold-bn-after-the-sum/twin-nonlinear-branch": Row(
        lambda: Net(_repvit_twin, **_repvit_layers()), (2, 4, 6, 6), 1, "not a"
    ),
    "merge-inner-sum-beside-a-shortcut": Row(lambda: Net(_repghost, **_repghost_layers()), (2, 4, 6, 6), 0),
    "merge-inner-sum-beside-a-shortcut/twin-bn-reads-another-tensor": Row(
        lambda: Net(_repghost_twin, **_repghost_layers()), (2, 4, 6, 6), 1
    ),
    "merge-a-difference": Row(lambda: Net(_repmixer, **_repmixer_layers()), (2, 4, 6, 6), 0, "branch of"),
    "merge-a-difference/twin-bn-reads-another-tensor": Row(
        lambda: Net(_repmixer_twin, **_repmixer_layers()), (2, 4, 6, 6), 1
    ),
    "one-bn-after-several-layers": Row(
        lambda: Net(_shared_bn, a=_conv(), b=_conv(), bn=_bn()), (2, 3, 6, 6), 0, "each call"
    ),
    "one-bn-after-several-layers/twin-input-call": Row(
        lambda: Net(_shared_bn_twin, a=_conv(3, 3, 1), bn=_bn(3)), (2, 3, 6, 6), 1, "call 2 of 2"
    ),
}

# the words a kind cannot show: ONNX / aten have one BN node per call, the flatten twin's name differs, the
# ONNX exporter drops an eval-mode Dropout
_KIND_WORDS = {
    ("following-through-dropout", "onnx"),
    ("one-bn-after-several-layers", "torch.export"),
    ("one-bn-after-several-layers", "onnx"),
}
_KIND_WORDS |= {("one-bn-after-several-layers/twin-input-call", k) for k in ("torch.export", "onnx")}


def _prepared(row: Row) -> nn.Module:
    model = randomized(row.build())
    for module in model.modules():
        sign = getattr(module, "_bnfold_sign", None)
        if sign is not None:
            with torch.no_grad():
                module.weight.copy_(sign * (module.weight.abs() + 0.1))
    return model.eval()


def _fold(kind: str, model: nn.Module, x: torch.Tensor):
    """Fold on one graph kind; return the report and the folded model's output as float64 numpy."""
    if kind == "modules":
        folded, report = bnfold.fold(model, x)
        return report, folded(x).detach().double().numpy()
    if kind == "torch.export":
        program = torch.export.export(model, (x,)).module()
        folded, report = bnfold.fold(program)
        return report, folded(x).detach().double().numpy()
    folded, report = fold_onnx(export_keeping_bn(model, x))
    return report, run_ort(folded, {"input": x.numpy()})[0].astype(np.float64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(ROWS))
def test_rule_on_every_graph_kind(name: str, kind: str) -> None:
    row = ROWS[name]
    model = _prepared(row)
    x = torch.randn(row.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        truth = model.double()(x.double()).numpy()
        own = model.float()(x).double().numpy()
    report, got = _fold(kind, model, x)
    kept = row.kept if isinstance(row.kept, int) else row.kept[kind]
    if kind != "modules" and "one-bn" in name:
        kept = {0: 0, 1: 1}[kept]  # one BN node per call: the twin's second call stays, the first folds
    assert report.bn_kept == kept, str(report)
    if (
        row.word
        and (name.split("/")[0] if "/" not in name else name, kind) not in _KIND_WORDS
        and (name, kind) not in _KIND_WORDS
    ):
        text = " ".join(e.reason + " " + " ".join(e.notes) for e in report.layers)
        assert row.word in text, str(report)
    scale = np.abs(truth).max()
    floor = np.abs(own - truth).max() / scale
    assert np.abs(got - truth).max() / scale <= max(2e-5, 3 * floor), str(report)
