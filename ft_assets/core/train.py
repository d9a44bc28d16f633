"""The training loop: plain PyTorch, readable top to bottom.

    batches -> forward -> masked cross-entropy (mean over answer tokens of the whole step)
            -> backward -> clip -> optimizer step -> scheduler -> log / checkpoint

What varies by method (which weights train, optimizer groups, how to save) is asked of the
method object (`core.methods`); what varies by hardware (device, dtype) is passed in. Batches
come from `batches()`, a pure function of (examples, seed, step), so a resumed run sees
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, Example


class TrainingDiverged(RuntimeError):
    """Loss became NaN/Inf."""


@dataclass
class TrainConfig:
    max_steps: int
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"
    checkpoint_every: int = 20
    log_every: int = 1
    gradient_checkpointing: bool = False
    seed: int = 42

    @classmethod
    def from_spec(cls, spec: Any, seed: int) -> "TrainConfig":
        fields = {k: v for k, v in spec.model_dump().items() if k in cls.__dataclass_fields__}
        return cls(**fields, seed=seed)


@dataclass
class TrainResult:
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss of that step)
    steps: int = 0
    tokens_seen: int = 0  # non-padding input tokens
    tokens_trained: int = 0  # tokens that carry a label (answers + end-of-turn)
    wall_s: float = 0.0
    peak_memory_bytes: int = 0
    resumed_from_step: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / self.wall_s if self.wall_s else 0.0

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
        }


# --------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------


def steps_for(n_examples: int, cfg: TrainConfig) -> int:
    per_step = cfg.batch_size * cfg.grad_accum
    return max(1, min(cfg.max_steps, math.ceil(cfg.epochs * n_examples / per_step)))


def batches(examples: list[Example], cfg: TrainConfig, start_step: int = 0) -> Iterator[list[list[Example]]]:
    """Yield, per optimizer step, `grad_accum` micro-batches. Epoch e uses shuffle seed+e."""
    per_step = cfg.batch_size * cfg.grad_accum
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
                position = 0
            take = order[position: position + per_step - len(chunk)]
            chunk += take
            position += len(take)
        if step >= start_step:
            rows = [examples[i] for i in chunk]
            yield [rows[i: i + cfg.batch_size] for i in range(0, per_step, cfg.batch_size)]


def collate(rows: list[Example], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and how many there were.

    Only positions that predict a labelled token go through the LM head (`logits_to_keep`):
    answers are a small part of each row, so this skips most of the vocabulary-sized logits
    (about a fifth of the compute of a 135M model, and most of its activation memory).
    """
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # positions p predicting p+1
    # Prompt tuning puts virtual tokens in front of the input: real position p is p + offset.
    offset = virtual_token_count(model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep + offset).logits
    kept_targets = targets[:, keep]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), kept_targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return loss, int((kept_targets != IGNORE_INDEX).sum())


def virtual_token_count(model) -> int:
    """Positions a peft prompt-learning model prepends to the sequence (prompt tuning, p-tuning).
    Prefix tuning puts its virtual tokens in the key/value cache instead: no extra positions."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning or config.peft_type in ("PREFIX_TUNING", "CARTRIDGE"):
        return 0
    return config.num_virtual_tokens


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


def save_checkpoint(ckpt_root: Path, step: int, model, method, optimizer, scheduler, result: TrainResult) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    method.save(model, tmp / "adapter")
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }, tmp / "state.pt")
    (tmp / "progress.json").write_text(json.dumps({
        "step": step, "losses": result.losses, "tokens_seen": result.tokens_seen,
        "tokens_trained": result.tokens_trained, "wall_s": result.wall_s,
    }))
    final = ckpt_root / f"step-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(ckpt_root.glob("step-*"))[:-1]:  # keep the newest only
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path | None) -> Path | None:
    if ckpt_root is None or not ckpt_root.is_dir():
        return None
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "progress.json").is_file())
    return done[-1] if done else None


def _restore(ckpt: Path, model, optimizer, scheduler, result: TrainResult, method=None) -> int:
    adapter = ckpt / "adapter"
    # A method whose saved names are not live parameter names (or that keeps more state than
    # parameters, e.g. Delta-LoRA's updated base weights) restores itself; the rest match names.
    restore = getattr(method, "restore", None)
    if restore is not None:
        restore(model, adapter)
    else:
        _restore_by_name(ckpt, model)
    blob = torch.load(ckpt / "state.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if blob["cuda_rng"]:
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    progress = json.loads((ckpt / "progress.json").read_text())
    result.losses = [tuple(x) for x in progress["losses"]]
    result.tokens_seen = progress["tokens_seen"]
    result.tokens_trained = progress["tokens_trained"]
    result.wall_s = progress["wall_s"]
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(
    model: torch.nn.Module,
    method,
    spec: Any,
    examples: list[Example],
    cfg: TrainConfig,
    *,
    pad_id: int,
    device: str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    checkpoint_dir: Path | None = None,
    on_log: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train `model` (already wrapped by `method`) in place and return what happened."""
    seed_everything(cfg.seed)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    total = steps_for(len(examples), cfg)
    optimizer = make_optimizer(cfg.optimizer, method.param_groups(model, spec, cfg.lr, cfg.weight_decay), cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    result = TrainResult()
    start = 0
    ckpt = latest_checkpoint(checkpoint_dir)
    if ckpt is not None:
        start = _restore(ckpt, model, optimizer, scheduler, result, method)
        result.resumed_from_step = start

    model.train()
    t0 = time.perf_counter() - result.wall_s
    for step, micro_batches in enumerate(batches(examples, cfg, start), start=start):
        n_labels = sum(sum(1 for x in r.labels[1:] if x != IGNORE_INDEX) for mb in micro_batches for r in mb)
        step_loss = 0.0
        for rows in micro_batches:
            batch = collate(rows, pad_id, device)
            with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss_sum, _ = token_loss_sum(model, batch)
            # normalise by the step's label count so grad accumulation equals one big batch
            (loss_sum / n_labels).backward()
            step_loss += loss_sum.item()
            result.tokens_seen += int(batch["attention_mask"].sum())
        mean_loss = step_loss / n_labels
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(
                f"loss is {mean_loss} at step {step + 1}; lower the learning rate (now {cfg.lr}), "
                "check the data for empty answers, or use float32"
            )
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        hook = getattr(method, "after_step", None)  # methods that touch weights after each step
        if hook is not None:
            hook(model, spec)
        result.tokens_trained += n_labels
        result.steps = step + 1
        result.losses.append((step + 1, round(mean_loss, 6)))
        result.wall_s = time.perf_counter() - t0
        if on_log and (step + 1) % cfg.log_every == 0:
            on_log(step + 1, mean_loss)
        if checkpoint_dir is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            save_checkpoint(checkpoint_dir, step + 1, model, method, optimizer, scheduler, result)

    result.wall_s = time.perf_counter() - t0
    result.peak_memory_bytes = peak_memory_bytes(device)
    return result


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(ru * (1 if sys.platform == "darwin" else 1024))  # process peak RSS
