"""Property: random ONNX graphs built from foldable and unfoldable blocks fold to the same function."""

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnfold.deploy.onnx_reference import reference_float64, run_ort
from bnfold.onnx_fold import fold_onnx

BLOCKS = ["conv_bn", "bn_conv", "bn_padded_conv", "convt_bn", "relu", "bn", "concat_bn", "mul_add", "sum_bn", "flatten"]


class _Builder:
    def __init__(self, rng):
        self.rng, self.nodes, self.inits, self.count = rng, [], [], 0

    def name(self, base):
        self.count += 1
        return f"{base}{self.count}"

    def const(self, array, base="w"):
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def bn(self, x, c):
        r = self.rng
        params = [r.standard_normal(c), r.standard_normal(c), r.standard_normal(c), r.uniform(0.2, 3, c)]
        return self.node("BatchNormalization", [x, *[self.const(p, "bn") for p in params]], epsilon=1e-3)

    def conv(self, x, cin, cout, k, pads, group):
        w = self.const(self.rng.standard_normal((cout, cin // group, k, k)) / k)
        return self.node("Conv", [x, w, self.const(self.rng.standard_normal(cout))], pads=[pads] * 4, group=group)


def _build(blocks, widths, groups, seed):
    rng = np.random.default_rng(seed)
    b = _Builder(rng)
    x, c = "x", 4
    for i, block in enumerate(blocks):
        out = widths[i % len(widths)]
        g = groups if c % groups == 0 and out % groups == 0 else 1
        if block == "conv_bn":
            x, c = b.bn(b.conv(x, c, out, 3, 1, g), out), out
        elif block == "bn_conv":
            x, c = b.conv(b.bn(x, c), c, out, 1, 0, g), out
        elif block == "bn_padded_conv":
            x, c = b.conv(b.bn(x, c), c, out, 3, 1, 1), out
        elif block == "convt_bn":
            w = b.const(rng.standard_normal((c, out // g, 1, 1)))
            x, c = b.bn(b.node("ConvTranspose", [x, w], group=g), out), out
        elif block == "relu":
            x = b.node("Relu", [x])
        elif block == "bn":
            x = b.bn(x, c)
        elif block == "concat_bn":
            left, right = b.conv(x, c, 2, 1, 0, 1), b.conv(x, c, out, 3, 1, 1)
            x, c = b.bn(b.node("Concat", [left, right], axis=1), 2 + out), 2 + out
        elif block == "sum_bn":
            x, c = b.bn(b.node("Add", [b.conv(x, c, out, 3, 1, 1), b.conv(x, c, out, 1, 0, 1)]), out), out
        elif block == "flatten":
            continue  # the head below flattens; listed so BN-before-flatten heads get drawn more often
        else:
            x = b.conv(x, c, c, 1, 0, 1)
            x = b.node(
                "Add",
                [
                    b.node("Mul", [x, b.const(rng.standard_normal((c, 1, 1)))]),
                    b.const(rng.standard_normal((1, c, 1, 1))),
                ],
            )
    if "flatten" in blocks:  # BN -> Flatten -> Gemm over all positions
        flat, features = b.node("Flatten", [b.bn(x, c)], axis=1), c * 36
    else:
        flat, features = b.bn(b.node("Flatten", [b.node("GlobalAveragePool", [x])]), c), c
    w = b.const(rng.standard_normal((3, features)) / np.sqrt(features))
    y = b.bn(b.node("Gemm", [flat, w, b.const(rng.standard_normal(3))], transB=1), 3)
    graph = helper.make_graph(
        b.nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 3])],
        b.inits,
    )
    model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=6),
    widths=st.lists(st.sampled_from([2, 4, 6]), min_size=1, max_size=3),
    groups=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_random_onnx_graph_folds_to_the_same_function(blocks, widths, groups, seed):
    model = _build(blocks, widths, groups, seed)
    folded, report = fold_onnx(model)
    onnx.checker.check_model(folded, full_check=True)
    bn_nodes = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    left = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert report.bn_total - sum(e.kind != "BatchNormalization" for e in report.layers) == bn_nodes
    assert left == report.bn_kept
    assert all(e.folded or e.reason for e in report.layers)
    x = np.random.default_rng(seed).standard_normal((2, 4, 6, 6)).astype(np.float32)
    truth = reference_float64(model, {"x": x})[0]
    own = np.abs(run_ort(model, {"x": x})[0] - truth).max()
    got = np.abs(run_ort(folded, {"x": x})[0] - truth).max()
    assert got <= max(1e-4 * np.abs(truth).max(), 4 * own)
