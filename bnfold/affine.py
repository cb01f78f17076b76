"""The BatchNorm fold maths, in float64, shared by every fold pass.

At inference (the BN paper's Algorithm 2) BatchNorm is a per-channel affine map

    y = s * x + t,   s = gamma / sqrt(var + eps),   t = beta - mean * s.

Folding into the layer *before* BN, which writes channel ``c``::

    W'[c] = s[c] * W[c]          b'[c] = s[c] * b[c] + t[c]

Folding into the layer *after* BN, which reads channel ``c``::

    W'[.., c, ..] = W[.., c, ..] * s[c]     b' = b + sum_{c, k} W[.., c, k] * t[c]

The second form is exact only when every output element sums over every kernel
tap: a zero-padded convolution sees padded zeros, not ``t``, at its borders, and a
transposed convolution gives border outputs fewer taps. There only a zero shift
folds. Everything is computed in float64 numpy arrays (torch tensors are accepted
as inputs, so the ONNX pass runs without torch) and rounded once with :func:`round_to`.
"""

from __future__ import annotations

import dataclasses
import enum
import mmap
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "Affine",
    "FoldRefused",
    "Layout",
    "bn_affine",
    "float64",
    "round_to",
    "scale_input_channels",
    "scale_output_channels",
    "scale_output_channels_rounded",
]


class FoldRefused(Exception):
    """A fold that must not happen; ``str(self)`` is the reason for the report."""


class Layout(enum.Enum):
    """How a weight tensor stores its output and input channels."""

    CONV = "conv"  # [out, in/groups, *kernel]; Linear's [out, in] is CONV without a kernel
    CONV_TRANSPOSE = "conv_transpose"  # [in, out/groups, *kernel]
    MATMUL = "matmul"  # [in, out]  (MatMul's right operand, Gemm with transB=0)


@dataclasses.dataclass(frozen=True)
class Affine:
    """BatchNorm at inference as ``y = scale * x + shift`` (float64, one value per channel)."""

    scale: np.ndarray
    shift: np.ndarray

    @property
    def channels(self) -> int:
        """Number of channels the map acts on."""
        return int(self.scale.size)

    def shift_is_zero(self) -> bool:
        """True when the map has no additive part, so it folds through padding."""
        return bool((self.shift == 0).all())

    def apply_last_axis(self, value: Any) -> np.ndarray:  # noqa: ANN401 - a numpy array or torch tensor
        """The map applied to a constant whose last axis holds the channels (e.g. a Gemm's C)."""
        return float64(value) * self.scale + self.shift

    def repeat(self, times: int) -> Affine:
        """Each channel's scale and shift repeated ``times`` in a row: BN seen through a flatten of (C, *spatial)."""
        return Affine(np.repeat(self.scale, times), np.repeat(self.shift, times))

    def slice(self, start: int, stop: int) -> Affine:
        """The map restricted to channels ``start:stop`` (for BN after a concat)."""
        return Affine(self.scale[start:stop], self.shift[start:stop])


