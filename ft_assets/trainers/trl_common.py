"""What every trainer built on a TRL (HF `Trainer`) class shares here: the settings our recipe keys
map to, the curves it records, and checkpoints that resume exactly.

    <checkpoint_dir>/step-NNNNNN/   one complete checkpoint (the newest only is kept): HF Trainer's
                                    files (the trained weights, optimizer, scheduler, RNG,
                                    trainer_state.json) and our progress.json (curves), written last
    <checkpoint_dir>/hf/            HF Trainer's output_dir: it writes checkpoint-N here, and a
                                    complete one is renamed to step-N; what a kill leaves is cleared

Every `checkpoint_every` steps (not after the last one: the artifact supersedes it), and on a
SIGTERM/SIGINT (that step, then `Preempted`), as `training.preemption` says; one writer per dir
(`checkpoint_lock`, held by rank 0). Under torchrun (`ranks`, `jobs.train`) HF Trainer runs DDP
(gloo on CPU) over the process group `Ranks.from_env` joined: each rank a slice of each global
batch of batch_size x grad_accum x world_size rows; rank 0 publishes a checkpoint once every rank
wrote its RNG state into it; a signal to any rank stops every rank after the same step (an
all-reduced flag); a checkpoint resumes only with the world size that wrote it. A re-run resumes from the newest step-N with HF's
`train(resume_from_checkpoint=...)`: weights, optimizer, scheduler and RNG restored, the consumed
batches skipped. The `ref/` adapter some TRL trainers add to a PeftModel (DPO, KTO, GRPO with a KL:
a frozen copy of the starting adapter, the reference policy) is dropped from every checkpoint: HF
loads sub-directory adapters when it finds them, and "default" would silently restart from the
starting weights (measured, ../shared/NOTES.md); "ref" stays what TRL built in this process. Resumed
or not, a run computes the same bits. bf16 only on CUDA (TRL configs default it on everywhere);
`report_to` off: TRL runs offline. No Dagster here.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..config.training import TrainingSpec
from ..training import checkpoint
from ..training.checkpoint import PROGRESS, latest_checkpoint
from ..training.distributed import SINGLE, Ranks
from ..training.loop import TrainingDiverged
from ..training.preemption import Preempted, StopRequest, checkpoint_lock, stop_requests

TRL_OPTIMIZERS = {"adamw": "adamw_torch", "paged_adamw_8bit": "paged_adamw_8bit", "adamw_8bit": "adamw_bnb_8bit"}
REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of a PeftModel's starting adapter


@dataclass(frozen=True)
class Curve:
    """A value the trainer logs each step, kept as [(step, value)] in the result's `field`."""

    logged_as: str  # TRL's log key, e.g. "rewards/accuracies"
    field: str  # the result's list it goes to, e.g. "reward_accuracies"
    digits: int = 6
    shown_as: str = ""  # its metadata key in the UI, e.g. "train_reward_accuracy"


@dataclass
class TrainedRun:
    """How a TRL run went, resumed or not: its loss curve, the other `Curve`s (attributes of a
    subclass), its size and wall time. `resumed_from_step` describes the run, not what it computed."""

    losses: list[tuple[int, float]] = field(default_factory=list)
    wall_s: float = 0.0
    resumed_from_step: int = 0
    steps: int = 0
    pairs_seen: int = 0
    trainable_parameters: int = 0
    total_parameters: int = 0
    peak_memory_bytes: int = 0

    @classmethod
    def from_dict(cls, fields: dict[str, Any]):
        """A run from its `asdict` as JSON carried it (rank 0's report): curves back to (step, value) tuples."""
        return cls(**{k: [tuple(x) for x in v] if isinstance(v, list) and v and isinstance(v[0], list) else v
                      for k, v in fields.items()})

    def summary(self) -> dict[str, Any]:
        """The manifest's `train` record."""
        return {"steps": self.steps, "pairs_seen": self.pairs_seen, "wall_s": round(self.wall_s, 2),
                "trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters,
                "peak_memory_bytes": self.peak_memory_bytes,
                "first_loss": self.losses[0][1] if self.losses else None,
                "final_loss": self.losses[-1][1] if self.losses else None,
                "resumed_from_step": self.resumed_from_step}


