"""The training loop: plain PyTorch, readable top to bottom, one loop for every trainer.

    batches -> forward -> objective's loss sum / labels of the whole step
            -> backward -> clip -> optimizer step -> scheduler -> log / checkpoint

Contract. `train(model, method, spec, examples, training, seed=..., objective=...)` trains `model` in
place (`training`: the recipe's `config.training.TrainingSpec`, read as is) and
returns a `TrainResult`. What varies between trainers is asked of objects or passed in:
- the objective (what is minimised), bound to the model once: `objective.bind(model)` gives the
  function of a micro-batch that returns the loss summed over its labelled positions, how many
  there were, and named extra sums to log (e.g. distillation's `kl` and `ce`); the loop divides
  every sum by the label count of the whole optimizer step, so gradient accumulation equals one
  big batch, and logs each extra term per step in `TrainResult.terms`. `objective.packs` says
  whether its micro-batches may be packed. Default: `CrossEntropy` (SFT, `training.prepared.TokenLoss`);
  `trainers.distill.Distillation` is another.
- the model's facts (packed or padded micro-batches, attention routing, lean LM head, compiled
  layers): decided once before the first step by `training.prepared.prepare`, which the loop then asks
  for each micro-batch (`prepared.batch(rows)`) and its loss (`prepared.loss_sum(batch)`).
- the method (which weights train, optimizer groups, how to save and restore): `methods`.
- the hardware (device, autocast dtype): passed in.
Optimizer (`training.optimizer`), weight decay, LR schedule, clipping, autocast, the NaN stop
(`TrainingDiverged`) and checkpoints are the same for every objective. Batches come from
`batches()`, a pure function of (examples, seed, step), and a checkpoint holds weights,
optimizer, scheduler, RNG and the logged curves, so a run resumed from `checkpoint_dir` after a
kill computes exactly what an uninterrupted run would have (`training.checkpoint` writes and reads
every checkpoint and the best weights). While it trains into `checkpoint_dir`
no other process may (a lock), and a SIGTERM/SIGINT ends the current step, checkpoints it and
raises `Preempted` ("preempted at step N"): see `training.preemption`.

Several processes (`ranks`, a `training.distributed.Ranks` from torchrun or Ray Train): the same loop
on every rank, each reading its slice of every global batch (batch_size x grad_accum x
world_size rows), the step's label count and gradients summed over ranks, rank 0 writing
checkpoints; it equals one process training the global batch (see `training.distributed`).

Speed switches (`TrainingSpec`, all exact up to float rounding; see `training.packing`, `training.loss`,
`training.prepared`):
`packing` lays each micro-batch's rows end to end (no padding, attention kept inside each row,
position ids restarting), `group_by_length` orders the unpacked path's rows by length within
mega-batches, `loss` ("auto"/"chunked") applies the LM head to the labelled positions only, in
chunks (never the full-vocabulary logits at once), `compile` torch.compiles the decoder layers.
Methods that cannot use a switch (prompt/prefix tuning: no packing, no lean loss) and objectives
that do not pack fall back to the plain path on their own.
"""

from __future__ import annotations

import hashlib
import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from . import checkpoint, packing as P
from ..config.training import TrainingSpec
from ..data.rows import IGNORE_INDEX, Example
from .distributed import SINGLE, Ranks, is_sharded
from ..data.sft_dataset import row_ids, row_lengths, take as take_rows
from .preemption import Preempted, checkpoint_lock, stop_requests
from .objective import Objective
from .prepared import CrossEntropy, prepare
from .result import TrainResult
from .steps import steps_for, validation_rows


class TrainingDiverged(RuntimeError):
    """Loss became NaN/Inf."""


# --------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------


GROUP_STEPS = 8  # length grouping sorts within mega-batches of this many optimizer steps


