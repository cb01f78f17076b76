"""torch.distributed for ``bnfold train`` and ``bnfold stats``: one process group, chosen by the device.

The backend follows the device the job computes on, not what the machine has: ``--device cpu``
under torchrun uses gloo also on a GPU machine (nccl cannot reduce CPU tensors), ``--device cuda``
uses nccl with one GPU per process (``BNFOLD_BACKEND=gloo`` forces gloo). Reductions go through
:func:`all_reduce_sum`, which moves a tensor to the device the backend reduces on and back.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from bnfold.errors import BnfoldError

__all__ = ["all_reduce_sum", "device_for", "start"]


def start(device: str) -> tuple[int, int]:
    """Join the torchrun process group when there is one; return ``(rank, world size)``.

    Args:
        device: ``cpu`` or ``cuda``: the device this job computes on.

    Raises:
        BnfoldError: ``cuda`` without a GPU, or fewer GPUs than processes on this node.
    """
    _require_gpu(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        nccl = device == "cuda" and os.environ.get("BNFOLD_BACKEND") != "gloo"
        if device == "cuda":
            local, per_node = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            if per_node > torch.cuda.device_count():
                raise BnfoldError(
                    f"--device cuda under torchrun needs one GPU per process: {per_node} processes on this node, "
                    f"{torch.cuda.device_count()} GPU(s) visible (use --nproc-per-node "
                    f"{torch.cuda.device_count()}, or --device cpu)"
                )
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if nccl else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device_for(device: str) -> torch.device:
    """The ``torch.device`` of this process: its own GPU under torchrun (``cuda:LOCAL_RANK``), else ``device``.

    Raises:
        BnfoldError: ``cuda`` where this torch build sees no GPU.
    """
    _require_gpu(device)
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def _require_gpu(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise BnfoldError("--device cuda: this torch build sees no CUDA GPU")


def all_reduce_sum(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` over every rank in place; nothing without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        tensor.copy_(on_gpu)
        return
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
