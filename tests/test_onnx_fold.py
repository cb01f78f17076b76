"""The ONNX fold pass on inline models: every pattern, each with the twin that must not fold."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper, parser

from bnfold.deploy.onnx_reference import reference_float64, run_ort
from bnfold.errors import BnfoldError
from bnfold.onnx_fold import fold_onnx, load_onnx, save_onnx


def _consts(seed=0, **shapes):
    rng = np.random.default_rng(seed)
    out = []
    for name, shape in shapes.items():
        value = rng.uniform(0.2, 3.0, shape) if name.startswith("v") else rng.standard_normal(shape)  # v: variances
        out.append(numpy_helper.from_array(value.astype(np.float32), name))
    return out


def _bn_params(c, prefix="", seed=1):
    return _consts(seed, **{f"{prefix}s": (c,), f"{prefix}b": (c,), f"{prefix}m": (c,), f"v{prefix}": (c,)})


def _model(text, inits, opset=15, check=True):
    model = parser.parse_model(text.replace("OPSET", str(opset)))
    model.graph.initializer.extend(inits)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def _check(model, feeds, *, folded_count, tol=2e-5):
    folded, report = fold_onnx(model)
    onnx.checker.check_model(folded, full_check=True)
    assert report.bn_folded == folded_count, str(report)
    truth = reference_float64(model, feeds)
    got = run_ort(folded, feeds)
    own = run_ort(model, feeds)
    for t, g, o in zip(truth, got, own, strict=True):
        scale = np.abs(t).max()
        floor = np.abs(o - t).max() / scale
        assert np.abs(g - t).max() / scale <= max(tol, 3 * floor)
    return folded, report


def _x(*shape, seed=3):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ops(model):
    return [n.op_type for n in model.graph.node]


# -- into the preceding node -----------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
def test_conv_bn(dims, bias, group):
    spatial = ",".join(["5"] * dims)
    out = ",".join(["3"] * dims)
    inputs = "x, W, Bc" if bias else "x, W"
    text = f"""<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,4,{spatial}] x) => (float[2,4,{out}] y) {{
      c = Conv <group={group}> ({inputs})
      y = BatchNormalization <epsilon=0.001> (c, s, b, m, v)
    }}"""
    inits = _consts(W=(4, 4 // group, *[3] * dims), Bc=(4,)) + _bn_params(4)
    folded, report = _check(_model(text, inits), {"x": _x(2, 4, *[5] * dims)}, folded_count=1)
    assert _ops(folded) == ["Conv"] and report.layers[0].action == "folded into preceding"


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("opset", [7, 9, 14, 15, 21])
def test_conv_transpose_bn_any_group_and_opset(group, opset):
    text = """<ir_version: 7, opset_import: ["" : OPSET]>
    g (float[2,4,3,3] x) => (float[2,4,6,6] y) {
      c = ConvTranspose <group=GROUP, strides=[2,2]> (x, W)
      y = BatchNormalization (c, s, b, m, v)
    }""".replace("GROUP", str(group))
    inits = _consts(W=(4, 4 // group, 2, 2)) + _bn_params(4)
    folded, _ = _check(_model(text, inits, opset), {"x": _x(2, 4, 3, 3)}, folded_count=1)
    assert _ops(folded) == ["ConvTranspose"]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (1.5, 0.0)])
@pytest.mark.parametrize("with_c", [True, False])
def test_gemm_bn(trans_b, alpha, beta, with_c):
    w_shape = (5, 6) if trans_b else (6, 5)
    inputs = "x, W, C" if with_c else "x, W"
    text = f"""<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[3,6] x) => (float[3,5] y) {{
      c = Gemm <transB={trans_b}, alpha={alpha}, beta={beta}> ({inputs})
      y = BatchNormalization (c, s, b, m, v)
    }}"""
    inits = _consts(W=w_shape, C=(5,)) + _bn_params(5)
    folded, _ = _check(_model(text, inits), {"x": _x(3, 6)}, folded_count=1)
    assert _ops(folded) == ["Gemm"]


@pytest.mark.parametrize("with_add", [True, False])
def test_matmul_bn_on_2d(with_add):
    body = "h = MatMul (x, W)\n a = Add (h, Bm)" if with_add else "a = MatMul (x, W)"
    text = f"""<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[3,6] x) => (float[3,5] y) {{
      {body}
      y = BatchNormalization (a, s, b, m, v)
    }}"""
    inits = _consts(W=(6, 5), Bm=(5,)) + _bn_params(5)
    folded, _ = _check(_model(text, inits), {"x": _x(3, 6)}, folded_count=1)
    assert _ops(folded) == ["MatMul", "Add"]


def test_matmul_bn_on_3d_is_refused():
    # BN normalises axis 1 (4 values), MatMul writes axis 2 (also 4): a shape-blind pass folds it wrongly
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,4,6] x) => (float[2,4,4] y) {
      a = MatMul (x, W)
      y = BatchNormalization (a, s, b, m, v)
    }"""
    folded, report = _check(_model(text, _consts(W=(6, 4)) + _bn_params(4)), {"x": _x(2, 4, 6)}, folded_count=0)
    assert "axis 2" in report.layers[0].reason