def trainer_args(training: TrainingSpec, seed: int, steps: int, out: Path, checkpoints: bool,
                 device: str) -> dict[str, Any]:
    """The keyword arguments of every TRL config for our recipe keys. Checkpoints: HF saves every
    `checkpoint_every` steps (`RunCallback` drops the one after the last step and adds one on a
    stop request)."""
    return dict(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.grad_accum, learning_rate=training.lr,
        weight_decay=training.weight_decay, warmup_steps=int(training.warmup_ratio * steps),
        lr_scheduler_type=training.lr_scheduler, max_grad_norm=training.max_grad_norm or 0.0,
        optim=TRL_OPTIMIZERS[training.optimizer], gradient_checkpointing=training.gradient_checkpointing,
        seed=seed, data_seed=seed,
        bf16=device.startswith("cuda") and torch.cuda.is_bf16_supported(), fp16=False,
        use_cpu=not device.startswith("cuda"), logging_steps=1,
        save_strategy="steps" if checkpoints else "no", save_steps=training.checkpoint_every, save_total_limit=1,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )


def train(model, build: Callable[[Path, Any], Any], *, what: str, training: TrainingSpec, device: str, steps: int,
          result: TrainedRun, curves: tuple[Curve, ...], checkpoint_dir: Path | None,
          check: Callable[[Any], None] = lambda trainer: None, on_log: Callable[[int, float], None] | None = None,
          on_checkpoint: Callable[[Path], None] | None = None, ranks: Ranks = SINGLE):
    """Train `model` in place with the trainer `build(output_dir, callback)` returns, for `steps`
    steps, recording into `result`. With `checkpoint_dir`: checkpoints and resumes (the module doc);
    `on_checkpoint(path)` once each is complete (the store mirrors it). Without: no checkpoints (a
    temporary output dir). `check(trainer)` runs before the first step (e.g. that TRL tokenized the
    data as we did). Either way a SIGTERM/SIGINT ends the step it arrives in and raises `Preempted`;
    TRL's reference adapter is removed from `model` afterwards. Out of memory raises
    `sft.TrainingFailed` with the recipe keys to change, a loss that is not finite
    `TrainingDiverged` (naming `what`). `ranks`: this process's place among torchrun's (module doc).
    Returns the trainer (its `model` is what trained)."""
    from transformers import PrinterCallback

    if ranks.distributed and not device.startswith("cuda"):
        _load_cpu_rank_devices()
    try:
        with checkpoint_lock(checkpoint_dir if ranks.is_main else None), stop_requests() as stop, \
                _trainer_output_dir(checkpoint_dir, ranks) as out:
            resume = latest_checkpoint(checkpoint_dir)
            if resume is not None:
                result.resumed_from_step = _restore_progress(resume, result, curves, ranks)
            run = _hf_callback(result, curves, stop, checkpoint_dir, on_log, on_checkpoint, ranks)
            trainer = build(out, run)
            trainer.remove_callback(PrinterCallback)  # our callback logs; no dicts on stdout
            check(trainer)
            run.t0 = time.perf_counter() - result.wall_s  # a resumed run's wall time includes the time before
            trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
            result.wall_s = time.perf_counter() - run.t0
    except torch.OutOfMemoryError as exc:
        from .sft import TrainingFailed, out_of_memory_hint

        raise TrainingFailed(out_of_memory_hint(training, device, exc)) from None
    if is_peft(model):
        if REFERENCE_ADAPTER in model.peft_config:  # TRL's frozen copy: not what we trained
            model.delete_adapter(REFERENCE_ADAPTER)
        model.set_adapter("default")
    if run.stopped_by is not None and run.step < steps:  # checkpointed at run.step (the callback)
        raise Preempted(run.step, run.stopped_by, run.saved)
    if not all(math.isfinite(loss) for _, loss in result.losses):
        raise TrainingDiverged(f"{what} loss is not finite; lower the learning rate (now {training.lr})")
    return trainer


def _load_cpu_rank_devices() -> None:
    """HF Trainer resumes a DDP run's optimizer with `torch.load(map_location=args.device)`, and on
    CPU ranks that device is `cpu:<rank>`, a location torch's loader refuses ("don't know how to
    restore data location ... cpu:0", measured: ../shared/NOTES.md). A storage on `cpu:<n>` is a CPU
    storage: accept those locations as they are (idempotent: registered once per process)."""
    global _CPU_RANKS_REGISTERED
    if _CPU_RANKS_REGISTERED:
        return
    import re

    cpu_rank = re.compile(r"cpu:\d+")
    torch.serialization.register_package(
        30, lambda storage: None, lambda storage, location: storage if cpu_rank.fullmatch(location) else None)
    _CPU_RANKS_REGISTERED = True


_CPU_RANKS_REGISTERED = False