def batches(examples: Sequence[Example], training: TrainingSpec, seed: int, start_step: int = 0, rank: int = 0,
            world_size: int = 1) -> Iterator[list[list[Example]]]:
    """Yield, per optimizer step, `grad_accum` micro-batches. Epoch e uses shuffle seed+e. Only
    the rows of a step are read (`examples` may be a memory-mapped `data.sft_dataset.SftRows`).
    With `world_size` > 1 a step's global batch is world_size times as many rows, in the same
    seeded order whatever the world size, and rank r reads the r-th contiguous slice of it.

    With `group_by_length`, each epoch's shuffled order is sorted by length within mega-batches of
    GROUP_STEPS steps (aligned to step boundaries), and each step's rows longest-first, so every
    micro-batch holds rows of similar length; the mega-batches' steps are then shuffled (seed+e)."""
    local = training.batch_size * training.grad_accum
    per_step = local * world_size
    group = training.group_by_length
    order: list[int] = []
    epoch = -1
    position = 0
    for step in range(steps_for(len(examples), training, world_size)):
        chunk = []
        while len(chunk) < per_step:
            if position >= len(order):
                epoch += 1
                order = list(range(len(examples)))
                random.Random(seed + epoch).shuffle(order)
                if group:
                    order = _length_grouped(order, examples, per_step, head=per_step - len(chunk), seed=seed + epoch)
                position = 0
            take = order[position: position + per_step - len(chunk)]
            chunk += take
            position += len(take)
        if step >= start_step:
            if group:  # longest first over the whole global batch, then this rank's slice
                rows = [examples[i] for i in chunk]
                rows = [r for _, r in sorted(zip(chunk, rows), key=lambda p: (-len(p[1].input_ids), p[0]))]
                rows = rows[rank * local: (rank + 1) * local]
            else:
                rows = [examples[i] for i in chunk[rank * local: (rank + 1) * local]]
            yield [rows[i: i + training.batch_size] for i in range(0, local, training.batch_size)]


def _length_grouped(order: list[int], examples: Sequence[Example], per_step: int, head: int, seed: int) -> list[int]:
    """The first `head` indices complete the step in progress; the rest is length-sorted within
    mega-batches of GROUP_STEPS steps, cut into steps, and the steps of each mega-batch shuffled."""
    head = head % per_step
    lengths = row_lengths(examples)
    rest = P.length_grouped(order[head:], lengths, per_step * GROUP_STEPS)
    steps = [rest[i: i + per_step] for i in range(0, len(rest), per_step)]
    rng = random.Random(seed)
    out = order[:head]
    for m in range(0, len(steps), GROUP_STEPS):
        block = steps[m: m + GROUP_STEPS]
        full = [s for s in block if len(s) == per_step]
        rng.shuffle(full)
        out += [i for s in full + [s for s in block if len(s) < per_step] for i in s]
    return out


