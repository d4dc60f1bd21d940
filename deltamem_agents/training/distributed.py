"""Data-parallel training on several processes (one per GPU, or CPU processes with ``gloo``), torchrun-compatible.

Each rank takes its contiguous shard of every micro-batch of the global batch, computes its part of the loss
*normalised by the global counts* (answer tokens, written tokens for the β regulariser), and the gradients of the
δ-mem parameters are summed across ranks with one flat all-reduce per optimizer step. So N ranks take exactly the
step one process takes on the same global batch (up to float rounding; a test checks it with two ``gloo``
processes). Rank 0 writes logs, checkpoints and the final adapter; every rank reads a checkpoint to resume.

Why ``torch.distributed`` directly and not the ``DistributedDataParallel`` wrapper or ``accelerate``: only the
adapter learns (≈ 5 M parameters on a 4B model, 20 MB of float32 gradients), so there is nothing to gain from
overlapping communication with the backward pass, while the DDP wrapper broadcasts every parameter *and* buffer
of the module at construction (the whole frozen base, 8 GB for a 4B model in bf16), needs every forward to go
through the wrapper (the ladder's fast write pass calls the base model directly) and its per-micro-batch
``no_sync`` bookkeeping. ``accelerate`` would add a launcher and a wrapper for the same one all-reduce.

Launch (the environment torchrun sets — ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT`` — is detected)::

    torchrun --nproc-per-node 4 -m deltamem_agents.cli train --recipe smollm2-tsw --distributed

Backend: ``nccl`` when CUDA is available, else ``gloo``; every rank uses ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistributedContext", "from_environment", "shard_bounds"]


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most one)."""
    return rank * n // world_size, (rank + 1) * n // world_size


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in an initialised process group, and the collectives the trainers need.

    Attributes:
        rank, world_size, local_rank: as torchrun numbers them.
        device: where collective tensors live (``cuda:local_rank`` for nccl, the CPU for gloo).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside the world of {self.world_size}")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files."""
        return self.rank == 0

    def shard(self, items: Sequence) -> list:
        """This rank's contiguous share of ``items`` (every rank must get at least one: see :meth:`check_batch`)."""
        lo, hi = shard_bounds(len(items), self.rank, self.world_size)
        return list(items[lo:hi])

    def check_batch(self, batch_size: int) -> None:
        """Raise ``ValueError`` unless every rank gets at least one item of a ``batch_size`` micro-batch."""
        if batch_size < self.world_size:
            raise ValueError(f"batch_size {batch_size} is smaller than the {self.world_size} ranks: every rank needs "
                             "at least one context per micro-batch (the batch is split, not repeated)")

    def sum(self, values: Sequence[float | Tensor]) -> Tensor:
        """Element-wise sum over ranks of ``values`` (floats or 0-dim tensors, detached), as a float64 tensor."""
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().reshape(()).to(self.device)
                            for v in values])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return flat

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any (keeps stop decisions identical)."""
        return bool(self.sum([1.0 if flag else 0.0])[0] > 0)

    def broadcast_parameters(self, params: Sequence[Tensor]) -> None:
        """Make every rank's ``params`` equal to rank 0's (one flat broadcast)."""
        if not params:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).to(self.device, torch.float32) for p in params])
            dist.broadcast(flat, src=0)
            offset = 0
            for p in params:
                n = p.numel()
                p.copy_(flat[offset : offset + n].view_as(p).to(p.dtype))
                offset += n

    def sum_gradients(self, params: Sequence[Tensor]) -> None:
        """Sum the gradients of ``params`` over ranks in place (one flat all-reduce; a missing grad counts as 0)."""
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).to(self.device, torch.float32) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype, copy=True).to(p.device)
            offset += n

    def barrier(self) -> None:
        dist.barrier()


def from_environment(backend: str | None = None) -> DistributedContext | None:
    """The context of this process: an already initialised default group, or one started from torchrun's
    environment (``WORLD_SIZE`` > 1); None when this is a single-process run.

    Raises:
        ValueError: ``WORLD_SIZE`` > 1 but ``RANK`` is missing.
    """
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        if "RANK" not in os.environ:
            raise ValueError("WORLD_SIZE > 1 but RANK is not set: launch with torchrun")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = torch.device("cuda", local) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistributedContext(rank=rank, world_size=world, local_rank=local, device=device)
