"""The fold maths against direct float64 computation."""

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnfold import affine as affine_module
from bnfold.affine import FoldRefused, Layout, bn_affine, round_to


def _torch(fn):
    """The maths returns float64 numpy arrays; these tests compare with torch's ops."""

    def wrapped(*args, **kwargs):
        return tuple(torch.from_numpy(v) for v in fn(*args, **kwargs))

    return wrapped


scale_input_channels = _torch(affine_module.scale_input_channels)
scale_output_channels = _torch(affine_module.scale_output_channels)


def _random_affine(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return bn_affine(
        torch.randn(c, generator=g),
        torch.rand(c, generator=g) + 0.1,
        torch.randn(c, generator=g),
        torch.randn(c, generator=g),
        1e-5,
    )


def _bn(x, a):
    shape = [1, -1] + [1] * (x.dim() - 2)
    return x * torch.from_numpy(a.scale).reshape(shape) + torch.from_numpy(a.shift).reshape(shape)


def test_bn_affine_matches_formula():
    mean, var, gamma, beta = (
        torch.tensor([1.0, -2.0]),
        torch.tensor([4.0, 0.25]),
        torch.tensor([2.0, -1.0]),
        torch.tensor([0.5, 3.0]),
    )
    a = bn_affine(mean, var, gamma, beta, 0.0)
    assert np.allclose(a.scale, [1.0, -2.0]) and a.scale.dtype == np.float64
    assert np.allclose(a.shift, [-0.5, -1.0])
    # numpy inputs give the same map (the ONNX pass passes numpy, the torch pass tensors)
    b = bn_affine(*(t.numpy() for t in (mean, var, gamma, beta)), 0.0)
    assert np.array_equal(a.scale, b.scale) and np.array_equal(a.shift, b.shift)


def test_bn_affine_without_affine_parameters_and_eps_zero():
    a = bn_affine(torch.tensor([3.0]), torch.tensor([9.0]), None, None, 0.0)
    assert float(a.scale[0]) == pytest.approx(1 / 3) and float(a.shift[0]) == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "mean,var,eps,reason",
    [
        ([0.0], [-1.0], 1e-5, "negative"),
        ([float("nan")], [1.0], 1e-5, "non-finite"),
        ([0.0], [float("inf")], 1e-5, "non-finite"),
        ([0.0], [0.0], 0.0, "divides by zero"),
    ],
)
def test_bn_affine_refuses_bad_statistics(mean, var, eps, reason):
    with pytest.raises(FoldRefused, match=reason):
        bn_affine(torch.tensor(mean), torch.tensor(var), None, None, eps)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_then_bn(dims, groups):
    w = torch.randn(8, 8 // groups, *[3] * dims, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    a = _random_affine(8)
    x = torch.randn(2, 8, *[5] * dims, dtype=torch.float64)
    conv = getattr(F, f"conv{dims}d")
    w2, b2 = scale_output_channels(w, b, a, Layout.CONV, groups)
    assert torch.allclose(conv(x, w2, b2, groups=groups), _bn(conv(x, w, b, groups=groups), a))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_transpose_then_bn(dims, groups):
    # Cin == Cout: a mix-up between the weight's two channel axes would not fail on shapes
    w = torch.randn(8, 8 // groups, *[2] * dims, dtype=torch.float64)
    a = _random_affine(8)
    x = torch.randn(2, 8, *[3] * dims, dtype=torch.float64)
    conv_t = getattr(F, f"conv_transpose{dims}d")
    w2, b2 = scale_output_channels(w, None, a, Layout.CONV_TRANSPOSE, groups)
    got = conv_t(x, w2, b2, stride=2, groups=groups)
    assert torch.allclose(got, _bn(conv_t(x, w, None, stride=2, groups=groups), a))


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_bn_then_unpadded_conv(groups):
    w = torch.randn(8, 8 // groups, 3, 3, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    a = _random_affine(8)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    w2, b2 = scale_input_channels(w, b, a, Layout.CONV, groups)
    assert torch.allclose(F.conv2d(x, w2, b2, groups=groups), F.conv2d(_bn(x, a), w, b, groups=groups))


def test_bn_then_padded_conv_is_refused_unless_shift_is_zero():
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(FoldRefused, match="zero-pads"):
        scale_input_channels(w, None, _random_affine(4), Layout.CONV, padded=True)
    pure_scale = bn_affine(torch.zeros(4), torch.full((4,), 4.0), torch.randn(4), None, 0.0)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    w2, b2 = scale_input_channels(w, None, pure_scale, Layout.CONV, padded=True)
    assert torch.allclose(F.conv2d(x, w2, b2, padding=1), F.conv2d(_bn(x, pure_scale), w, None, padding=1))


def test_bn_then_conv_transpose_only_without_shift():
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(FoldRefused, match="ConvTranspose"):
        scale_input_channels(w, None, _random_affine(4), Layout.CONV_TRANSPOSE, groups=2)
    pure_scale = bn_affine(torch.zeros(4), torch.full((4,), 2.0), torch.randn(4), None, 0.0)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    w2, b2 = scale_input_channels(w, None, pure_scale, Layout.CONV_TRANSPOSE, groups=2)
    got = F.conv_transpose2d(x, w2, b2, stride=2, groups=2)
    assert torch.allclose(got, F.conv_transpose2d(_bn(x, pure_scale), w, None, stride=2, groups=2))


def test_linear_and_matmul_layouts_both_directions():
    w = torch.randn(5, 4, dtype=torch.float64)  # Linear [out, in]
    b = torch.randn(5, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    a_in, a_out = _random_affine(4, 1), _random_affine(5, 2)
    w2, b2 = scale_input_channels(w, b, a_in, Layout.CONV)
    assert torch.allclose(F.linear(x, w2, b2), F.linear(_bn(x, a_in), w, b))
    w3, b3 = scale_output_channels(w, b, a_out, Layout.CONV)
    assert torch.allclose(F.linear(x, w3, b3), _bn(F.linear(x, w, b), a_out))
    m = w.T.contiguous()  # MatMul [in, out]
    m2, c2 = scale_input_channels(m, b, a_in, Layout.MATMUL)
    assert torch.allclose(x @ m2 + c2, _bn(x, a_in) @ m + b)
    m3, c3 = scale_output_channels(m, b, a_out, Layout.MATMUL)
    assert torch.allclose(x @ m3 + c3, _bn(x @ m + b, a_out))


def test_channel_mismatch_is_refused():
    with pytest.raises(FoldRefused, match="channels"):
        scale_output_channels(torch.randn(4, 3, 1, 1), None, _random_affine(5), Layout.CONV)


def test_round_to_refuses_overflow_and_flushes_subnormals():
    with pytest.raises(FoldRefused, match="overflows float16"):
        round_to(torch.tensor([70000.0], dtype=torch.float64), torch.float16)
    out, flushed = round_to(torch.tensor([1e-6, 1.0, -1e-42], dtype=torch.float64), torch.float16)
    assert flushed == 2 and out[0] == 0 and out[1] == 1 and out[2] == 0  # both below float16 tiny
    out32, flushed32 = round_to(torch.tensor([1e-42, 0.5], dtype=torch.float64), torch.float32)
    assert flushed32 == 1 and out32[0] == 0
    with pytest.raises(FoldRefused, match="not floating"):
        round_to(torch.ones(1, dtype=torch.float64), torch.int8)


@pytest.mark.parametrize(
    ("dtype", "big"), [(np.float16, 7e4), (np.float32, 1e39), (ml_dtypes.bfloat16, 4e38), (np.float64, None)]
)
def test_round_to_numpy_dtypes(dtype, big):
    """The ONNX pass rounds with numpy dtypes (bfloat16 from ml_dtypes): same rules, numpy results."""
    out, flushed = round_to(np.array([1.5, -2.25, 0.0]), np.dtype(dtype))
    assert isinstance(out, np.ndarray) and out.dtype == np.dtype(dtype) and flushed == 0
    assert out.astype(np.float64).tolist() == [1.5, -2.25, 0.0]
    if big is not None:
        with pytest.raises(FoldRefused, match="overflows"):
            round_to(np.array([big]), np.dtype(dtype))
    with pytest.raises(FoldRefused, match="not floating"):
        round_to(np.ones(1), np.dtype(np.int32))


def test_round_to_torch_dtype_gives_a_tensor():
    out, _ = round_to(np.array([0.5]), torch.bfloat16)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