def test_bn_after_concat_of_convs_folds_into_each():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,6,5,5] y) {
      a = Conv <pads=[1,1,1,1]> (x, Wa, Ba)
      t = ConvTranspose (x, Wt)
      c = Concat <axis=1> (a, t)
      y = BatchNormalization (c, s, b, m, v)
    }"""
    inits = _consts(Wa=(4, 3, 3, 3), Ba=(4,), Wt=(3, 2, 1, 1)) + _bn_params(6)
    folded, report = _check(_model(text, inits), {"x": _x(2, 3, 5, 5)}, folded_count=1)
    assert report.layers[0].action == "folded into producers" and len(report.layers[0].targets) == 2
    assert "BatchNormalization" not in _ops(folded)


def test_concat_on_spatial_axis_gives_each_producer_the_whole_bn():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,4,10,5] y) {
      a = Conv <pads=[1,1,1,1]> (x, Wa)
      d = Conv <pads=[1,1,1,1]> (x, Wd)
      c = Concat <axis=-2> (a, d)
      y = BatchNormalization (c, s, b, m, v)
    }"""
    inits = _consts(Wa=(4, 3, 3, 3), Wd=(4, 3, 3, 3)) + _bn_params(4)
    _, report = _check(_model(text, inits), {"x": _x(2, 3, 5, 5)}, folded_count=1)
    assert report.layers[0].targets == ["Conv:a", "Conv:d"] and "axis 2" in report.layers[0].notes[0]


def test_concat_on_spatial_axis_with_a_non_layer_part_is_refused():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,4,10,5] y) {
      a = Conv <pads=[1,1,1,1]> (x, Wa)
      d = Conv <pads=[1,1,1,1]> (x, Wd)
      r = Relu (d)
      c = Concat <axis=-2> (a, r)
      y = BatchNormalization (c, s, b, m, v)
    }"""
    inits = _consts(Wa=(4, 3, 3, 3), Wd=(4, 3, 3, 3)) + _bn_params(4)
    _, report = _check(_model(text, inits), {"x": _x(2, 3, 5, 5)}, folded_count=0)
    assert "Relu" in report.layers[0].reason and "not a Conv" in report.layers[0].reason


# -- into the following node ------------------------------------------------------------------


def test_bn_before_unpadded_conv_folds_and_before_padded_conv_is_refused():
    for pads, count in (("0,0,0,0", 1), ("1,1,1,1", 0)):
        text = f"""<ir_version: 8, opset_import: ["" : OPSET]>
        g (float[2,4,6,6] x) => (float[2,3,N,N] y) {{
          r = Relu (x)
          n = BatchNormalization (r, s, b, m, v)
          y = Conv <pads=[{pads}], group=1> (n, W)
        }}"""
        folded, report = _check(
            _model(text, _consts(W=(3, 4, 3, 3)) + _bn_params(4)), {"x": _x(2, 4, 6, 6)}, folded_count=count
        )
        if count == 0:
            assert "zero-pads" in report.layers[0].reason


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_before_gemm_and_matmul(trans_b):
    w_shape = (3, 6) if trans_b else (6, 3)
    text = f"""<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[4,6] x) => (float[4,3] y, float[4,3] z) {{
      r = Relu (x)
      n = BatchNormalization (r, s, b, m, v)
      y = Gemm <transB={trans_b}, alpha=0.5, beta=2.0> (n, W, C)
      r2 = Sigmoid (x)
      n2 = BatchNormalization (r2, s, b, m, v)
      z = MatMul (n2, M)
    }}"""
    inits = _consts(W=w_shape, C=(3,), M=(6, 3)) + _bn_params(6)
    folded, report = _check(_model(text, inits), {"x": _x(4, 6)}, folded_count=2)
    assert all(e.action == "folded into following" for e in report.layers)


def test_bn_before_gemm_with_trans_a_is_refused():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[6,6] x) => (float[6,3] y) {
      r = Relu (x)
      n = BatchNormalization (r, s, b, m, v)
      y = Gemm <transA=1> (n, W)
    }"""
    _, report = _check(_model(text, _consts(W=(6, 3)) + _bn_params(6)), {"x": _x(6, 6)}, folded_count=0)
    assert "transA" in report.layers[0].reason


