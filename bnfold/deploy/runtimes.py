"""Runtimes a model can run on: names, availability, and one call to run a model on each."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.lazy import is_tensor

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "ONNX_RUNTIMES",
    "TORCH_RUNTIMES",
    "check_available",
    "ort_providers",
    "run_onnx",
    "run_torch",
    "run_torch64",
]

TORCH_RUNTIMES = ("torch-cpu", "torch-cuda")
ONNX_RUNTIMES = ("ort-cpu", "ort-cpu-opt", "ort-cuda", "ort-tensorrt")
_PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cpu-opt": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def ort_providers(runtime: str) -> list[str]:
    """The ONNX Runtime execution providers for ``runtime``."""
    return _PROVIDERS[runtime]


def check_available(runtime: str) -> None:
    """Raise a clear error when ``runtime`` is unknown or absent on this machine.

    Raises:
        BnfoldError: Unknown name, no CUDA for torch, or no such ONNX Runtime provider.
    """
    if runtime not in TORCH_RUNTIMES + ONNX_RUNTIMES:
        raise BnfoldError(f"runtime {runtime!r}: choose from {', '.join(TORCH_RUNTIMES + ONNX_RUNTIMES)}")
    if runtime == "torch-cuda" and not _cuda_available():
        raise BnfoldError("runtime torch-cuda: this torch build sees no CUDA GPU")
    if runtime in ("ort-cuda", "ort-tensorrt"):
        import onnxruntime as ort

        provider = _PROVIDERS[runtime][0]
        if provider not in ort.get_available_providers():
            raise BnfoldError(
                f"runtime {runtime}: ONNX Runtime has no {provider} here (install onnxruntime-gpu on a GPU machine)"
            )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _device(runtime: str) -> torch.device:
    import torch

    return torch.device("cuda" if runtime == "torch-cuda" else "cpu")


def run_torch(model: nn.Module, inputs: list[np.ndarray], runtime: str = "torch-cpu") -> list[np.ndarray]:
    """Run a module in its own dtype on ``runtime``; outputs come back as numpy arrays."""
    import torch

    device = _device(runtime)
    model = copy.deepcopy(model).eval().to(device)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tensors = [torch.from_numpy(np.array(x)).to(device) for x in inputs]
    tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
    with torch.no_grad():
        out = model(*tensors)
    return [
        t.detach().float().cpu().numpy() if t.dtype == torch.bfloat16 else t.detach().cpu().numpy()
        for t in _flatten(out)
    ]


def run_torch64(model: nn.Module, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Run a module in float64 on the CPU: the truth for a torch reference."""
    import torch

    model = copy.deepcopy(model).eval().to("cpu").double()
    tensors = [torch.from_numpy(np.array(x)) for x in inputs]
    tensors = [t.double() if t.is_floating_point() else t for t in tensors]
    with torch.no_grad():
        return [t.detach().numpy() for t in _flatten(model(*tensors))]


def _flatten(out: object) -> list[torch.Tensor]:
    if is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for item in out for t in _flatten(item)]
    raise BnfoldError(f"the model returned {type(out).__name__}, not tensors")


def run_onnx(model: onnx.ModelProto, inputs: list[np.ndarray], runtime: str = "ort-cpu") -> list[np.ndarray]:
    """Run an ONNX model on ``runtime``: graph optimisations off, except for ``ort-cpu-opt``."""
    from bnfold.deploy.onnx_reference import run_ort

    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    feeds = dict(zip(names, inputs, strict=True))
    return run_ort(model, feeds, optimize=runtime == "ort-cpu-opt", providers=ort_providers(runtime))
