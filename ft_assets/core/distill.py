"""Knowledge distillation: a smaller student learns the fine-tuned teacher's answer distribution.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))   (Hinton et al. 2015)
         + (1 - alpha) * cross-entropy(student, reference answer)

Both terms are averaged over the same positions: those that predict an answer token (the SFT
labels, end-of-turn included), so the student imitates the teacher exactly where it is used.
The T^2 factor keeps the KL gradient on the scale of the CE gradient as T changes.

The student is the teacher with a subset of its decoder layers (`keep_layers`), or a model
given by path that shares the teacher's tokenizer. Every student weight trains (it is a new,
smaller model, not an adapter).

Why not TRL: TRL 1.16's `DistillationTrainer` (and the experimental GKD trainer) train on
completions sampled on-policy from the student and minimise a generalized JSD; neither has the
off-policy alpha * KL * T^2 + (1 - alpha) * CE objective on reference answers asked for here, and
on-policy sampling costs a generation per step on CPU. So this is a short loop over
`core.train.collate` batches with the teacher's logits computed under no_grad.
No Dagster here.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, Example
from .steps import steps_for
from .train import TrainConfig, collate


# --------------------------------------------------------------------------------------
# building the student
# --------------------------------------------------------------------------------------


def layer_indices(n_layers: int, keep: str | Sequence[int]) -> list[int]:
    if keep == "every_other":
        idx = list(range(0, n_layers, 2))
        if idx[-1] != n_layers - 1:
            idx.append(n_layers - 1)  # keep the last block: it feeds the final norm and LM head
        return idx
    if keep == "first_half":
        return list(range(max(1, n_layers // 2)))
    idx = sorted(set(int(i) for i in keep))
    bad = [i for i in idx if i >= n_layers]
    if bad:
        raise ValueError(f"keep_layers {bad} out of range: the teacher has {n_layers} layers (0..{n_layers - 1})")
    return idx


def drop_layers(model, keep: list[int]):
    """The model with only decoder layers `keep` (in order), config and caches renumbered."""
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)
    return model


def build_student(teacher_dir: Path, keep: str | Sequence[int], device: str = "cpu", student_path: Path | None = None):
    """(student model, facts). From `student_path` when given, else the teacher minus layers."""
    from .models import load_model

    if student_path is not None:
        student = load_model(student_path, device)
        return student, {"origin": f"local:{student_path}", "layers": student.config.num_hidden_layers}
    student = load_model(teacher_dir, device)
    n = student.config.num_hidden_layers
    keep_idx = layer_indices(n, keep)
    drop_layers(student, keep_idx)
    return student, {"origin": "teacher layers", "kept_layers": keep_idx, "teacher_layers": n,
                     "layers": len(keep_idx)}


# --------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------


def _answer_logits(model, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits.float()


def distill_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum of KL(teacher || student) at T, sum of CE, labelled positions) over labelled positions."""
    mask = targets != IGNORE_INDEX
    s, t = student_logits[mask], teacher_logits[mask]
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  log_target=True, reduction="sum")
    ce = F.cross_entropy(s, targets[mask], reduction="sum")
    return kl, ce, int(mask.sum())


def _positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # positions p that predict p+1
    return keep, targets[:, keep]


@torch.inference_mode()
def kl_to_teacher(student, teacher, examples: list[Example], *, temperature: float, pad_id: int,
                  device: str = "cpu", batch_size: int = 16) -> dict[str, float]:
    """Mean KL(teacher || student) at T (and at T=1) and the student's CE, per answer token."""
    student.eval()
    teacher.eval()
    kl_t = kl_1 = ce = 0.0
    n = 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i: i + batch_size], pad_id, device)
        keep, targets = _positions(batch)
        s, t = _answer_logits(student, batch, keep), _answer_logits(teacher, batch, keep)
        a, c, k = distill_terms(s, t, targets, temperature)
        b, _, _ = distill_terms(s, t, targets, 1.0)
        kl_t, kl_1, ce, n = kl_t + float(a), kl_1 + float(b), ce + float(c), n + k
    n = max(1, n)
    return {"kl_at_T": round(kl_t / n, 5), "kl": round(kl_1 / n, 5), "ce": round(ce / n, 5)}


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------


