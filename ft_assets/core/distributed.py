"""Data parallelism for the one training loop: what each rank of a process group does.

    Ranks.from_env()          the process group torchrun (or Ray Train) set up: rank, world size,
                              local rank from RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, nccl on
                              CUDA. No WORLD_SIZE (or 1): `SINGLE`, one process, every call a no-op.

Contract (DDP: every rank holds the whole model, `core.train.train` keeps them identical):
- Rows: every rank computes the same seeded order of global batches (batch_size x grad_accum x
  world_size rows per optimizer step) and reads only its own contiguous slice of each
  (`core.train.batches`), so the ranks' rows are disjoint and their union is the step's rows.
- Loss: the step's label count is summed over ranks before the first backward, so every rank
  divides by the label count of the global batch; `sync_gradients` then sums the gradients over
  ranks once per optimizer step. The result equals one process training the global batch (up to
  the order of float additions); where rows fall on ranks changes nothing.
- Identical replicas: after the summed gradients every rank clips, steps and runs the method's
  `after_step` alike. Decisions taken from numbers (NaN stop, validation, early stop, a stop
  signal) use all-reduced numbers, so ranks never disagree about whether to go on.
- Files: rank 0 writes checkpoints and best weights (`is_main`); the others wait at `barrier()`
  and read them. Each rank's RNG state travels in the checkpoint (`gather`), so a resume with
  the same world size is exact. A resume with another world size is refused (`core.train`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "cpu") -> "Ranks":
        """The process group of the launcher's environment, joined here (once per process)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return SINGLE
        import torch.distributed as dist

        ranks = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            if device.startswith("cuda"):
                torch.cuda.set_device(ranks.local_rank)
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return ranks

    def device(self, device: str) -> str:
        """A rank's own device: `cuda` becomes `cuda:<local rank>`; CPU stays CPU."""
        return f"cuda:{self.local_rank}" if self.distributed and device == "cuda" else device

    def sum(self, values: Sequence[float], device: str = "cpu") -> list[float]:
        """Each value summed over ranks (one all-reduce for all of them), in float64."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def sync_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum every trainable parameter's gradient over ranks, in one flat all-reduce per dtype."""
        if not self.distributed:
            return
        import torch.distributed as dist

        by_dtype: dict[Any, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is None:  # unused this step: on every rank alike (same code, same kind of rows)
                continue
            by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = Ranks()
