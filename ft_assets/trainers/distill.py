"""Knowledge distillation: a smaller student learns the fine-tuned teacher's answer distribution.

Contract. `run(DistillRequest, hw)` (the request: plain values, built once by `defs.distill`)
reads the sft_dataset's splits and calls `distill_student(teacher_dir, tokenizer_dir, train rows,
eval rows, TrainingSpec, seed=, ...)`, which builds the student, checks it shares the teacher's vocabulary (else `NotDistillable`), measures
its KL to the teacher before and after training, trains it, evaluates teacher and student on
the held-out rows and times their greedy generation; it returns a `Distilled` (the trained
student and those numbers), and `Distilled.save(dir, teacher=...)` writes the student as a plain
transformers checkpoint + tokenizer, `distill_report.json`, `train_log.json` (`losses`, `kl`,
`ce` per step) and `predictions.jsonl`, and returns the report. No Dagster here.

Training is `training.loop.train`, the loop SFT uses, with the `Distillation` objective:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))   (Hinton et al. 2015)
         + (1 - alpha) * cross-entropy(student, reference answer)

Both terms are summed over the positions that predict an answer token (the SFT labels,
end-of-turn included), so the student imitates the teacher exactly where it is used, and the
loop divides by the label count of the whole optimizer step (gradient accumulation equals one
big batch). The T^2 factor keeps the KL gradient on the scale of the CE gradient as T changes.
The teacher is frozen (eval mode, no grad). Every student weight trains (it is a new, smaller
model, not an adapter): the `full` method gives the optimizer groups, so `training.optimizer`,
weight decay, schedule, clipping, autocast, the NaN stop and checkpoint/resume are SFT's.
Micro-batches are padded, not packed: packing would have to run the teacher, a second model,
through the packed attention path too (`training.packing` picks one per model), which is not
trivially the same computation, so `Distillation.packs` is False.

The student is the teacher with a subset of its decoder layers (`keep_layers`), or a model
given by path that shares the teacher's tokenizer.

Why not TRL: TRL 1.16's `DistillationTrainer` (and the experimental GKD trainer) train on
completions sampled on-policy from the student and minimise a generalized JSD; neither has the
off-policy alpha * KL * T^2 + (1 - alpha) * CE objective on reference answers asked for here, and
on-policy sampling costs a generation per step on CPU.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..evaluation import heldout as evaluate
from ..data.rows import IGNORE_INDEX, Example, write_jsonl
from ..methods import get_method
from ..models.base_model import ModelSourceError, check_tokenizer_matches, load_model, load_tokenizer
from ..config.training import TrainingSpec
from ..data.sft_dataset import load_split
from ..models.device import Compute
from ..training.loop import train
from ..training.packing import collate
from ..training.result import TrainResult


class NotDistillable(ValueError):
    """This student cannot learn from this teacher (another vocabulary or tokenizer)."""


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
# the objective
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


@dataclass(frozen=True)
class Distillation:
    """The `training.loop` objective: alpha * T^2 * KL(teacher || student at T) + (1 - alpha) * CE,
    summed over answer positions; logs the KL and CE sums as the terms `kl` and `ce`."""

    teacher: torch.nn.Module  # frozen: eval mode, its logits computed under no_grad
    alpha: float
    temperature: float
    packs: bool = False  # padded micro-batches (see the module docstring)

    def bind(self, student) -> Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, int, dict[str, torch.Tensor]]]:
        """`loss_sum` of `student`, the form `training.loop.Objective` asks for."""
        return functools.partial(self.loss_sum, student)

    def loss_sum(self, student, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        keep, targets = _positions(batch)
        with torch.no_grad():
            teacher_logits = _answer_logits(self.teacher, batch, keep)
        kl, ce, n_labels = distill_terms(_answer_logits(student, batch, keep), teacher_logits, targets, self.temperature)
        loss = self.alpha * self.temperature ** 2 * kl + (1 - self.alpha) * ce
        return loss, n_labels, {"kl": kl.detach(), "ce": ce.detach()}


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
# training and the whole job
# --------------------------------------------------------------------------------------


def train_student(student, teacher, examples: list[Example], training: TrainingSpec, *, seed: int, alpha: float,
                  temperature: float,
                  pad_id: int, device: str = "cpu", autocast_dtype: torch.dtype | None = None,
                  checkpoint_dir: Path | None = None, on_log: Callable[..., None] | None = None,
                  on_checkpoint: Callable[[Path], None] | None = None) -> TrainResult:
    """Train every weight of `student` in place toward `teacher` (frozen) with `training.loop.train`;
    `on_log(step, loss, kl=, ce=)`. With `checkpoint_dir`, a rerun resumes from its newest checkpoint."""
    full = get_method("full")  # every weight trains; its param groups put no decay on norms
    student = full.wrap(student, None, gradient_checkpointing=training.gradient_checkpointing)
    objective = Distillation(teacher.eval().requires_grad_(False), alpha, temperature)
    result = train(student, full, None, examples, training, seed=seed, pad_id=pad_id, device=device, autocast_dtype=autocast_dtype,
                   checkpoint_dir=checkpoint_dir, on_log=on_log, objective=objective, on_checkpoint=on_checkpoint)
    student.eval()
    return result


def check_same_vocabulary(tokenizer, student, teacher) -> None:
    try:
        check_tokenizer_matches(tokenizer, student)
    except ModelSourceError as exc:
        raise NotDistillable(str(exc)) from None
    if student.get_input_embeddings().weight.shape[0] != teacher.get_input_embeddings().weight.shape[0]:
        raise NotDistillable("the student's vocabulary differs from the teacher's; distillation needs the same tokenizer")


@dataclass
class Distilled:
    """What `distill_student` made and measured. Per-model facts are keyed "teacher" / "student"."""

    student: Any  # the trained model, eval mode
    tokenizer: Any
    built: dict[str, Any]  # how the student was made (origin, kept layers)
    alpha: float
    temperature: float
    kl_before: dict[str, float]  # kl_to_teacher() of the untrained student
    kl_after: dict[str, float]
    quality: dict[str, dict[str, Any]]  # evaluate.evaluate(): {"metrics", "rows"}
    speed: dict[str, dict[str, float]]  # generation_speed()
    parameters: dict[str, int]
    layers: dict[str, int]
    teacher_bytes: int
    training: TrainResult

    def save(self, out_dir: Path, teacher: dict[str, Any]) -> dict[str, Any]:
        """Write the student and its records into `out_dir`; return the report (`distill_report.json`).
        `teacher`: what to record about where the teacher came from (method, versions)."""
        out_dir = Path(out_dir)
        self.student.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
        report = self.report(teacher, student_bytes=_bytes_under(out_dir))
        _write_json(out_dir / "distill_report.json", report)
        _write_json(out_dir / "train_log.json", self.training.log())
        write_jsonl(out_dir / "predictions.jsonl", self.quality["student"]["rows"])
        return report

    def report(self, teacher: dict[str, Any], student_bytes: int) -> dict[str, Any]:
        sizes = {"teacher": self.teacher_bytes, "student": student_bytes}
        metrics = {who: q["metrics"] for who, q in self.quality.items()}
        return {
            "teacher": teacher,
            "student": self.built,
            "loss": {"alpha": self.alpha, "temperature": self.temperature},
            "kl_to_teacher": {"before": self.kl_before, "after": self.kl_after},
            "quality": metrics,
            "size": {who: {"parameters": self.parameters[who], "bytes": sizes[who], "layers": self.layers[who]}
                     for who in ("teacher", "student")},
            "speed": self.speed,
            "ratios": {
                "parameters": round(self.parameters["student"] / self.parameters["teacher"], 4),
                "bytes": round(sizes["student"] / sizes["teacher"], 4),
                "speedup": round(self.speed["student"]["tokens_per_s"] / self.speed["teacher"]["tokens_per_s"], 3),
                "token_f1_retained": round(metrics["student"]["token_f1"] / max(1e-9, metrics["teacher"]["token_f1"]), 4),
            },
            "train": self.training.summary(),
        }


@dataclass
class DistillRequest:
    """One distillation run as plain values: what `run` needs, built once by `defs.distill`."""

    teacher_dir: str  # the merged teacher (a plain transformers model)
    tokenizer_dir: str  # the base model's tokenizer, which teacher and student share
    sft_dataset_dir: str  # trains on its train split, measures on its eval split
    training: dict[str, Any]  # `recipe.training_for_distillation()`, a TrainingSpec as JSON
    seed: int
    keep_layers: str | list[int]
    alpha: float
    temperature: float
    checkpoint_dir: str
    max_eval_examples: int | None = None  # evaluation.max_examples: the eval split's first rows only
    max_new_tokens: int = 64
    eval_batch_size: int = 16
    speed_prompts: int = 8
    student_path: str | None = None  # a model given by path instead of the teacher's layers


def run(request: DistillRequest, hw: Compute, *, log: Callable[[str], None] = lambda _: None,
        on_checkpoint: Callable[[Path], None] | None = None) -> "Distilled":
    """Distill as `request` says, on `hw`, resuming from its checkpoints."""
    evals = load_split(request.sft_dataset_dir, "eval")
    evals = evals[: request.max_eval_examples] if request.max_eval_examples else evals
    return distill_student(
        Path(request.teacher_dir), request.tokenizer_dir, load_split(request.sft_dataset_dir, "train"), evals,
        TrainingSpec.model_validate(request.training), seed=request.seed, keep_layers=request.keep_layers,
        student_path=Path(request.student_path) if request.student_path else None, alpha=request.alpha,
        temperature=request.temperature, max_new_tokens=request.max_new_tokens,
        eval_batch_size=request.eval_batch_size, speed_prompts=request.speed_prompts, device=hw.device,
        autocast_dtype=hw.autocast_dtype, checkpoint_dir=Path(request.checkpoint_dir), log=log,
        on_checkpoint=on_checkpoint)


def distill_student(teacher_dir: Path, tokenizer_dir: Path | str, examples: list[Example], evals: list[Example],
                    training: TrainingSpec, *, seed: int, keep_layers: str | Sequence[int],
                    student_path: Path | None = None,
                    alpha: float, temperature: float, max_new_tokens: int, eval_batch_size: int = 16,
                    speed_prompts: int = 8, device: str = "cpu", autocast_dtype: torch.dtype | None = None,
                    checkpoint_dir: Path | None = None, log: Callable[[str], None] = lambda _: None,
                    on_checkpoint: Callable[[Path], None] | None = None) -> Distilled:
    """Build a student of the teacher at `teacher_dir`, distill it on `examples`, and measure both
    models on `evals`. Raises `NotDistillable` (vocabularies differ), `TrainingDiverged` (NaN)."""
    tok = load_tokenizer(tokenizer_dir)
    teacher = load_model(teacher_dir, device)
    student, built = build_student(Path(teacher_dir), keep_layers, device, student_path)
    check_same_vocabulary(tok, student, teacher)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    models = {"teacher": teacher, "student": student}

    def kl_now() -> dict[str, float]:
        return kl_to_teacher(student, teacher, evals, temperature=temperature, pad_id=pad, device=device)

    kl_before = kl_now()
    log(f"student: {built}; {parameters(student):,} parameters (teacher {parameters(teacher):,}); KL before {kl_before}")
    result = train_student(
        student, teacher, examples, training, seed=seed, alpha=alpha, temperature=temperature, pad_id=pad, device=device,
        autocast_dtype=autocast_dtype, checkpoint_dir=checkpoint_dir, on_checkpoint=on_checkpoint,
        on_log=lambda step, loss, kl, ce: log(f"step {step}: loss {loss:.4f} (KL {kl:.4f}, CE {ce:.4f})"))
    if result.resumed_from_step:
        log(f"resumed from checkpoint at step {result.resumed_from_step}")
    kl_after = kl_now()
    quality = {who: evaluate.evaluate(m, tok, evals, max_new_tokens=max_new_tokens, batch_size=eval_batch_size,
                                      device=device) for who, m in models.items()}
    speed = {who: generation_speed(m, evals[:speed_prompts], new_tokens=max_new_tokens, pad_id=pad, eos_id=eos,
                                   device=device) for who, m in models.items()}
    return Distilled(
        student=student, tokenizer=tok, built=built, alpha=alpha, temperature=temperature,
        kl_before=kl_before, kl_after=kl_after, quality=quality, speed=speed,
        parameters={who: parameters(m) for who, m in models.items()},
        layers={who: m.config.num_hidden_layers for who, m in models.items()},
        teacher_bytes=_bytes_under(teacher_dir), training=result,
    )


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


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


def _bytes_under(directory: Path) -> int:
    """The size of the files below `directory` (the report's model sizes)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