# -- refusals ------------------------------------------------------------------------------


def test_shared_producer_output_graph_output_and_training_mode():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,4,5,5] y, float[2,4,5,5] c) {
      c = Conv <pads=[1,1,1,1]> (x, W)
      y = BatchNormalization (c, s, b, m, v)
    }"""
    _, report = _check(_model(text, _consts(W=(4, 3, 3, 3)) + _bn_params(4)), {"x": _x(2, 3, 5, 5)}, folded_count=0)
    assert "graph output" in report.layers[0].reason
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,4,5,5] y) {
      c = Conv <pads=[1,1,1,1]> (x, W)
      n = BatchNormalization (c, s, b, m, v)
      r = Relu (c)
      y = Add (n, r)
    }"""
    _, report = _check(_model(text, _consts(W=(4, 3, 3, 3)) + _bn_params(4)), {"x": _x(2, 3, 5, 5)}, folded_count=0)
    assert "also read by Relu" in report.layers[0].reason


def test_training_mode_and_optional_outputs_are_refused():
    text = """<ir_version: 8, opset_import: ["" : 15]>
    g (float[2,3,5,5] x) => (float[2,4,5,5] y) {
      c = Conv <pads=[1,1,1,1]> (x, W)
      y, rm, rv = BatchNormalization <training_mode=1> (c, s, b, m, v)
    }"""
    model = _model(text, _consts(W=(4, 3, 3, 3)) + _bn_params(4))
    _, report = fold_onnx(model)
    assert report.bn_kept == 1 and "optional outputs" in report.layers[0].reason


def test_non_constant_weight_is_refused():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x, float[4,3,3,3] w) => (float[2,4,3,3] y) {
      c = Conv (x, w)
      y = BatchNormalization (c, s, b, m, v)
    }"""
    model = _model(text, _bn_params(4))
    _, report = fold_onnx(model)
    assert report.bn_kept == 1 and "not a constant" in report.layers[0].reason


def test_dequantized_weight_is_refused():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,4,3,3] y) {
      w = DequantizeLinear (Wq, sc)
      c = Conv (x, w)
      y = BatchNormalization (c, s, b, m, v)
    }"""
    inits = [
        numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "Wq"),
        numpy_helper.from_array(np.array(0.1, np.float32), "sc"),
    ] + _bn_params(4)
    _, report = fold_onnx(_model(text, inits))
    assert report.bn_kept == 1 and "DequantizeLinear" in report.layers[0].reason


