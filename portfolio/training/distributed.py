"""Data-parallel training over torch.distributed, launched the standard way
(``torchrun --nproc-per-node N -m portfolio train ...``; gloo on CPU, NCCL on GPUs).

Every process builds the same plan, data and schedule (they depend on the seed alone), and
takes its share of each step's sequences (rows ``rank, rank + N, ...``); the LoRA gradients —
each a sum over its rows' scored positions divided by the whole step's count — are summed
across processes, so every process takes the same optimiser step that one process would take
on the whole batch. The step's batch does not depend on the process count, so a run
checkpointed with one count resumes with another. Only rank 0 writes to the registry (the run,
checkpoints, the version); the others train and wait.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    """This process's place: its rank and the number of processes."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process is rank 0 (the one that writes)."""
        return self.rank == 0

    def share(self, n: int) -> list[int]:
        """The indices of a step's ``n`` sequences this process trains on."""
        return list(range(self.rank, n, self.size))


def world(device) -> World:
    """The world torchrun (or ``accelerate launch``) set up in the environment, with the
    process group started; a single process when ``WORLD_SIZE`` is unset or 1."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def broadcast_int(w: World, value: int | None) -> int:
    """Rank 0's ``value`` on every process."""
    if w.size == 1:
        return int(value)
    import torch
    import torch.distributed as dist

    t = torch.tensor([value if w.main else 0], dtype=torch.long)
    dist.broadcast(t, 0)
    return int(t.item())


def same_start(w: World, params) -> None:
    """Every process starts from rank 0's trainable tensors (the seed makes them equal already;
    this makes it certain)."""
    if w.size == 1:
        return
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, 0)


def sum_gradients(w: World, params) -> None:
    """Each trainable tensor's gradient summed over the processes (one flat all-reduce)."""
    if w.size == 1:
        return
    import torch
    import torch.distributed as dist

    params = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.grad.numel()].view_as(p.grad))
        offset += p.grad.numel()


def sum_floats(w: World, *values: float) -> list[float]:
    """Per-process numbers (loss parts, tokens) summed over the processes."""
    if w.size == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier(w: World) -> None:
    """Wait for every process."""
    if w.size > 1:
        import torch.distributed as dist

        dist.barrier()
