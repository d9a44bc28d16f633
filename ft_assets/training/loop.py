"""The training loop: plain PyTorch, readable top to bottom, one loop for every trainer.

    batches -> forward -> objective's loss sum / labels of the whole step
            -> backward -> clip -> optimizer step -> scheduler -> log / checkpoint

Contract. `train(model, method, spec, examples, cfg, objective=...)` trains `model` in place and
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
Optimizer (`cfg.optimizer`), weight decay, LR schedule, clipping, autocast, the NaN stop
(`TrainingDiverged`) and checkpoints are the same for every objective. Batches come from
`batches()`, a pure function of (examples, seed, step), and a checkpoint holds weights,
optimizer, scheduler, RNG and the logged curves, so a run resumed from `checkpoint_dir` after a
kill computes exactly what an uninterrupted run would have. While it trains into `checkpoint_dir`
no other process may (a lock), and a SIGTERM/SIGINT ends the current step, checkpoints it and
raises `Preempted` ("preempted at step N"): see `training.preemption`.

Several processes (`ranks`, a `training.distributed.Ranks` from torchrun or Ray Train): the same loop
on every rank, each reading its slice of every global batch (batch_size x grad_accum x
world_size rows), the step's label count and gradients summed over ranks, rank 0 writing
checkpoints; it equals one process training the global batch (see `training.distributed`).

Speed switches (`TrainConfig`, all exact up to float rounding; see `training.packing`, `training.loss`,
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
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from . import packing as P
from ..data.rows import IGNORE_INDEX, Example
from .distributed import SINGLE, Ranks, is_sharded
from ..data.sft_dataset import row_ids, row_lengths, take as take_rows
from .preemption import Preempted, checkpoint_lock, stop_requests
from .packing import collate  # noqa: F401  (the padded micro-batch; `train.collate` stays its public name)
from .objective import Objective
from .prepared import CrossEntropy, prepare
from .settings import TrainConfig
from .prepared import lean_head, token_loss_sum  # noqa: F401  (`train.token_loss_sum`, `train.lean_head` stay public)
from .steps import steps_for, validation_rows  # noqa: F401  (the step rule; `train.steps_for` stays public)


class TrainingDiverged(RuntimeError):
    """Loss became NaN/Inf."""


@dataclass
class TrainResult:
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss of that step)
    steps: int = 0
    tokens_seen: int = 0  # non-padding input tokens
    tokens_trained: int = 0  # tokens that carry a label (answers + end-of-turn)
    wall_s: float = 0.0
    peak_memory_bytes: int = 0
    resumed_from_step: int = 0
    # the objective's extra terms, per step: name -> [(step, term sum / labels of that step)]
    terms: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    validation_rows: int = 0
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss on held-out rows)
    kept_step: int | None = None  # the step whose weights the run ends with (best validation loss)
    stopped_early_at: int | None = None  # the step early stopping ended the run at

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / self.wall_s if self.wall_s else 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainResult":
        """Back from `dataclasses.asdict` through JSON (another process's result: `ft_assets.jobs.train`)."""
        pairs = lambda curve: [tuple(x) for x in curve]  # noqa: E731
        return cls(**{**d, "losses": pairs(d["losses"]), "validation_losses": pairs(d["validation_losses"]),
                      "terms": {k: pairs(v) for k, v in d["terms"].items()}})

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "tokens_seen": self.tokens_seen,
            "tokens_trained": self.tokens_trained,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "wall_s": round(self.wall_s, 2),
            "peak_memory_bytes": self.peak_memory_bytes,
            "first_loss": self.losses[0][1] if self.losses else None,
            "final_loss": self.losses[-1][1] if self.losses else None,
            "resumed_from_step": self.resumed_from_step,
            **({"validation_rows": self.validation_rows, "kept_step": self.kept_step,
                "stopped_early_at": self.stopped_early_at,
                "best_validation_loss": min(v for _, v in self.validation_losses)} if self.validation_losses else {}),
        }

    def log(self) -> dict[str, Any]:
        """What the run computed (losses, steps, tokens), for the artifact's train_log.json. How
        it ran (timings, memory, a resume) differs between identical runs: that is `summary()`,
        kept in the manifest, so it does not change the artifact's content hash."""
        keep = ("steps", "tokens_seen", "tokens_trained", "first_loss", "final_loss", "validation_rows", "kept_step",
                "stopped_early_at", "best_validation_loss")
        curves = {"validation_losses": self.validation_losses} if self.validation_losses else {}
        return {"losses": self.losses, **self.terms, **curves,
                **{k: v for k, v in self.summary().items() if k in keep}}


# --------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------


GROUP_STEPS = 8  # length grouping sorts within mega-batches of this many optimizer steps