def test_shared_weight_is_copied_not_changed():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,4,3,3] y, float[2,4,3,3] z) {
      c = Conv (x, W)
      y = BatchNormalization (c, s, b, m, v)
      z = Conv (x, W)
    }"""
    folded, report = _check(
        _model(text, _consts(W=(4, 3, 3, 3)) + _bn_params(4)), {"x": _x(2, 3, 5, 5)}, folded_count=1
    )
    assert "copy" in report.layers[0].notes[0]
    assert {i.name for i in folded.graph.initializer} >= {"W"}


def test_constant_node_parameters_fold():
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32), "w")
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,4,5,5] y) {
      c = Conv (x, W)
      y = BatchNormalization (c, s, b, m, v)
    }"""
    model = _model(text, _bn_params(4), check=False)
    const = helper.make_node("Constant", [], ["W"], value=w)
    model.graph.node.insert(0, const)
    s_node = helper.make_node("Constant", [], ["s2"], value=numpy_helper.from_array(np.full(4, 2.0, np.float32)))
    model.graph.node.insert(0, s_node)
    model.graph.node[-1].input[1] = "s2"
    folded, _ = _check(model, {"x": _x(2, 3, 5, 5)}, folded_count=1)
    assert _ops(folded) == ["Conv"]


def test_initializer_inputs_need_the_flag():
    text = """<ir_version: 3, opset_import: ["" : 9]>
    g (float[2,3,5,5] x, float[4,3,1,1] W, float[4] s, float[4] b, float[4] m, float[4] v) => (float[2,4,5,5] y) {
      c = Conv (x, W)
      y = BatchNormalization (c, s, b, m, v)
    }"""
    model = _model(text, _consts(W=(4, 3, 1, 1)) + _bn_params(4))
    _, report = fold_onnx(model)
    assert report.bn_kept == 1 and "--allow-initializer-inputs" in report.layers[0].reason
    folded, report = fold_onnx(model, allow_initializer_inputs=True)
    assert report.bn_folded == 1 and [i.name for i in folded.graph.input] == ["x"]
    onnx.checker.check_model(folded, full_check=True)
    x = _x(2, 3, 5, 5)
    truth = reference_float64(model, {"x": x})[0]
    assert np.abs(run_ort(folded, {"x": x})[0] - truth).max() < 1e-4


# -- decomposed BN, subgraphs, dtypes, hygiene ------------------------------------------------


def test_decomposed_bn_with_computed_constants_folds():
    # FrozenBatchNorm2d exports: scale = w * 1/sqrt(var + eps); x * scale + (b - mean * scale)
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,4,5,5] y) {
      c = Conv <pads=[1,1,1,1]> (x, W)
      ve = Add (v, eps)
      sq = Sqrt (ve)
      r = Reciprocal (sq)
      sc = Mul (s, r)
      sc4 = Reshape (sc, shape)
      ms = Mul (m, sc)
      sh = Sub (b, ms)
      sh4 = Reshape (sh, shape)
      mul = Mul (c, sc4)
      y = Add (mul, sh4)
    }"""
    inits = (
        _consts(W=(4, 3, 3, 3))
        + _bn_params(4)
        + [
            numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
            numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "shape"),
        ]
    )
    folded, report = _check(_model(text, inits), {"x": _x(2, 3, 5, 5)}, folded_count=2)
    assert _ops(folded) == ["Conv"]
    assert {e.kind for e in report.layers} == {"Mul (decomposed BN)", "Add (decomposed BN)"}


def test_add_along_the_wrong_axis_is_not_a_bias():
    # shape (4,) broadcasts along the last (width) axis, not the channels
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,4,4] x) => (float[2,4,4,4] y) {
      c = Conv <pads=[1,1,1,1]> (x, W)
      y = Add (c, a)
    }"""
    folded, report = _check(_model(text, _consts(W=(4, 3, 3, 3), a=(4,))), {"x": _x(2, 3, 4, 4)}, folded_count=0)
    assert _ops(folded) == ["Conv", "Add"]