@dataclass
class DistillResult:
    losses: list[tuple[int, float]] = field(default_factory=list)
    kls: list[tuple[int, float]] = field(default_factory=list)
    ces: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    tokens_seen: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens_seen": self.tokens_seen, "wall_s": round(self.wall_s, 2),
                "tokens_per_s": round(self.tokens_seen / self.wall_s, 1) if self.wall_s else 0.0,
                "first_loss": self.losses[0][1] if self.losses else None,
                "final_loss": self.losses[-1][1] if self.losses else None}


def _schedule(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_ratio * total)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return {"constant": 1.0, "linear": max(0.0, 1.0 - progress)}.get(
            cfg.lr_scheduler, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return f


def distill(student, teacher, examples: list[Example], cfg: TrainConfig, *, alpha: float, temperature: float,
            pad_id: int, device: str = "cpu", on_log: Callable[[int, float, float, float], None] | None = None
            ) -> DistillResult:
    """Train every weight of `student` in place toward `teacher` (frozen) on `examples`."""
    torch.manual_seed(cfg.seed)
    teacher.eval().requires_grad_(False)
    student.train().requires_grad_(True)
    per_step = cfg.batch_size * cfg.grad_accum
    total = steps_for(len(examples), cfg)
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
    order: list[int] = []
    epoch, result = -1, DistillResult()
    t0 = time.perf_counter()
    for step in range(total):
        rows = []
        while len(rows) < per_step:  # seeded epochs, like the SFT loop: epoch e shuffles with seed + e
            if not order:
                epoch += 1
                order = list(range(len(examples)))
                random.Random(cfg.seed + epoch).shuffle(order)
            rows.append(examples[order.pop(0)])
        n_labels = sum(sum(1 for x in r.labels[1:] if x != IGNORE_INDEX) for r in rows)
        kl_sum = ce_sum = 0.0
        for i in range(0, per_step, cfg.batch_size):
            batch = collate(rows[i: i + cfg.batch_size], pad_id, device)
            keep, targets = _positions(batch)
            with torch.no_grad():
                t_logits = _answer_logits(teacher, batch, keep)
            s_logits = _answer_logits(student, batch, keep)
            kl, ce, _ = distill_terms(s_logits, t_logits, targets, temperature)
            loss = (alpha * temperature ** 2 * kl + (1 - alpha) * ce) / n_labels
            loss.backward()
            kl, ce = kl.detach(), ce.detach()
            kl_sum += kl.item()
            ce_sum += ce.item()
            result.tokens_seen += int(batch["attention_mask"].sum())
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        kl_m, ce_m = kl_sum / n_labels, ce_sum / n_labels
        loss_m = alpha * temperature ** 2 * kl_m + (1 - alpha) * ce_m
        if not math.isfinite(loss_m):
            raise RuntimeError(f"distillation loss is {loss_m} at step {step + 1}; lower distillation.training.lr")
        result.losses.append((step + 1, round(loss_m, 6)))
        result.kls.append((step + 1, round(kl_m, 6)))
        result.ces.append((step + 1, round(ce_m, 6)))
        result.steps = step + 1
        if on_log and (step + 1) % cfg.log_every == 0:
            on_log(step + 1, loss_m, kl_m, ce_m)
    result.wall_s = time.perf_counter() - t0
    student.eval()
    return result


# --------------------------------------------------------------------------------------
# size and speed
# --------------------------------------------------------------------------------------


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def generation_speed(model, examples: list[Example], *, new_tokens: int, pad_id: int, eos_id: int,
                     device: str = "cpu") -> dict[str, float]:
    """Greedy decoding of exactly `new_tokens` per prompt, one prompt at a time (latency-style),
    after one warm-up call: generated tokens per second."""
    model.eval()

    def run(ex: Example) -> None:
        ids = torch.tensor([ex.input_ids[: ex.prompt_len]], device=device)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)

    run(examples[0])
    t0 = time.perf_counter()
    for ex in examples:
        run(ex)
    wall = time.perf_counter() - t0
    return {"tokens_per_s": round(len(examples) * new_tokens / wall, 2), "prompts": len(examples),
            "new_tokens": new_tokens, "wall_s": round(wall, 3)}
