"""Folded weights kept in float64 until a layer is final: the staging the two torch views share."""

from __future__ import annotations

from typing import Any

import numpy as np

from bnfold.affine import Affine, round_to, scale_input_channels, scale_output_channels
from bnfold.rules.view import Layer, Staged

__all__ = ["Float64Staging"]


class Float64Staging:
    """Stage float64 results and check that they round (a layer folded twice is still rounded once).

    A view mixes this in and provides :meth:`current` (the layer's weight and bias as they stand,
    float64 where a fold left them) and :meth:`weight_dtype`.
    """

    def current(self, layer: Layer) -> tuple[Any, Any]:
        """The layer's current weight and bias."""
        raise NotImplementedError

    def weight_dtype(self, layer: Layer) -> Any:  # noqa: ANN401 - a torch dtype
        """The dtype the layer's weights are rounded to."""
        raise NotImplementedError

    def stage(self, layer: Layer, weight: np.ndarray, bias: np.ndarray) -> Staged:
        """Check that float64 results round to the layer's dtype (refusing overflow); nothing is written."""
        round_to(weight, self.weight_dtype(layer))
        round_to(bias, self.weight_dtype(layer))
        return Staged(layer, weight, bias)

    def scale_output(self, layer: Layer, affine: Affine, *, final_output: object = None) -> Staged:
        """``affine`` on the channels the layer writes, float64."""
        return self.stage(layer, *scale_output_channels(*self.current(layer), affine, layer.layout, layer.groups))

    def scale_input(self, layer: Layer, affine: Affine) -> Staged:
        """``affine`` on the channels the layer reads, float64."""
        weight, bias = self.current(layer)
        folded = scale_input_channels(weight, bias, affine, layer.layout, layer.groups, padded=layer.zero_padded)
        return self.stage(layer, *folded)

    def weights(self, layer: Layer) -> tuple[Any, Any]:
        """The current weight and bias (for merging branches)."""
        return self.current(layer)