def test_subgraphs_are_folded():
    then_text = """then_g () => (float[2,4,3,3] t) {
          c = Conv (x, W)
          t = BatchNormalization (c, s, b, m, v)
        }"""
    else_text = """else_g () => (float[2,4,3,3] e) {
          e = Conv (x, W)
        }"""
    then_g = parser.parse_graph(then_text)
    else_g = parser.parse_graph(else_text)
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x, bool cond) => (float[2,4,3,3] y) {
      y = Identity (x)
    }"""
    model = _model(text, _consts(W=(4, 3, 3, 3)) + _bn_params(4), check=False)
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)
    del model.graph.node[:]
    model.graph.node.append(node)
    onnx.checker.check_model(model, full_check=True)
    folded, report = fold_onnx(model)
    assert report.bn_folded == 1
    onnx.checker.check_model(folded, full_check=True)
    x = _x(2, 3, 5, 5)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        truth = reference_float64(model, feeds)[0]
        assert np.abs(run_ort(folded, feeds)[0] - truth).max() / np.abs(truth).max() < 1e-5


@pytest.mark.parametrize("elem,np_dtype", [("float16", np.float16), ("bfloat16", None)])
def test_half_precision_models(elem, np_dtype):
    import ml_dtypes

    dtype = np_dtype or ml_dtypes.bfloat16
    text = f"""<ir_version: 8, opset_import: ["" : OPSET]>
    g ({elem}[2,3,5,5] x) => ({elem}[2,4,3,3] y) {{
      c = Conv (x, W)
      y = BatchNormalization (c, s, b, m, v)
    }}"""
    inits = [
        numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name)
        for t in _consts(W=(4, 3, 3, 3)) + _bn_params(4)
    ]
    model = _model(text, inits, opset=15 if np_dtype else 22)  # Conv takes bfloat16 from opset 22
    folded, report = fold_onnx(model)
    assert report.bn_folded == 1
    onnx.checker.check_model(folded, full_check=True)
    w = next(t for t in folded.graph.initializer if t.name.startswith("W"))
    assert w.data_type == (onnx.TensorProto.FLOAT16 if np_dtype else onnx.TensorProto.BFLOAT16)
    if np_dtype is not None:
        x = _x(2, 3, 5, 5).astype(np.float16)
        truth = reference_float64(model, {"x": x})[0]
        got = run_ort(folded, {"x": x})[0].astype(np.float64)
        assert np.abs(got - truth).max() / np.abs(truth).max() < 6e-3


def test_fp16_data_with_fp32_bn_params_opset15():
    text = """<ir_version: 8, opset_import: ["" : 15]>
    g (float16[2,3,5,5] x) => (float16[2,4,3,3] y) {
      c = Conv (x, W)
      y = BatchNormalization (c, s, b, m, v)
    }"""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float16), "W")
    model = _model(text, [w] + _bn_params(4))
    folded, report = fold_onnx(model)
    assert report.bn_folded == 1
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in folded.graph.initializer)


def test_fp16_overflow_is_refused():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float16[2,3,5,5] x) => (float16[2,4,5,5] y) {
      c = Conv (x, W)
      y = BatchNormalization <epsilon=0.0> (c, s, b, m, v)
    }"""
    inits = [
        numpy_helper.from_array(np.full((4, 3, 1, 1), 100, np.float16), "W"),
        numpy_helper.from_array(np.full(4, 50, np.float16), "s"),
        numpy_helper.from_array(np.zeros(4, np.float16), "b"),
        numpy_helper.from_array(np.zeros(4, np.float16), "m"),
        numpy_helper.from_array(np.full(4, 1e-4, np.float16), "v"),
    ]
    _, report = fold_onnx(_model(text, inits))
    assert report.bn_kept == 1 and "overflows float16" in report.layers[0].reason


