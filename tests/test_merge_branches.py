"""Parallel branches summed, merged into one convolution (ONNX graphs), with the twins that must not merge."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper, parser
from torch import nn

from bnfold.deploy.export import export_keeping_bn
from bnfold.deploy.onnx_reference import reference_float64, run_ort
from bnfold.onnx_fold import fold_onnx
from bnfold.zoo import randomize_batchnorm

_HEAD = '<ir_version: 8, opset_import: ["" : 15]>\n'


def _model(body: str, shapes: dict[str, tuple[int, ...]], seed: int = 0):
    rng = np.random.default_rng(seed)
    text = _HEAD + f"g (float[2,4,6,6] x) => (float[2,4,H,W] y) {{\n{body}\n}}"
    model = parser.parse_model(text)
    for name, shape in shapes.items():
        value = rng.standard_normal(shape).astype(np.float32)
        if name.startswith("v"):
            value = np.abs(value) + 0.5
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def _bn(*names: str, c: int = 4) -> dict[str, tuple[int, ...]]:
    return {f"{p}{n}": (c,) for n in names for p in ("s", "b", "m", "v")}


def _check(model, *, merged: int, bn_left: int, merge: bool = True):
    folded, report = fold_onnx(model, merge_branches=merge)
    onnx.checker.check_model(folded, full_check=True)
    assert len(report.merges) == merged, str(report)
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == bn_left, str(report)
    x = np.random.default_rng(7).standard_normal((2, 4, 6, 6)).astype(np.float32)
    truth = reference_float64(model, {"x": x})[0]
    own = np.abs(run_ort(model, {"x": x})[0] - truth).max()
    got = np.abs(run_ort(folded, {"x": x})[0] - truth).max()
    assert got <= max(2e-6 * np.abs(truth).max(), 3 * own), (got, own)
    return folded, report


REPVGG = """
  k = Conv <pads=[1,1,1,1]> (x, W3)
  kb = BatchNormalization (k, s1, b1, m1, v1)
  o = Conv (x, W1)
  ob = BatchNormalization (o, s2, b2, m2, v2)
  i = BatchNormalization (x, s3, b3, m3, v3)
  a = Add (kb, ob)
  t = Add (a, i)
  y = Relu (t)"""


def test_repvgg_block_becomes_one_conv():
    model = _model(REPVGG, {"W3": (4, 4, 3, 3), "W1": (4, 4, 1, 1), **_bn(1, 2, 3)})
    folded, report = _check(model, merged=1, bn_left=0)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    assert report.bn_kept == 0 and report.entry("BatchNormalization:i").action == "merged into a parallel conv"
    assert len(report.merges[0].branches) == 3 and "merged Add 't'" in str(report)


def test_merge_can_be_turned_off():
    model = _model(REPVGG, {"W3": (4, 4, 3, 3), "W1": (4, 4, 1, 1), **_bn(1, 2, 3)})
    _check(model, merged=0, bn_left=1, merge=False)


def test_mobileone_depthwise_block_with_two_kxk_branches():
    body = """
  k1 = Conv <pads=[1,1,1,1], group=4> (x, Wa)
  n1 = BatchNormalization (k1, s1, b1, m1, v1)
  k2 = Conv <pads=[1,1,1,1], group=4> (x, Wb)
  n2 = BatchNormalization (k2, s2, b2, m2, v2)
  sc = Conv <group=4> (x, Wc)
  n3 = BatchNormalization (sc, s3, b3, m3, v3)
  i = BatchNormalization (x, s4, b4, m4, v4)
  y = Sum (n1, n2, n3, i)"""
    shapes = {"Wa": (4, 1, 3, 3), "Wb": (4, 1, 3, 3), "Wc": (4, 1, 1, 1), **_bn(1, 2, 3, 4)}
    folded, _ = _check(_model(body, shapes), merged=1, bn_left=0)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_acnet_asymmetric_kernels_and_a_plain_identity():
    body = """
  s = Conv <pads=[1,1,1,1]> (x, W33)
  h = Conv <pads=[0,1,0,1]> (x, W13)
  v = Conv <pads=[1,0,1,0]> (x, W31)
  a = Add (s, h)
  c = Add (a, v)
  y = Add (c, x)"""
    shapes = {"W33": (4, 4, 3, 3), "W13": (4, 4, 1, 3), "W31": (4, 4, 3, 1)}
    folded, _ = _check(_model(body, shapes), merged=1, bn_left=0)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


@pytest.mark.parametrize(
    ("body", "shapes", "reason"),
    [
        (  # the 3x3 kernel is padded on one side only: the branches read x at different positions
            "k = Conv <pads=[0,0,2,2]> (x, W3)\n o = Conv (x, W1)\n y = Add (k, o)",
            {"W3": (4, 4, 3, 3), "W1": (4, 4, 1, 1)},
            "not centred",
        ),
        (
            "k = Conv <pads=[1,1,1,1], group=2> (x, W3)\n o = Conv (x, W1)\n y = Add (k, o)",
            {"W3": (4, 2, 3, 3), "W1": (4, 4, 1, 1)},
            "groups",
        ),
        (
            "k = Conv <pads=[4,4,4,4], dilations=[2,2]> (x, W5)\n o = Conv <pads=[1,1,1,1]> (x, W3)\n y = Add (k, o)",
            {"W5": (4, 4, 5, 5), "W3": (4, 4, 3, 3)},
            "dilation",
        ),
        (  # both give 2x2 outputs from 6x6, at different positions
            "k = Conv <strides=[3,3]> (x, W3)\n o = Conv <strides=[4,4]> (x, W1)\n y = Add (k, o)",
            {"W3": (4, 4, 3, 3), "W1": (4, 4, 1, 1)},
            "stride",
        ),
        (  # a residual block: the conv reads another tensor than the identity
            "r = Relu (x)\n k = Conv <pads=[1,1,1,1]> (r, W3)\n y = Add (k, x)",
            {"W3": (4, 4, 3, 3)},
            "same tensor",
        ),
    ],
    ids=["off-centre-padding", "groups-differ", "3x3-in-dilated-5x5", "stride-differs", "residual-not-parallel"],
)
def test_branches_that_do_not_line_up_are_not_merged(body, shapes, reason):
    from bnfold.onnx_fold.graph import GraphIndex
    from bnfold.onnx_fold.onnx_view import OnnxView
    from bnfold.rules.merge_branches import check_merge, merge_candidates

    model = _model(body, shapes)
    _check(model, merged=0, bn_left=0)
    view = OnnxView(GraphIndex(model.graph, None, {}, {}, False), 15)
    (total,) = merge_candidates(view)
    with pytest.raises(Exception, match=reason):
        check_merge(view, total)


def test_a_1x1_branch_merges_into_the_centre_tap_of_a_dilated_kernel():
    body = "k = Conv <pads=[2,2,2,2], dilations=[2,2]> (x, W3)\n o = Conv (x, W1)\n y = Add (k, o)"
    _check(_model(body, {"W3": (4, 4, 3, 3), "W1": (4, 4, 1, 1)}), merged=1, bn_left=0)


def test_a_branch_read_elsewhere_is_not_merged():
    text = (
        _HEAD
        + """g (float[2,4,6,6] x) => (float[2,4,6,6] y, float[2,4,6,6] o) {
  k = Conv <pads=[1,1,1,1]> (x, W3)
  o = Conv (x, W1)
  y = Add (k, o)
}"""
    )
    model = parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name, shape in {"W3": (4, 4, 3, 3), "W1": (4, 4, 1, 1)}.items():
        model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    folded, report = fold_onnx(model)
    assert not report.merges and sum(n.op_type == "Conv" for n in folded.graph.node) == 2


class _RepVGGBlock(nn.Module):
    """timm's RepVGG block in its training form: 3x3 conv + BN, 1x1 conv + BN, identity BN, summed."""

    def __init__(self, c: int = 4, stride: int = 1):
        super().__init__()
        self.kxk = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c))
        self.one = nn.Sequential(nn.Conv2d(c, c, 1, stride, 0, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c) if stride == 1 else None

    def forward(self, x):
        out = self.kxk(x) + self.one(x)
        if self.identity is not None:
            out += self.identity(x)
        return torch.relu(out)


def test_exported_repvgg_stack_merges_every_block():
    model = randomize_batchnorm(nn.Sequential(_RepVGGBlock(), _RepVGGBlock(stride=2), _RepVGGBlock()), 3).eval()
    x = torch.randn(2, 4, 8, 8)
    exported = export_keeping_bn(model, x)
    folded, report = fold_onnx(exported)
    assert report.bn_total == 8 and report.bn_kept == 0 and len(report.merges) == 3, str(report)
    assert sum(n.op_type == "Conv" for n in folded.graph.node) == 3
    with torch.no_grad():
        truth = model.double()(x.double()).numpy()
    got = run_ort(folded, {"input": x.numpy()})[0]
    assert np.abs(got - truth).max() <= 2e-6 * np.abs(truth).max()


def test_torch_export_program_merges_every_block():
    import bnfold

    model = randomize_batchnorm(nn.Sequential(_RepVGGBlock(), _RepVGGBlock(stride=2), _RepVGGBlock()), 3).eval()
    x = torch.randn(2, 4, 8, 8)
    program = torch.export.export(model, (x,)).module()
    folded, report = bnfold.fold(program)
    assert report.method == "torch.export" and report.bn_kept == 0 and len(report.merges) == 3, str(report)
    targets = [str(n.target) for n in folded.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in t for t in targets) and targets.count("aten.conv2d.default") == 3
    with torch.no_grad():
        truth = model.double()(x.double())
        assert float((folded(x).double() - truth).abs().max()) <= 2e-6 * float(truth.abs().max())
    _, kept = bnfold.fold(torch.export.export(model, (x,)).module(), merge_branches=False)
    assert not kept.merges and kept.bn_kept == 2  # the identity BNs of the stride-1 blocks


def test_a_reflect_padded_branch_is_not_merged_in_a_module():
    import bnfold

    block = _RepVGGBlock()
    block.kxk[0].padding_mode = "reflect"  # pads with copies of x: a centred 1x1 would see zeros there instead
    model = randomize_batchnorm(nn.Sequential(block), 3).eval()
    x = torch.randn(2, 4, 6, 6)
    folded, report = bnfold.fold(model, x)
    assert not report.merges and report.entry("0.identity").action == "kept", str(report)
    from bnfold.rules.merge_branches import check_merge, merge_candidates
    from bnfold.torch_fold.dataflow import trace
    from bnfold.torch_fold.module_view import ModuleView

    view = ModuleView(folded[0], trace(folded[0], None))
    (total,) = merge_candidates(view)
    with pytest.raises(Exception, match="copies of its input"):
        check_merge(view, total)


@pytest.mark.parametrize(
    ("start", "merged"),
    [(np.zeros(1), 1), (np.zeros(()), 1), (np.full(1, 0.5), 0), (np.zeros((1, 1, 1, 1, 1)), 0)],
    ids=["zero", "zero-scalar", "twin-not-zero", "twin-zero-that-adds-an-axis"],
)
def test_a_sum_started_from_zero_merges(start, merged):
    """MobileOne (timm) starts its branch sum from ``0``: ``Add(0, BN(x))`` passes BN(x) on; other starts do not."""
    rank = max(4, start.ndim)
    text = (
        _HEAD
        + f"""g (float[2,4,6,6] x) => (float[{",".join(["d"] * rank)}] y) {{
  i = BatchNormalization (x, s1, b1, m1, v1)
  z = Add (start, i)
  k = Conv <pads=[1,1,1,1]> (x, W3)
  y = Add (z, k)
}}"""
    )
    model = parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name, shape in {"W3": (4, 4, 3, 3), **_bn(1)}.items():
        value = rng.standard_normal(shape).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(np.abs(value) + 0.5 if name[0] == "v" else value, name))
    model.graph.initializer.append(numpy_helper.from_array(start.astype(np.float32), "start"))
    onnx.checker.check_model(model, full_check=True)
    _check(model, merged=merged, bn_left=1 - merged)