def batches(examples: Sequence[Example], cfg: TrainConfig, start_step: int = 0, rank: int = 0
            ) -> Iterator[list[list[Example]]]:
    """Yield, per optimizer step, `grad_accum` micro-batches. Epoch e uses shuffle seed+e. Only
    the rows of a step are read (`examples` may be a memory-mapped `data.sft_dataset.SftRows`).
    With `cfg.world_size` > 1 a step's global batch is world_size times as many rows, in the same
    seeded order whatever the world size, and rank r reads the r-th contiguous slice of it.

    With `group_by_length`, each epoch's shuffled order is sorted by length within mega-batches of
    GROUP_STEPS steps (aligned to step boundaries), and each step's rows longest-first, so every
    micro-batch holds rows of similar length; the mega-batches' steps are then shuffled (seed+e)."""
    world = getattr(cfg, "world_size", 1)
    local = cfg.batch_size * cfg.grad_accum
    per_step = local * world
    group = getattr(cfg, "group_by_length", False)
    order: list[int] = []
    epoch = -1
    position = 0
    for step in range(steps_for(len(examples), cfg)):
        chunk = []
        while len(chunk) < per_step:
            if position >= len(order):
                epoch += 1
                order = list(range(len(examples)))
                random.Random(cfg.seed + epoch).shuffle(order)
                if group:
                    order = _length_grouped(order, examples, per_step, head=per_step - len(chunk), seed=cfg.seed + epoch)
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
            yield [rows[i: i + cfg.batch_size] for i in range(0, local, cfg.batch_size)]


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


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_ratio * total)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# --------------------------------------------------------------------------------------
# checkpoints (our own files; optimizer state is loaded with weights_only=True)
# --------------------------------------------------------------------------------------


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
        ranks.save_sharded(model, tmp / "adapter", whole_model=method.type == "full")
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
    (tmp / "progress.json").write_text(json.dumps({
        "step": step, "losses": result.losses, "terms": result.terms, "tokens_seen": result.tokens_seen,
        "tokens_trained": result.tokens_trained, "wall_s": result.wall_s,
        "validation_losses": result.validation_losses, "kept_step": result.kept_step,
        **({"world_size": ranks.world_size} if ranks.distributed else {}),
    }))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(ckpt_root.glob("step-*"))[:-1]:  # keep the newest only
        shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()
    return final


def latest_checkpoint(ckpt_root: Path | None) -> Path | None:
    if ckpt_root is None or not ckpt_root.is_dir():
        return None
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "progress.json").is_file())
    return done[-1] if done else None


def _load_weights(ckpt: Path, model, method) -> None:
    """The trained weights saved under `ckpt/adapter` (a checkpoint, or the best-so-far weights)."""
    adapter = ckpt / "adapter"
    if is_sharded(model):  # FSDP2: whole tensors by name into the shards
        Ranks.load_sharded(model, adapter)
        return
    # A method whose saved names are not live parameter names (or that keeps more state than
    # parameters, e.g. Delta-LoRA's updated base weights) restores itself; the rest match names.
    restore = getattr(method, "restore", None)
    if restore is not None:
        restore(model, adapter)
    else:
        _restore_by_name(ckpt, model)


def _save_weights(root: Path, model, method, ranks: Ranks = SINGLE) -> Path:
    """Replace `root/adapter` with the model's trained weights, atomically (tmp dir, rename), by
    rank 0 (a sharded model: every rank calls, to gather the weights)."""
    tmp = root / f".tmp-{uuid.uuid4().hex[:8]}"
    if ranks.is_main:
        root.mkdir(parents=True, exist_ok=True)
    if is_sharded(model):
        ranks.save_sharded(model, tmp, whole_model=method.type == "full")
    elif ranks.is_main:
        method.save(model, tmp)
    if not ranks.is_main:
        return root
    if (root / "adapter").exists():
        shutil.rmtree(root / "adapter")
    os.rename(tmp, root / "adapter")
    return root


def _restore(ckpt: Path, model, optimizer, scheduler, result: TrainResult, method=None, ranks: Ranks = SINGLE) -> int:
    progress = json.loads((ckpt / "progress.json").read_text())
    if progress.get("world_size", 1) != ranks.world_size:
        raise ValueError(f"checkpoint {ckpt} was written by {progress.get('world_size', 1)} processes and this run "
                         f"has {ranks.world_size}: a global batch is rows per process x processes, so it cannot "
                         "resume exactly; run with the same number of processes, or delete the checkpoint to start over")
    _load_weights(ckpt, model, method)
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
    result.losses = [tuple(x) for x in progress["losses"]]
    result.terms = {name: [tuple(x) for x in curve] for name, curve in progress.get("terms", {}).items()}
    result.tokens_seen = progress["tokens_seen"]
    result.tokens_trained = progress["tokens_trained"]
    result.wall_s = progress["wall_s"]
    result.validation_losses = [tuple(x) for x in progress.get("validation_losses", [])]
    result.kept_step = progress.get("kept_step")
    return progress["step"]