def test_hygiene_names_metadata_determinism(tmp_path):
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,4,3,3] y) {
      c = Conv (x, W)
      y = BatchNormalization (c, s, b, m, v)
    }"""
    model = _model(text, _consts(W=(4, 3, 3, 3), W_bnfold=(1,)) + _bn_params(4))
    model.doc_string = "doc"
    helper.set_model_props(model, {"author": "me"})
    a, _ = fold_onnx(model)
    b, _ = fold_onnx(model)
    assert a.SerializeToString() == b.SerializeToString()
    names = [i.name for i in a.graph.initializer]
    assert len(names) == len(set(names)) and "s" not in names  # dead BN params are gone
    assert a.doc_string == "doc" and a.metadata_props[0].key == "author"
    assert [o.name for o in a.graph.output] == ["y"] and [i.name for i in a.graph.input] == ["x"]
    path = tmp_path / "m.onnx"
    save_onnx(a, path)
    assert load_onnx(path).SerializeToString() == a.SerializeToString()
    folded, _ = fold_onnx(path)
    assert _ops(folded) == ["Conv"]


def test_external_data_round_trip(tmp_path):
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,64,3,3] y) {
      c = Conv (x, W)
      y = BatchNormalization (c, s, b, m, v)
    }"""
    model = _model(text, _consts(W=(64, 3, 3, 3)) + _bn_params(64))
    source = tmp_path / "big.onnx"
    save_onnx(model, source, external_data=True)
    assert (tmp_path / "big.onnx.data").exists()
    folded, report = fold_onnx(source)
    out = tmp_path / "out.onnx"
    save_onnx(folded, out, external_data=True)
    assert (tmp_path / "out.onnx.data").exists() and report.bn_folded == 1
    x = _x(2, 3, 5, 5)
    assert np.allclose(run_ort(str(out), {"x": x})[0], run_ort(model, {"x": x})[0], atol=1e-4)


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(BnfoldError, match="not a readable ONNX model"):
        fold_onnx(bad)
    with pytest.raises(BnfoldError, match="no such file"):
        fold_onnx(tmp_path / "missing.onnx")


def test_channel_count_mismatch_is_refused():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,4,3,3] y) {
      c = Conv (x, W)
      y = BatchNormalization (c, s, b, m, v)
    }"""
    model = _model(text, _consts(W=(4, 3, 3, 3)) + _bn_params(3), check=False)
    with pytest.raises(BnfoldError, match="mismatch"):  # shape inference sees it: the model itself is invalid
        fold_onnx(model)


@pytest.mark.parametrize("head", ["Gemm <transB=1> (f, W, C)", "MatMul (f, M)"])
def test_bn_before_flatten_then_gemm_or_matmul(head):
    text = f"""<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,4] y) {{
      c = Conv (x, K)
      r = Relu (c)
      n = BatchNormalization (r, s, b, m, v)
      f = Flatten <axis=1> (n)
      y = {head}
    }}"""
    inits = _consts(K=(3, 3, 3, 3), W=(4, 27), C=(4,), M=(27, 4)) + _bn_params(3)
    folded, report = _check(_model(text, inits), {"x": _x(2, 3, 5, 5)}, folded_count=1)
    assert report.layers[0].action == "folded into following" and "Flatten" in report.layers[0].notes[0]
    assert "BatchNormalization" not in _ops(folded)


def test_bn_before_flatten_on_axis_2_is_kept():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[6,4] y) {
      r = Relu (x)
      n = BatchNormalization (r, s, b, m, v)
      f = Flatten <axis=2> (n)
      y = Gemm <transB=1> (f, W)
    }"""
    _, report = _check(_model(text, _consts(W=(4, 25)) + _bn_params(3)), {"x": _x(2, 3, 5, 5)}, folded_count=0)
    assert report.bn_kept == 1


def test_bn_after_a_sum_of_two_convs():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,4,5,5] y) {
      a = Conv <pads=[1,1,1,1]> (x, Wa, Ba)
      b = Conv (x, Wb)
      s2 = Add (a, b)
      y = BatchNormalization (s2, s, b_, m, v)
    }""".replace("b_,", "bb,")
    inits = _consts(Wa=(4, 3, 3, 3), Ba=(4,), Wb=(4, 3, 1, 1)) + _consts(1, s=(4,), bb=(4,), m=(4,), v=(4,))
    folded, report = _check(_model(text, inits), {"x": _x(2, 3, 5, 5)}, folded_count=1)
    assert report.layers[0].action == "folded into producers"
    assert _ops(folded) == ["Conv"] and len(report.merges) == 1  # then the two parallel convs merge into one


def test_bn_after_conv_plus_its_own_input_folds_once_the_branches_merge():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,4,5,5] x) => (float[2,4,5,5] y) {
      a = Conv <pads=[1,1,1,1]> (x, Wa)
      s2 = Add (a, x)
      y = BatchNormalization (s2, s, bb, m, v)
    }"""
    inits = _consts(Wa=(4, 4, 3, 3)) + _consts(1, s=(4,), bb=(4,), m=(4,), v=(4,))
    folded, report = _check(_model(text, inits), {"x": _x(2, 4, 5, 5)}, folded_count=1)
    assert _ops(folded) == ["Conv"] and report.merges[0].branches == ["Conv 'a'", "identity (the input itself)"]