class _MobileOneBlock(nn.Module):
    """timm's MobileOne block in its training form: the branch sum starts from the number 0 (no scale branch) and
    adds 0 for a missing identity, in place (``out += ...``), which torch.export keeps as ``aten.add_``."""

    def __init__(self, c: int = 4, identity: bool = True, start: float = 0):
        super().__init__()
        self.kxk = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)) for _ in range(2))
        self.identity = nn.BatchNorm2d(c) if identity else None
        self.start = start

    def forward(self, x):
        identity_out = self.identity(x) if self.identity is not None else 0
        out = self.kxk[0](x) + self.start
        out += self.kxk[1](x)
        out += identity_out
        return torch.relu(out)


@pytest.mark.parametrize(("start", "bn_kept"), [(0, 0), (0.0, 0), (0.5, 2)], ids=["zero", "zero-float", "not-zero"])
def test_torch_export_sums_started_from_zero_merge(start, bn_kept):
    """``x + 0`` passes x on in the aten graph as in the module and ONNX paths; ``x + 0.5`` does not (no merge)."""
    import bnfold

    blocks = [_MobileOneBlock(start=start), _MobileOneBlock(identity=False, start=start), _MobileOneBlock(start=start)]
    model = randomize_batchnorm(nn.Sequential(*blocks), 3).eval()
    x = torch.randn(2, 4, 6, 6)
    folded, report = bnfold.fold(torch.export.export(model, (x,)).module())
    assert report.bn_kept == bn_kept and len(report.merges) == (3 if bn_kept == 0 else 0), str(report)
    module_report = bnfold.fold(model, x)[1]
    assert module_report.bn_kept == bn_kept, str(module_report)
    with torch.no_grad():
        truth = model.double()(x.double())
        assert float((folded(x).double() - truth).abs().max()) <= 2e-6 * float(truth.abs().max())
