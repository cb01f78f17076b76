"""What a verification could have caught: its power on the inputs used, and how much the output depends on them.

A PASS means "no difference beyond the bound on these inputs", which says little when
the inputs cannot reveal a difference. Two measurements make the verdict honest:

* **Power**: planted changes in a copy of the reference. For a few weight layers
  (first, middle, last), the layer's weights get a random change of relative size
  ``delta`` (``W + delta * |W| * R / |R|``, ``R`` standard normal, seeded), the copy
  runs on the first input draw in its own dtype (the other draws can only catch more,
  so the figure is conservative), and the verifier's own rule judges
  it against the float64 truth. A bisection over a half-decade ladder (10% down to
  1e-6) finds, per layer, the smallest change caught. The power is the largest of
  these: a change of that size to any probed layer would have failed verification.
* **Input dependence**: the reference on a second, independent input of the same
  shape; the largest output difference relative to the output's size. Near zero
  (a random-weight network, a saturated head) means the check mostly saw constants:
  real inputs (``--inputs x.npz``) or another input distribution are needed.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["INDEPENDENT_BELOW", "LADDER", "Power", "input_dependence", "measure_power", "weight_layers"]

LADDER = tuple(10.0 ** (-k / 2) for k in range(2, 13))  # 10%, 3.2%, 1%, ... 1e-6
INDEPENDENT_BELOW = 1e-3  # outputs for two independent inputs closer than this (relative) barely depend on them
MAX_LAYERS = 3


@dataclasses.dataclass
class Power:
    """The smallest single-layer weight change the check catches.

    Attributes:
        smallest_caught: The largest, over probed layers, of the smallest relative change caught;
            None when some layer's 10% change went uncaught.
        layers: ``(layer, smallest relative change caught or None)`` per probed layer.
        input_dependence: Largest output difference between two independent inputs, relative to the output's size.
    """

    smallest_caught: float | None
    layers: list[tuple[str, float | None]]
    input_dependence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "smallest_relative_change_caught": self.smallest_caught,
            "layers": [{"layer": name, "smallest_relative_change_caught": d} for name, d in self.layers],
            "input_dependence": self.input_dependence,
            "text": self.describe(),
        }

    def describe(self) -> str:
        """One line for the verdict."""
        if not self.layers:
            return "power: no weight layer to probe"
        shown = ", ".join(f"{name} {_pct(d)}" for name, d in self.layers)
        if self.smallest_caught is None:
            missed = [name for name, d in self.layers if d is None]
            return f"power: a {_pct(LADDER[0])} change to the weights of {', '.join(missed)} is NOT caught ({shown})"
        return (
            f"power: a change of {_pct(self.smallest_caught)} to one layer's weights is caught "
            f"on these inputs ({len(self.layers)} layer(s) probed: {shown})"
        )


def _pct(value: float | None) -> str:
    if value is None:
        return f"> {LADDER[0]:.0%}"
    return f"{value * 100:.2g}%"


def weight_layers(model: Any) -> list[str]:
    """Names of the weight tensors a change may be planted in: first, middle and last layer with a >= 2-D weight."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        initializers = {t.name: t for t in model.graph.initializer}
        names = []
        for node in model.graph.node:
            if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1:
                tensor = initializers.get(node.input[1])
                if tensor is not None and len(tensor.dims) >= 2 and tensor.name not in names:
                    names.append(tensor.name)
    else:
        names = [
            name
            for name, p in model.named_parameters()
            if p.dim() >= 2 and p.is_floating_point() and name.endswith("weight")
        ]
    if len(names) <= MAX_LAYERS:
        return names
    picks = sorted({round(i * (len(names) - 1) / (MAX_LAYERS - 1)) for i in range(MAX_LAYERS)})
    return [names[i] for i in picks]


def _planted(value: np.ndarray, delta: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = np.asarray(value, dtype=np.float64)
    direction = rng.standard_normal(w.shape)
    norm = float(np.linalg.norm(direction)) or 1.0
    return w + delta * float(np.linalg.norm(w)) * direction / norm


def _perturbed(model: Any, layer: str, delta: float, seed: int) -> Any:
    import onnx
    from onnx import numpy_helper

    from bnfold.onnx_fold.tensors import decode

    if isinstance(model, onnx.ModelProto):
        copy_ = onnx.ModelProto()
        copy_.CopyFrom(model)
        for i, tensor in enumerate(copy_.graph.initializer):
            if tensor.name == layer:
                original = np.array(decode(tensor))
                changed = _planted(original, delta, seed).astype(original.dtype)
                copy_.graph.initializer[i].CopyFrom(numpy_helper.from_array(changed, layer))
        return copy_
    import torch

    from bnfold.affine import float64

    changed = copy.deepcopy(model)
    parameter = dict(changed.named_parameters())[layer]  # get_parameter() is missing on TorchScript modules
    with torch.no_grad():
        values = _planted(float64(parameter), delta, seed)
        parameter.copy_(torch.from_numpy(values).to(parameter.dtype))
    return changed


def measure_power(
    reference: Any,
    caught: Callable[[Any], bool],
    *,
    seed: int = 0,
) -> Power:
    """Measure the smallest caught change per probed layer by bisection over :data:`LADDER`.

    Args:
        reference: The reference model (torch module or ONNX ModelProto); not modified.
        caught: Runs a changed copy and returns True when the verifier's rule fails it.
        seed: Seeds the change's direction.

    Returns:
        The per-layer results; ``smallest_caught`` is their maximum.
    """
    layers = []
    for position, layer in enumerate(weight_layers(reference)):

        def fails(k: int, layer: str = layer, position: int = position) -> bool:
            return caught(_perturbed(reference, layer, LADDER[k], seed + position))

        if not fails(0):
            layers.append((layer, None))
            continue
        low, high = 0, len(LADDER)  # LADDER[low] is caught; LADDER[high] (if any) is not
        while high - low > 1:
            middle = (low + high) // 2
            if fails(middle):
                low = middle
            else:
                high = middle
        layers.append((layer, LADDER[low]))
    found = [d for _, d in layers]
    smallest = None if any(d is None for d in found) or not found else max(found)
    return Power(smallest, layers)


def input_dependence(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    """Largest output difference between two inputs, relative to the outputs' largest magnitude (0 to ~2)."""
    worst = 0.0
    for a, b in zip(first, second, strict=True):
        a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a64.shape != b64.shape or not a64.size:
            continue
        finite = np.isfinite(a64) & np.isfinite(b64)
        if not finite.any():
            continue
        scale = max(float(np.abs(a64[finite]).max()), float(np.abs(b64[finite]).max()))
        if scale > 0:
            worst = max(worst, float(np.abs(a64 - b64)[finite].max()) / scale)
    return worst
