"""Data parallelism for the one training loop: what each rank of a process group does.

    Ranks.from_env()          the process group torchrun (or Ray Train) set up: rank, world size,
                              local rank from RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, nccl on
                              CUDA. No WORLD_SIZE (or 1): `SINGLE`, one process, every call a no-op.

Contract (DDP: every rank holds the whole model, `training.loop.train` keeps them identical):
- Rows: every rank computes the same seeded order of global batches (batch_size x grad_accum x
  world_size rows per optimizer step) and reads only its own contiguous slice of each
  (`training.loop.batches`), so the ranks' rows are disjoint and their union is the step's rows.
- Loss: the step's label count is summed over ranks before the first backward, so every rank
  divides by the label count of the global batch; `sync_gradients` then sums the gradients over
  ranks once per optimizer step. The result equals one process training the global batch (up to
  the order of float additions); where rows fall on ranks changes nothing.
- Identical replicas: after the summed gradients every rank clips, steps and runs the method's
  `after_step` alike. Decisions taken from numbers (NaN stop, validation, early stop, a stop
  signal) use all-reduced numbers, so ranks never disagree about whether to go on.
- Files: rank 0 writes checkpoints and best weights (`is_main`); the others wait at `barrier()`
  and read them. Each rank's RNG state travels in the checkpoint (`gather`), so a resume with
  the same world size is exact. A resume with another world size is refused (`training.loop`).
- No pickles between ranks: what ranks exchange are tensors (`gather` takes byte tensors, as
  torch's RNG states are), never objects, which torch's `*_object` collectives unpickle and which
  could run code sent by whoever joined the process group.

FSDP2 (`shard`: full fine-tuning, and the LoRA family on a full-precision base): each decoder
layer and the root are `fully_shard`ed, so a rank holds 1/world_size of the weights (the frozen
base's too), gradients and optimizer state; the all-gathers and the
reduce-scatter of gradients happen inside forward/backward (averaged by FSDP2, so the loop
scales the loss by world_size: summed, as above), and `sync_gradients` does nothing for a
sharded model. Whole tensors are read and written only through collectives every rank calls:
`save_full` / `load_full` (full fine-tuning: `methods.full`'s checkpoint), `trainable_state` /
`save_sharded` / `load_sharded` (an adapter: its trainable tensors by live name; the base is
never copied) and the full optimizer state dicts (torch.save).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

TRAINABLE_FILE = "sharded_trainable.safetensors"  # Ranks.save_sharded: an adapter's tensors by live name


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

    def gather(self, state: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Every rank's `state` (a 1-D uint8 CPU tensor, such as an RNG state, or None), in rank
        order, on every rank, as CPU tensors: lengths, then the bytes padded to the longest, by
        tensor all-gathers (nothing is unpickled)."""
        if state is not None and (state.dtype != torch.uint8 or state.dim() != 1):
            raise TypeError(f"Ranks.gather takes a 1-D uint8 tensor or None, not {state.dtype} of shape "
                            f"{tuple(state.shape)}")
        if not self.distributed:
            return [state]
        import torch.distributed as dist

        nccl = dist.get_backend() == "nccl"  # its collectives take CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        length = torch.tensor([-1 if state is None else state.numel()], dtype=torch.int64, device=device)
        lengths = [torch.empty_like(length) for _ in range(self.world_size)]
        dist.all_gather(lengths, length)
        sizes = [int(n.item()) for n in lengths]
        padded = torch.zeros(max(max(sizes), 1), dtype=torch.uint8, device=device)
        if state is not None:
            padded[: state.numel()] = state.to(device)
        everyone = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(everyone, padded)
        return [None if n < 0 else got[:n].cpu().clone() for n, got in zip(sizes, everyone)]

    # ---- FSDP2 ------------------------------------------------------------------------

    def shard(self, model):
        """`fully_shard` every decoder layer, then the root (the tied embedding/head stays one
        parameter of the root). FSDP2 averages gradients over ranks (gloo has no pre-multiplied
        sum): the loop scales a sharded model's loss by world_size so that they are summed."""
        from torch.distributed.fsdp import fully_shard

        from ..methods.full import decoder_layers

        transformer = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
        for layer in decoder_layers(transformer):
            fully_shard(layer)
        fully_shard(model)
        return model

    def save_sharded(self, model, out_dir, whole_model: bool) -> None:
        """A sharded model's weights for a checkpoint, written by rank 0 (every rank calls: they are
        all-gathered): the whole model (`save_full`), or, for an adapter on a frozen base, only the
        trainable tensors by their live names (`TRAINABLE_FILE`; the base is not copied)."""
        from pathlib import Path

        from safetensors.torch import save_file

        if whole_model:
            self.save_full(model, out_dir)
            return
        state = self.trainable_state(model)
        if self.is_main:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(Path(out_dir) / TRAINABLE_FILE))

    @staticmethod
    def load_sharded(model, saved_dir) -> None:
        """What `save_sharded` wrote, into a sharded model (every rank reads the file)."""
        from pathlib import Path

        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        trainable_file = Path(saved_dir) / TRAINABLE_FILE
        if not trainable_file.is_file():
            Ranks.load_full(model, saved_dir)
            return
        state = load_file(str(trainable_file))
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state) != expected:
            raise ValueError(f"{trainable_file} holds other tensors than this model trains "
                             f"({len(set(state) ^ expected)} names differ); delete the checkpoint to start over")
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def trainable_state(self, model) -> dict[str, torch.Tensor]:
        """A sharded model's trainable tensors, whole, by live name, on rank 0 (others: {});
        every rank must call it (it all-gathers them)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in trainable} if self.is_main else {}

    def save_full(self, model, out_dir) -> None:
        """A sharded full fine-tune saved as `methods.full` saves it (a transformers checkpoint, the
        tied head left out), by rank 0; every rank must call it (it all-gathers the weights)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
            model.save_pretrained(out_dir, safe_serialization=True,
                                  state_dict={k: v for k, v in state.items() if k not in tied})

    @staticmethod
    def load_full(model, saved_dir) -> None:
        """Weights saved by `save_full` (every rank reads them) into a sharded model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from ..methods.full import _read_safetensors_dir

        set_model_state_dict(model, _read_safetensors_dir(saved_dir),
                             options=StateDictOptions(full_state_dict=True, strict=False))

    @staticmethod
    def full_optimizer_state(model, optimizer) -> dict[str, Any]:
        """The whole optimizer state on rank 0 (others: empty); every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @staticmethod
    def load_full_optimizer_state(model, optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def is_sharded(model) -> bool:
    """Was `model` sharded by `Ranks.shard` (FSDP2)?"""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


SINGLE = Ranks()