def test_bn_after_a_residual_sum_is_kept():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,4,5,5] x) => (float[2,4,5,5] y) {
      r = Relu (x)
      a = Conv <pads=[1,1,1,1]> (r, Wa)
      s2 = Add (a, x)
      y = BatchNormalization (s2, s, bb, m, v)
    }"""
    inits = _consts(Wa=(4, 4, 3, 3)) + _consts(1, s=(4,), bb=(4,), m=(4,), v=(4,))
    _, report = _check(_model(text, inits), {"x": _x(2, 4, 5, 5)}, folded_count=0)
    assert "graph input" in report.layers[0].reason


def test_sum_of_a_gemm_and_a_conv_broadcasting_across_axes_is_kept():
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,2,4] x, float[2,3] v) => (float[2,4,2,4] y) {
      a = Gemm <transB=1> (v, Wg)
      b = Conv (x, Wc)
      s2 = Add (a, b)
      y = BatchNormalization (s2, s, bb, m, v_)
    }""".replace("v_)", "vv)")
    inits = _consts(Wg=(4, 3), Wc=(4, 3, 1, 1)) + _consts(1, s=(4,), bb=(4,), m=(4,), vv=(4,))
    model = _model(text, inits)
    _, report = _check(model, {"x": _x(2, 3, 2, 4), "v": _x(2, 3)}, folded_count=0)
    assert "ranks" in report.layers[0].reason


@pytest.mark.parametrize("target,folds", [([-1, 27], True), ([0, -1], True), ([2, 27], True), ([6, 9], False)])
def test_bn_before_a_reshape_that_flattens(target, folds):
    k = 27 if folds else 9
    text = f"""<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,3,3] x) => (float[{2 if folds else 6},4] y) {{
      r = Relu (x)
      n = BatchNormalization (r, s, b, m, v)
      f = Reshape (n, shape)
      y = Gemm <transB=1> (f, W)
    }}"""
    inits = _consts(W=(4, k)) + _bn_params(3) + [numpy_helper.from_array(np.array(target, np.int64), "shape")]
    folded, report = _check(_model(text, inits), {"x": _x(2, 3, 3, 3)}, folded_count=int(folds))
    assert ("BatchNormalization" in _ops(folded)) != folds