def _restore_by_name(ckpt: Path, model) -> None:
    from safetensors.torch import load_file

    adapter = ckpt / "adapter"
    weights = next(adapter.glob("*.safetensors"))
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
        raise RuntimeError(f"checkpoint {ckpt} matched no trainable parameter; delete it to start over")


def _match_param(saved_name: str, params: dict[str, torch.nn.Parameter]):
    # peft saves "base_model.model.x.lora_A.weight"; live names carry the adapter name ("lora_A.default.weight")
    if saved_name in params:
        return params[saved_name]
    for live, p in params.items():
        if p.requires_grad and live.replace(".default", "") == saved_name:
            return p
    return None


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


def train(
    model: torch.nn.Module,
    method,
    spec: Any,
    examples: Sequence[Example],
    cfg: TrainConfig,
    *,
    pad_id: int,
    device: str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    checkpoint_dir: Path | None = None,
    on_log: Callable[..., None] | None = None,
    objective: Objective | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    ranks: Ranks = SINGLE,
) -> TrainResult:
    """Train `model` (already wrapped by `method`) in place toward `objective` (default: SFT
    cross-entropy) and return what happened. `on_log(step, loss, **terms)` every `log_every` steps;
    with `checkpoint_dir`, checkpoints every `checkpoint_every` steps (and on SIGTERM/SIGINT, then
    raises `Preempted`) and resumes from the newest; `CheckpointBusy` if another process trains there.
    `on_checkpoint(path)` after each checkpoint is complete (the store mirrors it to object storage).
    `ranks`: this process's place among data-parallel processes (`cfg.world_size` must match);
    the callbacks run on every rank, the caller passes them where it wants them (rank 0)."""
    if cfg.world_size != ranks.world_size:
        raise ValueError(f"TrainConfig.world_size {cfg.world_size} but {ranks.world_size} processes run")
    if ranks.distributed and checkpoint_dir is None:
        raise ValueError("several processes share checkpoints and best weights through checkpoint_dir; pass one")
    objective = objective if objective is not None else CrossEntropy(cfg.loss)
    seed_everything(cfg.seed)
    reset_peak_memory(device)
    examples, held_out = split_validation(examples, cfg)
    total = steps_for(len(examples), cfg)
    optimizer = make_optimizer(cfg.optimizer, method.param_groups(model, spec, cfg.lr, cfg.weight_decay), cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    result = TrainResult(validation_rows=len(held_out))
    # one writer per checkpoint dir; the first SIGTERM/SIGINT becomes a checkpoint (training.preemption)
    trainable = [p for p in model.parameters() if p.requires_grad]
    sharded = is_sharded(model)  # FSDP2: gradients arrive reduced, whole weights only through collectives
    loss_scale = ranks.world_size if sharded else 1  # FSDP2 averages gradients over ranks; we sum them
    with checkpoint_lock(checkpoint_dir if ranks.is_main else None), stop_requests() as stop, \
            _best_weights_root(checkpoint_dir) as best_root:
        start = 0
        ckpt = latest_checkpoint(checkpoint_dir)
        if ckpt is not None:
            start = _restore(ckpt, model, optimizer, scheduler, result, method, ranks)
            result.resumed_from_step = start

        model.train()
        # once, not per step: packed or padded micro-batches and how attention stays inside each packed
        # row, the loss path (lean head or not), compiled layers (undone in the finally)
        prepared = prepare(model, cfg, objective, device=device, pad_id=pad_id)
        t0 = time.perf_counter() - result.wall_s
        try:
            for step, micro_batches in enumerate(batches(examples, cfg, start, ranks.rank), start=start):
                n_labels = sum(sum(1 for x in r.labels[1:] if x != IGNORE_INDEX) for mb in micro_batches for r in mb)
                n_labels = int(ranks.sum([n_labels])[0])  # the global batch's labels: every rank divides by them
                step_loss = 0.0
                step_tokens = 0
                step_terms: dict[str, float] = {}
                for rows in micro_batches:
                    batch = prepared.batch(rows)
                    with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        loss_sum, _, terms = prepared.loss_sum(batch)
                    # normalise by the step's label count so grad accumulation equals one big batch
                    (loss_sum * loss_scale / n_labels).backward()
                    step_loss += loss_sum.item()
                    for name, term_sum in terms.items():
                        step_terms[name] = step_terms.get(name, 0.0) + float(term_sum)
                    step_tokens += batch_tokens(batch)
                # sums over ranks (no-op alone): the step's loss, tokens and terms
                step_loss, step_tokens, *term_sums = ranks.sum([step_loss, step_tokens, *step_terms.values()])
                step_terms = dict(zip(step_terms, term_sums))
                result.tokens_seen += int(step_tokens)
                if not sharded:
                    ranks.sync_gradients(trainable)
                mean_loss = step_loss / n_labels
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(
                        f"loss is {mean_loss} at step {step + 1}; lower the learning rate (now {cfg.lr}), "
                        "check the data for empty answers, or use float32"
                    )
                if cfg.max_grad_norm:
                    clip_gradients(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                hook = getattr(method, "after_step", None)  # methods that touch weights after each step
                if hook is not None:
                    hook(model, spec)
                mean_terms = {name: term_sum / n_labels for name, term_sum in step_terms.items()}
                result.tokens_trained += n_labels
                result.steps = step + 1
                result.losses.append((step + 1, round(mean_loss, 6)))
                for name, value in mean_terms.items():
                    result.terms.setdefault(name, []).append((step + 1, round(value, 6)))
                result.wall_s = time.perf_counter() - t0
                if on_log and (step + 1) % cfg.log_every == 0:
                    on_log(step + 1, mean_loss, **mean_terms)
                if held_out and ((step + 1) % cfg.validation_every == 0 or step + 1 == total):
                    loss = round(validation_loss(model, prepared, held_out, cfg.batch_size, device, autocast_dtype), 6)
                    if result.kept_step is None or loss < min(v for _, v in result.validation_losses):
                        result.kept_step = step + 1
                        # identical on every rank; the root is shared (checkpoint_dir)
                        _save_weights(best_root / f"step-{step + 1:06d}", model, method, ranks)
                    result.validation_losses.append((step + 1, loss))
                    since_best = sum(1 for s, _ in result.validation_losses if s > result.kept_step)
                    if cfg.early_stopping_patience and since_best >= cfg.early_stopping_patience:
                        result.stopped_early_at = step + 1
                        break
                if step + 1 == total:
                    break
                stopping = stop.signal_name  # a signal to any rank stops every rank after this step
                if ranks.distributed and ranks.sum([1.0 if stopping else 0.0])[0] and not stopping:
                    stopping = "a signal to another rank"
                if checkpoint_dir is not None and ((step + 1) % cfg.checkpoint_every == 0 or stopping):
                    saved = save_checkpoint(checkpoint_dir, step + 1, model, method, optimizer, scheduler, result, ranks)
                    if ranks.is_main:
                        _drop_best_weights_but(best_root, result.kept_step)  # the checkpoint names the kept step
                    if on_checkpoint is not None:
                        on_checkpoint(saved)
                if stopping:  # SIGTERM/SIGINT arrived during this step: checkpointed above, now stop
                    raise Preempted(step + 1, stopping, saved if checkpoint_dir is not None else None)
        finally:
            prepared.release()
        if result.kept_step is not None and result.kept_step != result.steps:
            ranks.barrier()  # rank 0 saved them
            _load_weights(best_root / f"step-{result.kept_step:06d}", model, method)  # end with the best measured
        result.wall_s = time.perf_counter() - t0
    result.peak_memory_bytes = peak_memory_bytes(device)
    return result


# --------------------------------------------------------------------------------------
# validation: held-out training rows, the best weights so far
# --------------------------------------------------------------------------------------


def split_validation(examples: Sequence[Example], cfg: TrainConfig) -> tuple[Sequence[Example], list[Example]]:
    """(rows to train on, rows held out for validation loss). The held-out rows are the
    `validation_rows(n)` with the smallest seeded hash of their id: a pure function of the rows
    and seed, and a row keeps its side when other rows are added. Never the eval split: that
    was cut off before (sft_dataset), so no decision taken here touches what the report scores."""
    n_held = validation_rows(len(examples), cfg)
    if not n_held:
        return examples, []
    if len(examples) - n_held < 1:
        raise ValueError(f"validation_fraction {cfg.validation_fraction} of {len(examples)} training rows leaves "
                         "none to train on; lower it or add rows")
    ids = row_ids(examples)
    rank = sorted(range(len(examples)), key=lambda i: (hashlib.sha256(f"{cfg.seed}:{ids[i]}".encode()).hexdigest(), i))
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


@contextmanager
def _best_weights_root(checkpoint_dir: Path | None) -> Iterator[Path]:
    """Where the best weights so far live: beside the checkpoints (a resumed run needs them),
    else a temporary directory."""
    if checkpoint_dir is not None:
        yield checkpoint_dir / "best"
        return
    with tempfile.TemporaryDirectory(prefix="ft-best-") as tmp:
        yield Path(tmp)


def _drop_best_weights_but(root: Path, kept_step: int | None) -> None:
    for old in root.glob("step-*"):
        if old.name != f"step-{kept_step or 0:06d}":
            shutil.rmtree(old, ignore_errors=True)


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