def float64(value: Any) -> np.ndarray:  # noqa: ANN401 - a numpy array, torch tensor or number
    """``value`` as a float64 numpy array (a torch tensor is detached and moved to the CPU first)."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def _f64(value: Any, channels: int, default: float) -> np.ndarray:  # noqa: ANN401 - array-like or None
    if value is None:
        return np.full((channels,), default, dtype=np.float64)
    t = float64(value).reshape(-1)
    if t.size == 1 and channels != 1:
        t = np.broadcast_to(t, (channels,))
    if t.size != channels:
        raise FoldRefused(f"parameter has {t.size} values for {channels} channels")
    return t.copy()


def bn_affine(
    mean: Any,  # noqa: ANN401 - numpy arrays or torch tensors
    var: Any,  # noqa: ANN401
    gamma: Any | None,  # noqa: ANN401
    beta: Any | None,  # noqa: ANN401
    eps: float,
) -> Affine:
    """Compute the inference-time affine map of a BatchNorm in float64.

    Args:
        mean: Population mean per channel.
        var: Population variance per channel.
        gamma: Scale per channel, or None when the BN has no affine part.
        beta: Shift per channel, or None when the BN has no affine part.
        eps: The BN's epsilon; 0 is allowed where every variance is positive.

    Returns:
        The per-channel scale and shift.

    Raises:
        FoldRefused: Statistics or parameters that are not finite, a negative
            variance, or ``var + eps == 0``.
    """
    channels = int(float64(mean).size)
    mean64 = _f64(mean, channels, 0.0)
    var64 = _f64(var, channels, 1.0)
    gamma64 = _f64(gamma, channels, 1.0)
    beta64 = _f64(beta, channels, 0.0)
    for label, t in (("running_mean", mean64), ("running_var", var64), ("weight", gamma64), ("bias", beta64)):
        if not np.isfinite(t).all():
            raise FoldRefused(f"{label} has non-finite values")
    if not float(eps) >= 0.0 or not np.isfinite(float(eps)):
        raise FoldRefused(f"eps={eps} is not a finite non-negative number")
    if (var64 < 0).any():
        channel = int(np.flatnonzero(var64 < 0)[0])
        raise FoldRefused(f"running_var is negative (channel {channel}: {float(var64[channel]):.3g})")
    denominator = var64 + float(eps)
    if (denominator <= 0).any():
        channel = int(np.flatnonzero(denominator <= 0)[0])
        raise FoldRefused(f"var + eps is zero at channel {channel}: BN divides by zero")
    with np.errstate(over="ignore", invalid="ignore"):
        scale = gamma64 / np.sqrt(denominator)
        shift = beta64 - mean64 * scale
    if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
        raise FoldRefused("scale or shift overflows float64")
    return Affine(scale, shift)


def _bias64(bias: Any, channels: int) -> np.ndarray:  # noqa: ANN401 - array-like or None
    if bias is None:
        return np.zeros(channels, dtype=np.float64)
    return float64(bias).reshape(-1)


def _groups_check(channels: int, groups: int, what: str) -> None:
    if groups < 1 or channels % groups:
        raise FoldRefused(f"{what} channels ({channels}) are not divisible by groups ({groups})")


def output_channels(weight: np.ndarray, layout: Layout, groups: int = 1) -> int:
    """Number of output channels a weight of ``layout`` writes."""
    if layout is Layout.CONV:
        return int(weight.shape[0])
    if layout is Layout.CONV_TRANSPOSE:
        return int(weight.shape[1]) * groups
    return int(weight.shape[-1])


def input_channels(weight: np.ndarray, layout: Layout, groups: int = 1) -> int:
    """Number of input channels a weight of ``layout`` reads."""
    if layout is Layout.CONV:
        return int(weight.shape[1]) * groups
    if layout is Layout.CONV_TRANSPOSE:
        return int(weight.shape[0])
    return int(weight.shape[-2])


def scale_output_channels(
    weight: Any,  # noqa: ANN401 - a numpy array or torch tensor
    bias: Any | None,  # noqa: ANN401
    affine: Affine,
    layout: Layout,
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``affine`` into the layer that writes its channels (the layer before BN).

    Args:
        weight: The layer's weight, laid out as ``layout``.
        bias: The layer's bias, or None.
        affine: The BN map to fold.
        layout: How ``weight`` stores its channels.
        groups: Convolution groups (1 for Linear/MatMul).

    Returns:
        ``(weight, bias)`` in float64; the bias is always present.

    Raises:
        FoldRefused: When the channel counts do not match.
    """
    w = float64(weight)
    out = output_channels(w, layout, groups)
    if out != affine.channels:
        raise FoldRefused(f"layer writes {out} channels but BN has {affine.channels}")
    b = _bias64(bias, out)
    if b.size != out:
        raise FoldRefused(f"bias has {b.size} values for {out} channels")
    s = affine.scale
    if layout is Layout.CONV:
        w = w * s.reshape([-1] + [1] * (w.ndim - 1))
    elif layout is Layout.CONV_TRANSPOSE:
        _groups_check(int(w.shape[0]), groups, "input")
        shape = w.shape
        w = w.reshape(groups, shape[0] // groups, shape[1], -1)
        w = (w * s.reshape(groups, 1, shape[1], 1)).reshape(shape)
    else:
        w = w * s.reshape([1] * (w.ndim - 1) + [-1])
    return w, b * s + affine.shift


def scale_output_channels_rounded(
    weight: np.ndarray,
    bias: Any | None,  # noqa: ANN401 - a numpy array or torch tensor
    affine: Affine,
    dtype: np.dtype,
    *,
    block_elements: int = 2**18,
) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`scale_output_channels` for a ``Layout.CONV`` weight, rounded a block of output channels at a time.

    The same float64 maths and the same single rounding, but a layer is never held in
    float64 whole: each block of rows is computed, checked and rounded into the result
    (a 37 MB float32 weight needs 2 MB of float64 at a time, not 75 MB).

    Returns:
        The rounded weight (``dtype``), the float64 bias, and how many values were flushed to zero.

    Raises:
        FoldRefused: Channel mismatch, or a block that does not survive rounding.
    """
    out = int(weight.shape[0])
    if out != affine.channels:
        raise FoldRefused(f"layer writes {out} channels but BN has {affine.channels}")
    b = _bias64(bias, out)
    if b.size != out:
        raise FoldRefused(f"bias has {b.size} values for {out} channels")
    result = np.empty(weight.shape, dtype=dtype)
    per_row = max(1, int(np.prod(weight.shape[1:])))
    step = max(1, block_elements // per_row)
    flushed = 0
    mapped = getattr(weight, "_mmap", None)  # a memory-mapped weight: its pages are dropped once read
    for start in range(0, out, step):
        rows = slice(start, min(out, start + step))
        block = np.multiply(weight[rows], affine.scale[rows].reshape([-1] + [1] * (weight.ndim - 1)), dtype=np.float64)
        result[rows], count = round_to(block, dtype)
        flushed += count
        if mapped is not None and hasattr(mapped, "madvise"):
            mapped.madvise(mmap.MADV_DONTNEED)  # read-only file pages: dropped from memory, re-read if touched
    return result, b * affine.scale + affine.shift, flushed


def scale_input_channels(
    weight: Any,  # noqa: ANN401 - a numpy array or torch tensor
    bias: Any | None,  # noqa: ANN401
    affine: Affine,
    layout: Layout,
    groups: int = 1,
    *,
    padded: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``affine`` into the layer that reads its channels (the layer after BN).

    Args:
        weight: The layer's weight, laid out as ``layout``.
        bias: The layer's bias, or None.
        affine: The BN map to fold.
        layout: How ``weight`` stores its channels.
        groups: Convolution groups (1 for Linear/MatMul).
        padded: Whether the layer pads its input with zeros.

    Returns:
        ``(weight, bias)`` in float64; the bias is always present.

    Raises:
        FoldRefused: When the shift cannot become a constant bias (padding,
            transposed convolution) or the channel counts do not match.
    """
    w = float64(weight)
    cin = input_channels(w, layout, groups)
    if cin != affine.channels:
        raise FoldRefused(f"layer reads {cin} channels but BN has {affine.channels}")
    if not affine.shift_is_zero():
        if padded:
            raise FoldRefused("the following layer zero-pads its input, so BN's shift does not fold")
        if layout is Layout.CONV_TRANSPOSE:
            raise FoldRefused("BN's shift does not fold into a following ConvTranspose (border outputs get fewer taps)")
    cout = output_channels(w, layout, groups)
    b = _bias64(bias, cout)
    if b.size != cout:
        raise FoldRefused(f"bias has {b.size} values for {cout} channels")
    s, t = affine.scale, affine.shift
    if layout is Layout.CONV:
        _groups_check(cout, groups, "output")
        shape = w.shape
        grouped = w.reshape(groups, cout // groups, shape[1], -1)
        t_g = t.reshape(groups, shape[1])
        b = b + np.einsum("gock,gc->go", grouped, t_g).reshape(cout)
        w = (grouped * s.reshape(groups, 1, shape[1], 1)).reshape(shape)
    elif layout is Layout.CONV_TRANSPOSE:
        w = w * s.reshape([-1] + [1] * (w.ndim - 1))
    else:
        if w.ndim != 2:
            raise FoldRefused(f"a {w.ndim}-D MatMul weight reads BN channels in every batch slice")
        b = b + t @ w
        w = w * s.reshape(-1, 1)
    return w, b


def round_to(value: Any, dtype: Any) -> tuple[Any, int]:  # noqa: ANN401 - numpy or torch, by ``dtype``
    """Round a float64 result once to ``dtype``, refusing what would not survive.

    Args:
        value: The folded float64 values (numpy array or torch tensor).
        dtype: The model's floating-point dtype: a torch dtype (the result is a
            torch tensor) or a numpy dtype, ``ml_dtypes.bfloat16`` included (the
            result is a numpy array).

    Returns:
        The rounded values and how many were flushed from the subnormal range to zero.

    Raises:
        FoldRefused: Non-floating ``dtype``, non-finite values, or values
            beyond the dtype's range.
    """
    torch_dtype = type(dtype).__module__.startswith("torch")
    name = str(dtype).removeprefix("torch.") if torch_dtype else np.dtype(dtype).name
    if name not in _FLOATS:
        raise FoldRefused(f"weights of dtype {name} are not floating point")
    target = _FLOATS[name]
    value = float64(value)
    info = ml_dtypes.finfo(target)
    largest = max(float(value.max()), -float(value.min())) if value.size else 0.0
    if not np.isfinite(largest):  # a NaN or an infinity anywhere makes the extremes non-finite
        raise FoldRefused("folded values are not finite")
    if largest > float(info.max):
        raise FoldRefused(f"folded value {largest:.4g} overflows {name} (max {float(info.max):.4g})")
    # every value is within the dtype's range now, so rounding cannot overflow
    tiny = float(info.tiny)
    subnormal = (value < tiny) & (value > -tiny) & (value != 0)
    flushed = int(np.count_nonzero(subnormal))
    if flushed:
        value = np.where(subnormal, 0.0, value)
    if torch_dtype:
        import torch

        rounded = torch.from_numpy(np.ascontiguousarray(value)).to(dtype)
    else:
        rounded = value.astype(target)
    return rounded, flushed


_FLOATS = {
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
