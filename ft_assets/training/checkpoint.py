"""Every save and restore of trained weights during and after training: one module.

    <checkpoint_dir>/step-NNNNNN/    one complete checkpoint (the newest only is kept)
        adapter/                     the method's trained state, as `method.save` writes it (or,
                                     sharded, `Ranks.save_sharded`: gathered whole by every rank)
        state.pt                     optimizer, scheduler, RNG (each rank's, when several)
        progress.json                `TrainResult.progress`: step, curves, tokens, kept step
    <checkpoint_dir>/best/step-NNNNNN/adapter/   the best-validation weights so far
    <out_dir>/                       what `save_trained` leaves: the method's files

Crash guarantees: a checkpoint is written into `.tmp-<random>` and renamed into place, so
`latest_checkpoint` only ever sees complete ones (it also requires progress.json); the same
for best weights. Rank 0 writes, every rank returns once the files are complete (barrier).
Restores are exact: weights, optimizer, scheduler and every rank's RNG, so a resumed run
computes what an uninterrupted one would; a resume with another world size is refused.
What a method saves is its own business (`method.save` / `restore`); the one fact asked of it
here is `saves_whole_model` (full fine-tuning: the whole model, not an adapter). State files
are our own torch.save dicts, loaded with weights_only=True.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .distributed import SINGLE, Ranks, is_sharded
from .result import TrainResult

PROGRESS = "progress.json"  # written last into a checkpoint: its completeness mark (the store mirrors on it too)


def save_checkpoint(ckpt_root: Path, step: int, model, method, optimizer, scheduler, result: TrainResult,
                    ranks: Ranks = SINGLE) -> Path:
    """Rank 0 writes (weights, optimizer, scheduler, every rank's RNG, the curves); every rank
    returns once it is complete."""
    final = ckpt_root / f"step-{step:06d}"
    # dropout masks differ per rank: each rank's CPU and (its own device's) CUDA RNG, to resume each exactly
    rng_by_rank = ranks.gather(torch.get_rng_state())
    cuda_by_rank = ranks.gather(torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    tmp = ckpt_root / f".tmp-{uuid.uuid4().hex[:8]}"
    if ranks.is_main:
        tmp.mkdir(parents=True)
    sharded = is_sharded(model)
    if sharded:  # collectives: every rank gathers, rank 0 writes
        optimizer_state = ranks.full_optimizer_state(model, optimizer)
        ranks.save_sharded(model, tmp / "adapter", whole_model=method.saves_whole_model)
    if not ranks.is_main:
        ranks.barrier()
        return final
    if not sharded:
        optimizer_state = optimizer.state_dict()
        method.save(model, tmp / "adapter")
    torch.save({
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "torch_rng": rng_by_rank[0],
        **({"torch_rng_by_rank": rng_by_rank, "cuda_rng_by_rank": cuda_by_rank} if ranks.distributed else {}),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }, tmp / "state.pt")
    world = {"world_size": ranks.world_size} if ranks.distributed else {}
    publish(tmp, ckpt_root, step, {**result.progress(step), **world})
    ranks.barrier()
    return final


def publish(complete: Path, ckpt_root: Path, step: int, progress: dict[str, Any]) -> Path:
    """A finished checkpoint's files (`complete`, on `ckpt_root`'s filesystem) become
    `ckpt_root/step-NNNNNN`: progress.json written last, then one rename, so a step-N dir is whole
    or absent; the older ones go (the newest only is kept). Also for trainers whose library
    writes the files (DPO: HF Trainer's checkpoint-N)."""
    (complete / PROGRESS).write_text(json.dumps(progress))
    final = ckpt_root / f"step-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(complete, final)
    for old in ckpt_root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def move_files(staged: Path, out_dir: Path) -> None:
    """What another process saved in `staged` moved into `out_dir` (a rename on one filesystem)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(staged.iterdir()):
        shutil.move(str(path), out_dir / path.name)


def latest_checkpoint(ckpt_root: Path | None) -> Path | None:
    """The newest complete checkpoint under `ckpt_root`, or None."""
    if ckpt_root is None or not ckpt_root.is_dir():
        return None
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / PROGRESS).is_file())
    return done[-1] if done else None


def resume(ckpt_root: Path | None, model, method, optimizer, scheduler, result: TrainResult,
           ranks: Ranks = SINGLE) -> int:
    """Restore the newest checkpoint under `ckpt_root` into the run; its step (0: none, start over)."""
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is None:
        return 0
    progress = json.loads((ckpt / PROGRESS).read_text())
    if progress.get("world_size", 1) != ranks.world_size:
        raise ValueError(f"checkpoint {ckpt} was written by {progress.get('world_size', 1)} processes and this run "
                         f"has {ranks.world_size}: a global batch is rows per process x processes, so it cannot "
                         "resume exactly; run with the same number of processes, or delete the checkpoint to start over")
    load_weights(ckpt, model, method)
    blob = torch.load(ckpt / "state.pt", weights_only=True)
    if is_sharded(model):
        ranks.load_full_optimizer_state(model, optimizer, blob["optimizer"])
    else:
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if ranks.distributed:
        torch.set_rng_state(blob["torch_rng_by_rank"][ranks.rank])
        if blob["cuda_rng_by_rank"][ranks.rank] is not None:
            torch.cuda.set_rng_state(blob["cuda_rng_by_rank"][ranks.rank])
    else:
        torch.set_rng_state(blob["torch_rng"])
        if blob["cuda_rng"]:
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
    result.resumed_from_step = result.restore_progress(progress)
    return result.resumed_from_step


def load_weights(saved: Path, model, method) -> None:
    """The trained weights saved under `saved/adapter` (a checkpoint, or best weights) into `model`."""
    adapter = saved / "adapter"
    if is_sharded(model):  # FSDP2: whole tensors by name into the shards
        Ranks.load_sharded(model, adapter)
        return
    # A method whose saved names are not live parameter names (or that keeps more state than
    # parameters, e.g. Delta-LoRA's updated base weights) restores itself; the rest match names.
    restore = getattr(method, "restore", None)
    if restore is not None:
        restore(model, adapter)
    else:
        _restore_by_name(saved, model)


def save_weights(root: Path, model, method, ranks: Ranks = SINGLE) -> Path:
    """Replace `root/adapter` with the model's trained weights, atomically (tmp dir, rename), by
    rank 0 (a sharded model: every rank calls, to gather the weights)."""
    tmp = root / f".tmp-{uuid.uuid4().hex[:8]}"
    if ranks.is_main:
        root.mkdir(parents=True, exist_ok=True)
    if is_sharded(model):
        ranks.save_sharded(model, tmp, whole_model=method.saves_whole_model)
    elif ranks.is_main:
        method.save(model, tmp)
    if not ranks.is_main:
        return root
    if (root / "adapter").exists():
        shutil.rmtree(root / "adapter")
    os.rename(tmp, root / "adapter")
    return root


def save_trained(model, method, out_dir: Path, ranks: Ranks = SINGLE) -> None:
    """The artifact's files: what `method` trained, into `out_dir`, by rank 0; a sharded (FSDP2)
    model needs every rank here, to gather its weights."""
    if is_sharded(model) and method.saves_whole_model:
        ranks.save_full(model, out_dir)
    elif is_sharded(model):  # an adapter: its tensors gathered whole, saved as the method saves them
        state = ranks.trainable_state(model)
        if ranks.is_main:
            method.save(model, out_dir, state_dict=state)
    elif ranks.is_main:
        method.save(model, out_dir)


@contextmanager
def best_weights_root(checkpoint_dir: Path | None) -> Iterator[Path]:
    """Where the best weights so far live: beside the checkpoints (a resumed run needs them),
    else a temporary directory."""
    if checkpoint_dir is not None:
        yield checkpoint_dir / "best"
        return
    with tempfile.TemporaryDirectory(prefix="ft-best-") as tmp:
        yield Path(tmp)


def best_weights(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def drop_best_weights_but(root: Path, kept_step: int | None) -> None:
    for old in root.glob("step-*"):
        if old.name != f"step-{kept_step or 0:06d}":
            shutil.rmtree(old, ignore_errors=True)


def _restore_by_name(saved: Path, model) -> None:
    from safetensors.torch import load_file

    weights = next((saved / "adapter").glob("*.safetensors"))
    state = load_file(str(weights))
    params = dict(model.named_parameters())
    loaded = 0
    for name, tensor in state.items():
        target = _match_param(name, params)
        if target is not None:
            with torch.no_grad():
                target.copy_(tensor.to(target.dtype))
            loaded += 1
    if loaded == 0:
        raise RuntimeError(f"checkpoint {saved} matched no trainable parameter; delete it to start over")


def _match_param(saved_name: str, params: dict[str, Any]):
    # peft saves "base_model.model.x.lora_A.weight"; live names carry the adapter name ("lora_A.default.weight")
    if saved_name in params:
        return params[saved_name]
    for live, p in params.items():
        if p.requires_grad and live.replace(".default", "") == saved_name:
            return p
    return None
