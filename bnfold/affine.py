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
folds. Everything is computed in float64 and rounded once with :func:`round_to`.
"""

from __future__ import annotations

import dataclasses
import enum

import torch

__all__ = [
    "Affine",
    "FoldRefused",
    "Layout",
    "bn_affine",
    "round_to",
    "scale_input_channels",
    "scale_output_channels",
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

    scale: torch.Tensor
    shift: torch.Tensor

    @property
    def channels(self) -> int:
        """Number of channels the map acts on."""
        return int(self.scale.numel())

    def shift_is_zero(self) -> bool:
        """True when the map has no additive part, so it folds through padding."""
        return bool((self.shift == 0).all())

    def apply_last_axis(self, value: torch.Tensor) -> torch.Tensor:
        """The map applied to a constant whose last axis holds the channels (e.g. a Gemm's C)."""
        return value.to(torch.float64) * self.scale + self.shift

    def repeat(self, times: int) -> Affine:
        """Each channel's scale and shift repeated ``times`` in a row: BN seen through a flatten of (C, *spatial)."""
        return Affine(self.scale.repeat_interleave(times), self.shift.repeat_interleave(times))

    def slice(self, start: int, stop: int) -> Affine:
        """The map restricted to channels ``start:stop`` (for BN after a concat)."""
        return Affine(self.scale[start:stop], self.shift[start:stop])


def _f64(value: torch.Tensor | float | None, channels: int, default: float) -> torch.Tensor:
    if value is None:
        return torch.full((channels,), default, dtype=torch.float64)
    t = torch.as_tensor(value).detach().to("cpu", torch.float64).reshape(-1)
    if t.numel() == 1 and channels != 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise FoldRefused(f"parameter has {t.numel()} values for {channels} channels")
    return t.clone()


def bn_affine(
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
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
    channels = int(torch.as_tensor(mean).numel())
    mean64 = _f64(mean, channels, 0.0)
    var64 = _f64(var, channels, 1.0)
    gamma64 = _f64(gamma, channels, 1.0)
    beta64 = _f64(beta, channels, 0.0)
    for label, t in (("running_mean", mean64), ("running_var", var64), ("weight", gamma64), ("bias", beta64)):
        if not torch.isfinite(t).all():
            raise FoldRefused(f"{label} has non-finite values")
    if not float(eps) >= 0.0 or not torch.isfinite(torch.tensor(float(eps))):
        raise FoldRefused(f"eps={eps} is not a finite non-negative number")
    if (var64 < 0).any():
        channel = int(torch.nonzero(var64 < 0)[0])
        raise FoldRefused(f"running_var is negative (channel {channel}: {float(var64[channel]):.3g})")
    denominator = var64 + float(eps)
    if (denominator <= 0).any():
        channel = int(torch.nonzero(denominator <= 0)[0])
        raise FoldRefused(f"var + eps is zero at channel {channel}: BN divides by zero")
    scale = gamma64 / torch.sqrt(denominator)
    shift = beta64 - mean64 * scale
    if not (torch.isfinite(scale).all() and torch.isfinite(shift).all()):
        raise FoldRefused("scale or shift overflows float64")
    return Affine(scale, shift)


def _weight64(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to("cpu", torch.float64)


def _bias64(bias: torch.Tensor | None, channels: int) -> torch.Tensor:
    if bias is None:
        return torch.zeros(channels, dtype=torch.float64)
    return bias.detach().to("cpu", torch.float64).reshape(-1)


def _groups_check(channels: int, groups: int, what: str) -> None:
    if groups < 1 or channels % groups:
        raise FoldRefused(f"{what} channels ({channels}) are not divisible by groups ({groups})")


def output_channels(weight: torch.Tensor, layout: Layout, groups: int = 1) -> int:
    """Number of output channels a weight of ``layout`` writes."""
    if layout is Layout.CONV:
        return int(weight.shape[0])
    if layout is Layout.CONV_TRANSPOSE:
        return int(weight.shape[1]) * groups
    return int(weight.shape[-1])


def input_channels(weight: torch.Tensor, layout: Layout, groups: int = 1) -> int:
    """Number of input channels a weight of ``layout`` reads."""
    if layout is Layout.CONV:
        return int(weight.shape[1]) * groups
    if layout is Layout.CONV_TRANSPOSE:
        return int(weight.shape[0])
    return int(weight.shape[-2])


def scale_output_channels(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    affine: Affine,
    layout: Layout,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    w = _weight64(weight)
    out = output_channels(w, layout, groups)
    if out != affine.channels:
        raise FoldRefused(f"layer writes {out} channels but BN has {affine.channels}")
    b = _bias64(bias, out)
    if b.numel() != out:
        raise FoldRefused(f"bias has {b.numel()} values for {out} channels")
    s = affine.scale
    if layout is Layout.CONV:
        w = w * s.reshape([-1] + [1] * (w.dim() - 1))
    elif layout is Layout.CONV_TRANSPOSE:
        _groups_check(int(w.shape[0]), groups, "input")
        shape = w.shape
        w = w.reshape(groups, shape[0] // groups, shape[1], -1)
        w = (w * s.reshape(groups, 1, shape[1], 1)).reshape(shape)
    else:
        w = w * s.reshape([1] * (w.dim() - 1) + [-1])
    return w, b * s + affine.shift


def scale_input_channels(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    affine: Affine,
    layout: Layout,
    groups: int = 1,
    *,
    padded: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    w = _weight64(weight)
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
    if b.numel() != cout:
        raise FoldRefused(f"bias has {b.numel()} values for {cout} channels")
    s, t = affine.scale, affine.shift
    if layout is Layout.CONV:
        _groups_check(cout, groups, "output")
        shape = w.shape
        grouped = w.reshape(groups, cout // groups, shape[1], -1)
        t_g = t.reshape(groups, shape[1])
        b = b + torch.einsum("gock,gc->go", grouped, t_g).reshape(cout)
        w = (grouped * s.reshape(groups, 1, shape[1], 1)).reshape(shape)
    elif layout is Layout.CONV_TRANSPOSE:
        w = w * s.reshape([-1] + [1] * (w.dim() - 1))
    else:
        if w.dim() != 2:
            raise FoldRefused(f"a {w.dim()}-D MatMul weight reads BN channels in every batch slice")
        b = b + t @ w
        w = w * s.reshape(-1, 1)
    return w, b


def round_to(value: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Round a float64 result once to ``dtype``, refusing what would not survive.

    Args:
        value: The folded float64 tensor.
        dtype: The model's floating-point dtype.

    Returns:
        The rounded tensor and how many values were flushed from the subnormal
        range to zero.

    Raises:
        FoldRefused: Non-floating ``dtype``, non-finite values, or values
            beyond the dtype's range.
    """
    if not dtype.is_floating_point:
        raise FoldRefused(f"weights of dtype {dtype} are not floating point")
    if not torch.isfinite(value).all():
        raise FoldRefused("folded values are not finite")
    info = torch.finfo(dtype)
    if value.numel():
        largest = float(value.abs().max())
        if largest > info.max:
            raise FoldRefused(f"folded value {largest:.4g} overflows {_dtype_name(dtype)} (max {info.max:.4g})")
    subnormal = (value != 0) & (value.abs() < info.tiny)
    flushed = int(subnormal.sum())
    if flushed:
        value = torch.where(subnormal, torch.zeros_like(value), value)
    rounded = value.to(dtype)
    if not torch.isfinite(rounded).all():
        raise FoldRefused(f"folded values overflow {_dtype_name(dtype)} when rounded")
    return rounded, flushed


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
