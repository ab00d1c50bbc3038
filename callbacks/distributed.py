"""Reductions across the processes of a distributed run, as the core's hooks take them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "mean": dist.ReduceOp.SUM}


def all_reduce_function(trainer: Trainer) -> Callable[[torch.Tensor, str], torch.Tensor] | None:
    """``all_reduce(tensor, op) -> reduced copy`` over the trainer's processes (op "sum",
    "min", "max" or "mean"), or None when the run has one process. Every process must call
    it the same number of times with tensors of the same shapes. The collective runs on the
    strategy's device (NCCL takes GPU tensors only); the result comes back where the tensor
    was."""
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    world_size = dist.get_world_size()
    device = trainer.strategy.root_device

    def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        reduced = tensor.detach().to(device, copy=True)
        dist.all_reduce(reduced, op=_OPS[op])
        reduced = reduced / world_size if op == "mean" else reduced
        return reduced.to(tensor.device)

    return all_reduce