def is_peft(model) -> bool:
    """A peft model (not a transformers model that merely has the peft integration's attributes)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


class RunCallback:
    """(HF's `TrainerCallback` added at use, `_hf_callback`: transformers' trainer stays unimported
    until a run starts.) Records the logged curves into `result`; checkpoints on a stop request and
    never after the last step; turns each HF checkpoint into a complete step-N (`checkpoint.publish`)."""

    def __init__(self, result: TrainedRun, curves: tuple[Curve, ...], stop: StopRequest,
                 checkpoint_dir: Path | None, on_log: Callable[[int, float], None] | None,
                 on_checkpoint: Callable[[Path], None] | None, ranks: Ranks = SINGLE):
        self.result, self.curves, self.stop, self.checkpoint_dir = result, curves, stop, checkpoint_dir
        self.on_log_, self.on_checkpoint, self.ranks = on_log, on_checkpoint, ranks
        self.step, self.saved, self.t0 = 0, None, time.perf_counter()
        self.stopped_by: str | None = None  # the signal every rank stopped for

    def _decide(self, state, control) -> None:
        """After a step's update: HF's periodic save stands, except after the last step; a stop
        request saves this step (with a checkpoint dir) and ends training. Several ranks decide
        together (an all-reduce at on_step_end, which every rank reaches): any rank's signal stops
        them all."""
        self.step = state.global_step
        if state.global_step >= state.max_steps:
            control.should_save = False  # the artifact supersedes a checkpoint of the last step
            return
        stopping = self.stop.signal_name
        if self.ranks.distributed and self.ranks.sum([1.0 if stopping else 0.0])[0] and not stopping:
            stopping = "SIGTERM"  # another rank's signal (torchrun forwards SIGTERM/SIGINT to every rank)
        if stopping is not None:
            self.stopped_by = stopping
            control.should_save = self.checkpoint_dir is not None
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kw):
        self._decide(state, control)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            step = state.global_step
            self.result.losses.append((step, round(float(logs["loss"]), 6)))
            for c in self.curves:
                if c.logged_as in logs:
                    getattr(self.result, c.field).append((step, round(float(logs[c.logged_as]), c.digits)))
            if self.on_log_:
                self.on_log_(step, float(logs["loss"]))
            if not self.ranks.distributed:  # several ranks decide at on_step_end only (together)
                self._decide(state, control)  # HF logs after on_step_end: a signal sent while logging counts for this step

    def on_save(self, args, state, control, **kw):
        self.ranks.barrier()  # every rank wrote its rng_state_<rank>.pth into the HF checkpoint
        progress = {"step": state.global_step, "losses": self.result.losses,
                    **{c.field: getattr(self.result, c.field) for c in self.curves},
                    "wall_s": time.perf_counter() - self.t0, "world_size": self.ranks.world_size}
        step_dir = self.checkpoint_dir / f"step-{state.global_step:06d}"
        if self.ranks.is_main:
            hf_checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            shutil.rmtree(hf_checkpoint / REFERENCE_ADAPTER, ignore_errors=True)  # HF would load it (module doc)
            step_dir = checkpoint.publish(hf_checkpoint, self.checkpoint_dir, state.global_step, progress)
            if self.on_checkpoint is not None:
                self.on_checkpoint(step_dir)
        self.saved = step_dir
        self.ranks.barrier()  # published before any rank goes on


def _hf_callback(*args) -> RunCallback:
    from transformers import TrainerCallback

    return type("RunCallback", (RunCallback, TrainerCallback), {})(*args)


@contextmanager
def _trainer_output_dir(checkpoint_dir: Path | None, ranks: Ranks = SINGLE) -> Iterator[Path]:
    """HF Trainer's output_dir: `checkpoint_dir/hf`, emptied by rank 0 of what a killed run left
    there (rank 0 holds the checkpoint lock), or a temporary directory without checkpoints (several
    ranks need a checkpoint dir: they share the output dir)."""
    if checkpoint_dir is None:
        if ranks.distributed:
            raise ValueError("training in several processes needs a checkpoint directory (their shared output dir)")
        with tempfile.TemporaryDirectory(prefix="ft-trl-") as tmp:
            yield Path(tmp)
        return
    out = checkpoint_dir / "hf"
    if ranks.is_main:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    ranks.barrier()
    yield out


def _restore_progress(ckpt: Path, result: TrainedRun, curves: tuple[Curve, ...], ranks: Ranks = SINGLE) -> int:
    """The curves logged before `ckpt` into `result`; its step. A checkpoint resumes with the world
    size that wrote it (each rank's RNG state and its slice of each batch)."""
    progress = json.loads((ckpt / PROGRESS).read_text())
    written_by = progress.get("world_size", 1)
    if written_by != ranks.world_size:
        raise ValueError(f"the checkpoint at {ckpt} was written by {written_by} process(es) and this run has "
                         f"{ranks.world_size}: resume with compute set as before, or delete {ckpt.parent} to start over")
    result.losses = [tuple(x) for x in progress["losses"]]
    for c in curves:
        setattr(result, c.field, [tuple(x) for x in progress.get(c.field, [])])
    result.wall_s = progress["wall_s"]
    return progress["step"]
