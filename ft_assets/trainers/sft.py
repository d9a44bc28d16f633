"""Supervised fine-tuning of one recipe method: the trainer behind the `adapter` asset.

    SftRequest (plain values, JSON-able)  ->  run(request, hw)  ->  FineTuned
        the train split (+ continual replay rows) -> load the base (full precision, or the 4-bit
        `quantized_base` for QLoRA) -> seed -> `method.wrap` -> the previous adapter's state
        (continual) -> `training.loop.train`, resuming from the request's checkpoint directory

Contract. `defs.adapters` builds one `SftRequest` per run and hands that same object to `run` in
the Dagster step, or writes it as JSON for torchrun / Ray, where `jobs.train` reads it back and
calls `run` on every rank: one assembly of the call, whatever the launcher. `FineTuned.save(dir)`
writes what the method trained (`training.checkpoint.save_trained`) plus `train_log.json` (no
timings, so the artifact's bytes depend on the training only); `TrainedElsewhere` is the same
result when another process trained. `TrainingData` / `ContinualPlan`: what the store side
(`defs.adapter_store`) found for the request. Failures a user can act on raise `TrainingFailed`
(NaN loss, out of memory with the recipe keys to change). No Dagster, no artifact store here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config.recipe import validate_method
from ..config.training import TrainingSpec
from ..data import rows as data
from ..data.sft_dataset import load_split
from ..methods import get_method
from ..models.base_model import load_model, parameter_count
from ..models.device import Compute
from ..models.quantize import compute_dtype, load_quantized
from ..training import checkpoint, continual, loop as train
from ..training.distributed import SINGLE, Ranks
from ..training.steps import steps_for
from .request import JsonRequest


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
    """What one method trains on, as the store side found it: the sft_dataset whose train split it
    reads, the pad id, and the continual plan (where it starts, which old rows it replays)."""

    sft_dataset_dir: str
    pad_id: int
    plan: ContinualPlan | None

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
        checkpoint.save_trained(self.model, self.method, out_dir, ranks)
        if ranks.is_main:
            (out_dir / "train_log.json").write_text(json.dumps(self.result.log(), indent=2, sort_keys=True) + "\n")

    def report(self) -> dict[str, Any]:
        """What rank 0 reports to the Dagster step (`TrainedElsewhere.from_report`)."""
        return {"result": asdict(self.result), "trainable": self.trainable, "total": self.total}


@dataclass
class TrainedElsewhere:
    """A method another process trained (`ft_assets.jobs.train`): the files it saved in `staged`,
    and what it reported. Stored by `write_adapter` like a `FineTuned`."""

    staged: Path
    result: train.TrainResult
    trainable: int
    total: int

    @classmethod
    def from_report(cls, staged: Path, message: dict[str, Any]) -> "TrainedElsewhere":
        return cls(staged, train.TrainResult.from_dict(message["result"]), message["trainable"], message["total"])

    def save(self, out_dir: Path) -> None:
        checkpoint.move_files(self.staged, out_dir)


@dataclass
class SftRequest(JsonRequest):
    """One method's SFT run as plain values: what `run` needs, built once by `defs.adapters`."""

    method: str  # the recipe's method name
    method_spec: dict[str, Any]  # its `methods.<name>` entry as the recipe validated it (with `type`)
    training: dict[str, Any]  # `recipe.training_for(method)`, a TrainingSpec as JSON
    seed: int
    sft_dataset_dir: str  # its train split is what the method trains on
    base_dir: str
    pad_id: int
    checkpoint_dir: str
    quantized_dir: str | None = None  # methods on `quantized_base` (QLoRA)
    quantized_compute_dtype: str = "bfloat16"
    start_adapter: str | None = None  # continual: the previous adapter version's directory
    replay: dict[str, Any] = field(default_factory=dict)  # continual: {"dataset_dir", "fraction"} of old rows
    parallel: str = "ddp"  # compute.parallel: "fsdp" shards a method whose `fsdp` is true (FSDP2)


def run(request: SftRequest, hw: Compute, *, ranks: Ranks = SINGLE, log: Callable[[str], None] = print,
        on_log: Callable[..., None] | None = None, on_checkpoint: Callable[[Path], None] | None = None
        ) -> FineTuned:
    """Train `request`'s method on this process's place among `ranks`, on `hw` (each rank its own device)."""
    spec = validate_method(request.method_spec)
    training = TrainingSpec.model_validate(request.training)
    examples = load_split(request.sft_dataset_dir, "train")
    if request.replay:
        old = load_split(request.replay["dataset_dir"], "train")
        examples = examples + continual.replay_rows(old, examples, request.replay["fraction"], request.seed)
    method = get_method(spec.type)
    if request.parallel == "fsdp" and not method.fsdp:
        log(f"parallel fsdp shards full fine-tuning and the LoRA family on a full-precision base; {spec.type} "
            "trains data-parallel (ddp), each process holding the model")
    return finetune(
        method, spec, examples, training, seed=request.seed, base_dir=Path(request.base_dir),
        quantized_dir=Path(request.quantized_dir) if request.quantized_dir else None,
        quantized_compute_dtype=request.quantized_compute_dtype, pad_id=request.pad_id,
        device=ranks.device(hw.device), dtype=hw.dtype, autocast_dtype=hw.autocast_dtype,
        start_adapter=Path(request.start_adapter) if request.start_adapter else None,
        checkpoint_dir=Path(request.checkpoint_dir), log=log, on_log=on_log, on_checkpoint=on_checkpoint,
        ranks=ranks, shard=request.parallel == "fsdp" and method.fsdp)


def finetune(method, spec, examples: list[data.Example], training: TrainingSpec, *, seed: int, base_dir: Path,
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
    train.seed_everything(seed)  # adapter init is random: seed it so reruns are reproducible
    model = method.wrap(model, spec, gradient_checkpointing=training.gradient_checkpointing)
    if start_adapter is not None:
        continual.load_state(model, method, start_adapter)
    trainable, total = parameter_count(model)
    if shard:
        model = ranks.shard(model)
    held = train.validation_rows(len(examples), training)
    log(f"{trainable:,} trainable of {total:,} parameters; {len(examples) - held} train rows"
        f"{f' ({held} more held out for validation)' if held else ''}; "
        f"{steps_for(len(examples) - held, training, ranks.world_size)} steps at most on {device}"
        f"{f' x {ranks.world_size} processes' if ranks.distributed else ''}{' (FSDP2: weights sharded)' if shard else ''}")
    try:
        result = train.train(model, method, spec, examples, training, seed=seed, pad_id=pad_id, device=device,
                             autocast_dtype=autocast_dtype, checkpoint_dir=checkpoint_dir, on_log=on_log,
                             on_checkpoint=on_checkpoint, ranks=ranks)
    except train.TrainingDiverged as exc:
        raise TrainingFailed(str(exc)) from None
    except torch.OutOfMemoryError as exc:
        raise TrainingFailed(out_of_memory_hint(training, device, exc)) from None
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


def out_of_memory_hint(cfg: TrainingSpec, device: str, exc: Exception) -> str:
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (
        f"out of memory on {device} with batch_size {cfg.batch_size} (x{cfg.grad_accum} accumulation). "
        f"Try, in the recipe: training.batch_size: {max(1, cfg.batch_size // 2)} with training.grad_accum: "
        f"{cfg.grad_accum * 2} (same effective batch), training.gradient_checkpointing: true, a shorter "
        f"prompt.max_length, or a quantized method (qlora). ({first_line})"
    )