def test_a_layer_folded_twice_is_rounded_once():
    """BN -> Conv -> BN in float16: both maps are applied in float64 and the weight is rounded once."""
    import torch

    from bnfold.affine import Layout, bn_affine, round_to, scale_input_channels, scale_output_channels

    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float16[2,3,5,5] x) => (float16[2,4,5,5] y) {
      r = Relu (x)
      n = BatchNormalization (r, s1, b1, m1, v1)
      c = Conv (n, W)
      y = BatchNormalization (c, s2, b2, m2, v2)
    }"""
    rng = np.random.default_rng(7)
    arrays = {"W": rng.standard_normal((4, 3, 1, 1))}
    for i, c in (("1", 3), ("2", 4)):
        arrays |= {
            f"s{i}": rng.standard_normal(c),
            f"b{i}": rng.standard_normal(c),
            f"m{i}": rng.standard_normal(c),
            f"v{i}": rng.uniform(0.3, 2, c),
        }
    model = _model(text, [numpy_helper.from_array(a.astype(np.float16), k) for k, a in arrays.items()])
    folded, report = fold_onnx(model)
    assert report.bn_folded == 2
    t = {k: torch.from_numpy(a.astype(np.float16).astype(np.float64)) for k, a in arrays.items()}
    first = bn_affine(t["m1"], t["v1"], t["s1"], t["b1"], 1e-5)
    second = bn_affine(t["m2"], t["v2"], t["s2"], t["b2"], 1e-5)
    w, b = scale_input_channels(t["W"], None, first, Layout.CONV)
    w, b = scale_output_channels(w, b, second, Layout.CONV)
    expected = round_to(w, torch.float16)[0].numpy()
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    got = next(numpy_helper.to_array(i) for i in folded.graph.initializer if i.name == conv.input[1])
    assert np.array_equal(got, expected)


def test_shape_reader_does_not_block_a_fold_and_follows_the_rename():
    """Shape reads only metadata: BN still folds into the Conv, and the Shape reads the renamed output."""
    text = """<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,4,3,3] y, int64[4] n) {
      a = Conv (x, Wa)
      n = Shape (a)
      y = BatchNormalization (a, s, b, m, v)
    }"""
    inits = _consts(Wa=(4, 3, 3, 3)) + _bn_params(4)
    folded, report = _check(_model(text, inits), {"x": _x(2, 3, 5, 5)}, folded_count=1)
    assert "BatchNormalization" not in _ops(folded)
    shape = next(node for node in folded.graph.node if node.op_type == "Shape")
    conv = next(node for node in folded.graph.node if node.op_type == "Conv")
    assert list(shape.input) == list(conv.output) == ["y"]


@pytest.mark.parametrize(
    ("cast", "folded_count"),
    [("CastLike (one, y)", 2), ("CastLike (y, one)", 1)],
    ids=["dtype-only", "twin-reads-the-data"],
)
def test_castlike_reading_only_the_dtype_does_not_block_a_fold(cast, folded_count):
    """The dynamo exporter without its optimizer casts scalars ``CastLike(c, y)`` like a BN output y: that reads
    y's dtype, not its values (timm coatnet: 5 of 16 BN were kept for it). Reading y's data blocks that fold."""
    text = f"""<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,3,5,5] x) => (float[2,4,5,5] z, float[2,4,5,5] w) {{
      a = Conv <pads=[1,1,1,1]> (x, Wa)
      y = BatchNormalization (a, s, b, m, v)
      c = {cast}
      h = Conv (y, Wb)
      z = BatchNormalization (h, ps, pb, pm, vp)
      w = Mul (a, c)
    }}"""
    inits = _consts(Wa=(4, 3, 3, 3), Wb=(4, 4, 1, 1)) + _bn_params(4) + _bn_params(4, "p", seed=2)
    inits.append(numpy_helper.from_array(np.ones(1, np.float32), "one"))
    folded, report = _check(_model(text, inits, opset=17), {"x": _x(2, 3, 5, 5)}, folded_count=folded_count)
    assert _ops(folded).count("BatchNormalization") == 2 - folded_count


@pytest.mark.parametrize(
    ("second", "klass"),
    [("Relu (x)", "the neighbour is not a linear layer"), ("MatMul (x, Wm)", "a parameter is not a constant")],
    ids=["a-residual-sum", "twin-matmul-plus-a-computed-bias"],
)
def test_bn_before_an_add_says_why(second, klass):
    """BN read by a residual Add: the Add is not a linear layer (its reason class says so, not "not a constant")."""
    from bnfold.report import reason_class

    text = f"""<ir_version: 8, opset_import: ["" : OPSET]>
    g (float[2,4] x) => (float[2,4] y) {{
      r = Relu (x)
      n = BatchNormalization (r, s, b, m, v)
      o = {second}
      y = Add (n, o)
    }}"""
    _, report = _check(_model(text, _consts(Wm=(4, 4)) + _bn_params(4)), {"x": _x(2, 4)}, folded_count=0)
    assert reason_class(report.layers[0].reason).endswith(f"after: {klass}"), report.layers[0].reason
