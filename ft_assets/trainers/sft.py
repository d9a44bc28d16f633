"""Train one recipe method from its inputs: the single call behind the `adapter` asset.

    finetune(method, spec, examples, cfg, ...) -> FineTuned
        load the base (full precision, or the 4-bit `quantized_base` for QLoRA) -> seed ->
        `method.wrap` -> the previous adapter's state (continual) -> `training.loop.train`
    TrainingData, ContinualPlan: what a method trains on and where a `continue_from: previous`
        run starts; `defs.adapter_store` reads them from the store (the previous versions are the
        asset's own history, read by exact version, not an edge of the graph)
    adapter_facts(...): the adapter manifest's method/train facts

`FineTuned.save(dir)` writes what the method trained plus `train_log.json` (no timings, so the
artifact's bytes depend on the training only). Failures a user can act on raise `TrainingFailed`
(NaN loss, out of memory with the recipe keys to change). Nothing here knows Dagster or the
artifact store.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..training import continual, loop as train
from ..data import rows as data
from ..training.distributed import SINGLE, Ranks, is_sharded
from ..models.base_model import load_model, parameter_count
from ..models.quantize import compute_dtype, load_quantized


class TrainingFailed(RuntimeError):
    """Training stopped for a reason the user can fix; the message says how."""


@dataclass
class ContinualPlan:
    """Where a `continue_from: previous` run starts and what it replays; `notes` for the run log."""

    start: continual.Start
    replay: list[data.Example] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    replay_dataset: str | None = None  # the sft_dataset directory `replay` was drawn from

    def facts(self, replay_fraction: float) -> dict[str, Any]:
        s = self.start
        return {
            "continued_from": None if s.from_scratch else {"version": s.adapter_version, "path": s.adapter_path},
            "previous_sft_dataset": s.previous_sft_dataset,
            "reason": s.reason,
            "replay_fraction": replay_fraction,
            "replay_rows": len(self.replay),
        }


class StaleDataset(RuntimeError):
    """The sft_dataset was tokenized by another tokenizer than the base model has now."""


@dataclass
class TrainingData:
    """What one method trains on: its train split plus any replay rows, the pad id, the continual plan."""

    examples: list[data.Example]
    pad_id: int
    plan: ContinualPlan | None
    sft_dataset_dir: str = ""  # where `examples` came from (another process reads them there)

    @property
    def continued(self) -> bool:
        return self.plan is not None and not self.plan.start.from_scratch


@dataclass
class FineTuned:
    model: torch.nn.Module
    method: Any
    result: train.TrainResult
    trainable: int
    total: int

    def save(self, out_dir: Path, ranks: Ranks = SINGLE) -> None:
        """By rank 0; a sharded (FSDP2) model needs every rank here, to gather its weights."""
        if is_sharded(self.model) and self.method.type == "full":
            ranks.save_full(self.model, out_dir)
        elif is_sharded(self.model):  # an adapter: its tensors gathered whole, saved as the method saves them
            state = ranks.trainable_state(self.model)
            if ranks.is_main:
                self.method.save(self.model, out_dir, state_dict=state)
        elif ranks.is_main:
            self.method.save(self.model, out_dir)
        if ranks.is_main:
            (out_dir / "train_log.json").write_text(json.dumps(self.result.log(), indent=2, sort_keys=True) + "\n")


@dataclass
class TrainedElsewhere:
    """A method another process trained (`ft_assets.jobs.train`): the files it saved in `staged`,
    and what it reported. Stored by `write_adapter` like a `FineTuned`."""

    staged: Path
    result: train.TrainResult
    trainable: int
    total: int

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.staged.iterdir()):
            shutil.move(str(path), out_dir / path.name)  # a rename on one filesystem


def finetune(method, spec, examples: list[data.Example], cfg: train.TrainConfig, *, base_dir: Path,
             quantized_dir: Path | None, quantized_compute_dtype: str, pad_id: int, device: str, dtype: torch.dtype,
             autocast_dtype: torch.dtype | None, start_adapter: Path | None = None,
             checkpoint_dir: Path | None = None, log: Callable[[str], None] = print,
             on_log: Callable[..., None] | None = None,
             on_checkpoint: Callable[[Path], None] | None = None, ranks: Ranks = SINGLE,
             shard: bool = False) -> FineTuned:
    """Train `method` (a `methods` object, settings `spec`) on `examples`; resumes from the
    newest checkpoint in `checkpoint_dir`. `start_adapter`: a previous version to continue from.
    `ranks`: this process's place among data-parallel ones (`ft_assets.jobs.train`); every rank
    loads, wraps and seeds alike, so the replicas start identical. `shard`: FSDP2 instead of whole
    replicas (`Ranks.shard`; methods whose `fsdp` is true)."""
    if method.uses_quantized_base:
        model = load_quantized(quantized_dir, device, compute_dtype(quantized_compute_dtype, device))
    else:  # sharded: loaded on the CPU; fully_shard moves each layer's shard to the device, so
        # a base larger than one device trains (one whole layer at a time passes through it)
        model = load_model(base_dir, "cpu" if shard else device, dtype)
    train.seed_everything(cfg.seed)  # adapter init is random: seed it so reruns are reproducible
    model = method.wrap(model, spec, gradient_checkpointing=cfg.gradient_checkpointing)
    if start_adapter is not None:
        continual.load_state(model, method, start_adapter)
    trainable, total = parameter_count(model)
    if shard:
        model = ranks.shard(model)
    held = train.validation_rows(len(examples), cfg)
    log(f"{trainable:,} trainable of {total:,} parameters; {len(examples) - held} train rows"
        f"{f' ({held} more held out for validation)' if held else ''}; "
        f"{train.steps_for(len(examples) - held, cfg)} steps at most on {device}"
        f"{f' x {ranks.world_size} processes' if ranks.distributed else ''}{' (FSDP2: weights sharded)' if shard else ''}")
    try:
        result = train.train(model, method, spec, examples, cfg, pad_id=pad_id, device=device,
                             autocast_dtype=autocast_dtype, checkpoint_dir=checkpoint_dir, on_log=on_log,
                             on_checkpoint=on_checkpoint, ranks=ranks)
    except train.TrainingDiverged as exc:
        raise TrainingFailed(str(exc)) from None
    except torch.OutOfMemoryError as exc:
        raise TrainingFailed(out_of_memory_hint(cfg, device, exc)) from None
    except ValueError as exc:  # validation_fraction leaves no row to train on
        raise TrainingFailed(str(exc)) from None
    if result.resumed_from_step:
        log(f"resumed from checkpoint at step {result.resumed_from_step}")
    if result.validation_losses:
        best = min(v for _, v in result.validation_losses)
        stop = f"stopped early at step {result.stopped_early_at}" if result.stopped_early_at else f"ran {result.steps} steps"
        log(f"{stop}; kept the weights of step {result.kept_step} (validation loss {best:.4f} on "
            f"{result.validation_rows} held-out rows)")
    return FineTuned(model, method, result, trainable, total)


def adapter_facts(name: str, spec, training, tuned: FineTuned, device: str, plan: ContinualPlan | None
                  ) -> dict[str, Any]:
    """The adapter manifest's extra keys: the method, its training settings, what training did."""
    return {"method": {"name": name, "type": spec.type, "spec": spec.model_dump(mode="json"),
                       "training": training.model_dump(mode="json")},
            "train": {**tuned.result.summary(), "trainable_parameters": tuned.trainable,
                      "total_parameters": tuned.total, "device": device},
            **({"continual": plan.facts(spec.replay_fraction)} if plan is not None else {})}


def out_of_memory_hint(cfg: train.TrainConfig, device: str, exc: Exception) -> str:
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (
        f"out of memory on {device} with batch_size {cfg.batch_size} (x{cfg.grad_accum} accumulation). "
        f"Try, in the recipe: training.batch_size: {max(1, cfg.batch_size // 2)} with training.grad_accum: "
        f"{cfg.grad_accum * 2} (same effective batch), training.gradient_checkpointing: true, a shorter "
        f"prompt.max_length, or a quantized method (qlora). ({first_line})"
    )