def batch_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens of a padded or packed micro-batch."""
    return int(batch["n_tokens"]) if batch.get("packed") else int(batch["attention_mask"].sum())


# --------------------------------------------------------------------------------------
# optimizer and schedule
# --------------------------------------------------------------------------------------


def make_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    import bitsandbytes as bnb

    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(groups, lr=lr)
    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_lambda(training: TrainingSpec, total: int) -> Callable[[int], float]:
    warmup = int(training.warmup_ratio * total)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if training.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if training.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Scale gradients to a total norm of at most `max_norm`; FSDP2's sharded gradients too (the
    norm of the whole, from every shard)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):  # a DTensor: the shards' partial norms, combined
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class _Run:
    """One run's moving parts, set up once by `train`; each method is one thing a step does."""

    model: torch.nn.Module
    method: Any
    spec: Any
    training: TrainingSpec
    ranks: Ranks
    device: str
    autocast_dtype: torch.dtype | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    result: TrainResult
    prepared: Any  # training.prepared.PreparedModel

    def __post_init__(self) -> None:
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.sharded = is_sharded(self.model)  # FSDP2: gradients arrive reduced, whole weights only through collectives
        self.loss_scale = self.ranks.world_size if self.sharded else 1  # FSDP2 averages gradients over ranks; we sum them

    def autocast(self):
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    def step(self, step: int, micro_batches: list[list[Example]]) -> tuple[float, dict[str, float]]:
        """Optimizer step `step` (1-based) over its micro-batches; its mean loss and terms per label."""
        n_labels = sum(sum(1 for x in r.labels[1:] if x != IGNORE_INDEX) for mb in micro_batches for r in mb)
        n_labels = int(self.ranks.sum([n_labels])[0])  # the global batch's labels: every rank divides by them
        step_loss, step_tokens, step_terms = 0.0, 0, {}
        for rows in micro_batches:
            batch = self.prepared.batch(rows)
            with self.autocast():
                loss_sum, _, terms = self.prepared.loss_sum(batch)
            # normalise by the step's label count so grad accumulation equals one big batch
            (loss_sum * self.loss_scale / n_labels).backward()
            step_loss += loss_sum.item()
            for name, term_sum in terms.items():
                step_terms[name] = step_terms.get(name, 0.0) + float(term_sum)
            step_tokens += batch_tokens(batch)
        # sums over ranks (no-op alone): the step's loss, tokens and terms
        step_loss, step_tokens, *term_sums = self.ranks.sum([step_loss, step_tokens, *step_terms.values()])
        self.result.tokens_seen += int(step_tokens)
        if not self.sharded:
            self.ranks.sync_gradients(self.trainable)
        mean_loss = step_loss / n_labels
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"loss is {mean_loss} at step {step}; lower the learning rate (now "
                                   f"{self.training.lr}), check the data for empty answers, or use float32")
        if self.training.max_grad_norm:
            clip_gradients(self.trainable, self.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        hook = getattr(self.method, "after_step", None)  # methods that touch weights after each step
        if hook is not None:
            hook(self.model, self.spec)
        mean_terms = {name: term_sum / n_labels for name, term_sum in zip(step_terms, term_sums)}
        self.result.record_step(step, mean_loss, mean_terms, n_labels)
        return mean_loss, mean_terms

    def validate(self, step: int, held_out: list[Example], best_root: Path) -> bool:
        """Measure the held-out loss, keep the best weights; True when early stopping ends the run."""
        r, training = self.result, self.training
        loss = round(validation_loss(self.model, self.prepared, held_out, training.batch_size, self.device,
                                     self.autocast_dtype), 6)
        if r.kept_step is None or loss < min(v for _, v in r.validation_losses):
            r.kept_step = step  # identical on every rank; the root is shared (checkpoint_dir)
            checkpoint.save_weights(checkpoint.best_weights(best_root, step), self.model, self.method, self.ranks)
        r.validation_losses.append((step, loss))
        since_best = sum(1 for s, _ in r.validation_losses if s > r.kept_step)
        return bool(training.early_stopping_patience and since_best >= training.early_stopping_patience)

    def stop_signal(self, stop) -> str | None:
        """The signal that asks this run to stop, if any: a signal to any rank stops every rank."""
        stopping = stop.signal_name
        if self.ranks.distributed and self.ranks.sum([1.0 if stopping else 0.0])[0] and not stopping:
            stopping = "a signal to another rank"
        return stopping

    def checkpoint(self, root: Path, step: int, best_root: Path) -> Path:
        saved = checkpoint.save_checkpoint(root, step, self.model, self.method, self.optimizer, self.scheduler,
                                           self.result, self.ranks)
        if self.ranks.is_main:
            checkpoint.drop_best_weights_but(best_root, self.result.kept_step)  # the checkpoint names the kept step
        return saved


def train(model: torch.nn.Module, method, spec: Any, examples: Sequence[Example], training: TrainingSpec, *,
          seed: int, pad_id: int, device: str = "cpu", autocast_dtype: torch.dtype | None = None,
          checkpoint_dir: Path | None = None, objective: Objective | None = None,
          on_log: Callable[..., None] | None = None, on_checkpoint: Callable[[Path], None] | None = None,
          ranks: Ranks = SINGLE) -> TrainResult:
    """Train `model` (already wrapped by `method`) in place toward `objective` (default: SFT
    cross-entropy) and return what happened. `on_log(step, loss, **terms)` every `log_every` steps;
    with `checkpoint_dir`, checkpoints every `checkpoint_every` steps (and on SIGTERM/SIGINT, then
    raises `Preempted`) and resumes from the newest; `CheckpointBusy` if another process trains there.
    `on_checkpoint(path)` after each checkpoint is complete (the store mirrors it to object storage).
    `ranks`: this process's place among data-parallel processes; the callbacks run on every rank."""
    if ranks.distributed and checkpoint_dir is None:
        raise ValueError("several processes share checkpoints and best weights through checkpoint_dir; pass one")
    seed_everything(seed)
    reset_peak_memory(device)
    examples, held_out = split_validation(examples, training, seed)
    total = steps_for(len(examples), training, ranks.world_size)
    groups = method.param_groups(model, spec, training.lr, training.weight_decay)
    optimizer = make_optimizer(training.optimizer, groups, training.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(training, total))
    result = TrainResult(validation_rows=len(held_out))
    # one writer per checkpoint dir; the first SIGTERM/SIGINT becomes a checkpoint (training.preemption)
    with checkpoint_lock(checkpoint_dir if ranks.is_main else None), stop_requests() as stop, \
            checkpoint.best_weights_root(checkpoint_dir) as best_root:
        start = checkpoint.resume(checkpoint_dir, model, method, optimizer, scheduler, result, ranks)
        model.train()
        # once, not per step: packed or padded micro-batches and how attention stays inside each packed
        # row, the loss path (lean head or not), compiled layers (undone in the finally)
        prepared = prepare(model, training, objective or CrossEntropy(training.loss), device=device, pad_id=pad_id)
        run = _Run(model, method, spec, training, ranks, device, autocast_dtype, optimizer, scheduler, result, prepared)
        t0 = time.perf_counter() - result.wall_s
        try:
            for step, micro_batches in enumerate(batches(examples, training, seed, start, ranks.rank, ranks.world_size),
                                                 start=start + 1):
                mean_loss, mean_terms = run.step(step, micro_batches)
                result.wall_s = time.perf_counter() - t0
                if on_log and step % training.log_every == 0:
                    on_log(step, mean_loss, **mean_terms)
                if held_out and (step % training.validation_every == 0 or step == total) and \
                        run.validate(step, held_out, best_root):
                    result.stopped_early_at = step
                    break
                if step == total:
                    break
                stopping = run.stop_signal(stop)
                saved = None
                if checkpoint_dir is not None and (step % training.checkpoint_every == 0 or stopping):
                    saved = run.checkpoint(checkpoint_dir, step, best_root)
                    if on_checkpoint is not None:
                        on_checkpoint(saved)
                if stopping:  # SIGTERM/SIGINT arrived during this step: checkpointed above, now stop
                    raise Preempted(step, stopping, saved)
        finally:
            prepared.release()
        if result.kept_step is not None and result.kept_step != result.steps:
            ranks.barrier()  # rank 0 saved them; end with the best measured
            checkpoint.load_weights(checkpoint.best_weights(best_root, result.kept_step), model, method)
        result.wall_s = time.perf_counter() - t0
    result.peak_memory_bytes = peak_memory_bytes(device)
    return result


# --------------------------------------------------------------------------------------
# validation: held-out training rows, the best weights so far
# --------------------------------------------------------------------------------------


def split_validation(examples: Sequence[Example], training: TrainingSpec, seed: int
                     ) -> tuple[Sequence[Example], list[Example]]:
    """(rows to train on, rows held out for validation loss). The held-out rows are the
    `validation_rows(n)` with the smallest seeded hash of their id: a pure function of the rows
    and seed, and a row keeps its side when other rows are added. Never the eval split: that
    was cut off before (sft_dataset), so no decision taken here touches what the report scores."""
    n_held = validation_rows(len(examples), training)
    if not n_held:
        return examples, []
    if len(examples) - n_held < 1:
        raise ValueError(f"validation_fraction {training.validation_fraction} of {len(examples)} training rows leaves "
                         "none to train on; lower it or add rows")
    ids = row_ids(examples)
    rank = sorted(range(len(examples)), key=lambda i: (hashlib.sha256(f"{seed}:{ids[i]}".encode()).hexdigest(), i))
    held = set(rank[:n_held])
    return (take_rows(examples, [i for i in range(len(examples)) if i not in held]),
            list(take_rows(examples, sorted(held))))


def validation_loss(model, prepared, rows: list[Example], batch_size: int, device: str, autocast_dtype) -> float:
    """The objective's mean loss per label token over `rows`, in eval mode (no dropout), no grad."""
    model.eval()
    total, labels = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                batch = prepared.batch(rows[i: i + batch_size])
                with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss_sum, n, _ = prepared.loss_sum(batch)
                total += float(loss_sum)
                labels += int(n)
    finally:
        model.train()
    return total / max(labels, 1)


def reset_peak_memory(device: str) -> None:
    """Start a new peak-memory window. On CPU (Linux) this resets the process's resident-set
    high-water mark, so a demo that trains several methods in one process reports each
    method's own peak, not the largest of all of them so far."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM (Linux >= 4.0)
    except OSError:
        pass  # elsewhere the peak is the process's lifetime peak (ru_maxrss)


def peak_memory_bytes(device: str) -> int:
    """CUDA: max allocated since the last reset. CPU: the peak resident set since the last reset
    (it includes whatever the process already held, such as the loaded model)."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(ru * (1 if sys.platform == "darwin" else 1024))  # process lifetime peak RSS
