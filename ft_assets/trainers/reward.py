"""A reward model: the base with a one-score sequence-classification head, trained on preference
pairs with TRL's RewardTrainer (Bradley-Terry):

    loss = -log sigmoid(r(x, y_w) - r(x, y_l))  [+ center * (r(x, y_w) + r(x, y_l))^2]

r is the head's score at the last token of the chat-rendered prompt + answer (which ends with
end-of-turn). `lora` trains a LoRA adapter and the head (peft's SEQ_CLS task saves the head beside
the adapter); `full` trains every weight. Either way the result is saved merged, as a plain
`AutoModelForSequenceClassification` directory (config, safetensors, tokenizer) that transformers,
TRL's GRPO and vLLM load as they are. Held-out pairs are scored by `evaluate` (pairwise accuracy,
mean margin, calibration: how often the chosen answer wins at each predicted probability
sigmoid(margin)). Checkpoints, exact resume and signals: `trainers.trl_common`. No Dagster here.

`RewardRequest` -> `run(request, hw, ranks=...)` -> `RewardTraining` (`save(dir)`: the merged
scorer, its tokenizer, train_log.json): in the Dagster step or on every torchrun rank
(`jobs.train`, HF Trainer's DDP over `ranks`); `TrainedElsewhere` is rank 0's saved scorer as the
Dagster step receives it. `scorer()` gives either one's model and tokenizer for the held-out pairs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config.training import TrainingSpec
from ..data.preferences import PreferencePair
from ..models.base_model import load_tokenizer, parameter_count
from ..models.device import Compute
from ..training import checkpoint
from ..training.distributed import SINGLE, Ranks
from ..training.loop import peak_memory_bytes, reset_peak_memory, seed_everything
from ..training.steps import steps_for
from . import trl_common
from .preference import load_train_pairs
from .preference.objective import tokenized_differently
from .trl_common import Curve
from .request import NamedRequest

CURVES = (Curve("accuracy", "accuracies", 4, "train_accuracy"), Curve("margin", "margins", 6, "train_margin"))
CALIBRATION_BINS = 5  # predicted P(chosen wins) in [0.5, 1] split evenly (a pair is scored both ways round)


@dataclass
class RewardRequest(NamedRequest):
    """One reward-model run as plain values, built once by `defs.reward`."""

    name: str  # the recipe's reward model name
    base_dir: str
    preference_dataset_dir: str
    training: dict[str, Any]  # a TrainingSpec as JSON
    seed: int
    adapter: dict[str, Any] | None  # LoRA keys (r, alpha, dropout, target_modules); None: full fine-tuning
    center_rewards: float | None  # TRL's center_rewards_coefficient
    max_length: int | None
    checkpoint_dir: str | None


@dataclass
class RewardResult(trl_common.TrainedRun):
    accuracies: list[tuple[int, float]] = field(default_factory=list)  # per step, on the step's pairs
    margins: list[tuple[int, float]] = field(default_factory=list)

    def train_log(self) -> dict[str, Any]:
        return {"losses": self.losses, "accuracies": self.accuracies, "margins": self.margins, "steps": self.steps}


@dataclass
class RewardTraining:
    model: Any  # merged: a plain sequence-classification model
    tokenizer: Any
    result: RewardResult
    pairs: int

    def scorer(self, device: str = "cpu") -> tuple[Any, Any]:
        return self.model, self.tokenizer

    def save(self, out_dir: Path, ranks: Ranks = SINGLE) -> None:
        """The merged scorer, its tokenizer and train_log.json, by rank 0."""
        if ranks.is_main:
            self.model.save_pretrained(out_dir, safe_serialization=True)
            self.tokenizer.save_pretrained(out_dir)
            (out_dir / "train_log.json").write_text(json.dumps(self.result.train_log(), indent=2, sort_keys=True) + "\n")

    def report(self) -> dict[str, Any]:
        """What rank 0 reports to the Dagster step (`TrainedElsewhere.from_report`)."""
        return {"result": asdict(self.result), "pairs": self.pairs}


@dataclass
class TrainedElsewhere:
    """A reward model torchrun's ranks trained (`ft_assets.jobs.train`): the files rank 0 saved in
    `staged` (`RewardTraining.save`) and what it reported."""

    staged: Path
    result: RewardResult
    pairs: int

    @classmethod
    def from_report(cls, staged: Path, message: dict[str, Any]) -> "TrainedElsewhere":
        return cls(staged, RewardResult.from_dict(message["result"]), message["pairs"])

    def scorer(self, device: str = "cpu") -> tuple[Any, Any]:
        tokenizer = load_tokenizer(self.staged)
        return load_scorer(self.staged, tokenizer, device), tokenizer

    def save(self, out_dir: Path) -> None:
        checkpoint.move_files(self.staged, out_dir)


def run(request: RewardRequest, hw: Compute, *, ranks: Ranks = SINGLE, log: Callable[[str], None] = print,
        on_log: Callable[..., None] | None = None,
        on_checkpoint: Callable[[Path], None] | None = None) -> RewardTraining:
    """Train the reward model `request` describes on `hw`, as this process's place among `ranks`,
    resuming from its checkpoints; merged."""
    training = TrainingSpec.model_validate(request.training)
    tokenizer = load_tokenizer(request.base_dir)
    pairs = load_train_pairs(request.preference_dataset_dir, tokenizer)
    kind = "LoRA" if request.adapter else "full"
    device = ranks.device(hw.device)
    log(f"reward model ({kind}) on {len(pairs)} pairs, {steps_for(len(pairs), training, ranks.world_size)} steps, "
        f"on {hw.device}{f' x {ranks.world_size} processes' if ranks.distributed else ''}")
    seed_everything(request.seed)
    reset_peak_memory(device)
    model = load_scorer(request.base_dir, tokenizer, device, hw.dtype)
    ckpt = Path(request.checkpoint_dir) if request.checkpoint_dir else None
    trained, result = train_reward_model(model, tokenizer, pairs, training, adapter=request.adapter,
                                         seed=request.seed, center_rewards=request.center_rewards,
                                         max_length=request.max_length, device=device, checkpoint_dir=ckpt,
                                         on_log=on_log, on_checkpoint=on_checkpoint, ranks=ranks)
    if result.resumed_from_step:
        log(f"resumed from checkpoint at step {result.resumed_from_step}")
    result.peak_memory_bytes = peak_memory_bytes(device)
    return RewardTraining(trained, tokenizer, result, len(pairs))


def load_scorer(model_dir, tokenizer, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """`model_dir` as a one-score sequence classifier (a causal LM gets a new, random head); its pad
    id set, which it needs to find each row's last token."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype).to(device)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def train_reward_model(model, tokenizer, pairs: list[PreferencePair], training: TrainingSpec, *,
                       adapter: dict[str, Any] | None, seed: int, center_rewards: float | None = None,
                       max_length: int | None = None, device: str = "cpu", checkpoint_dir: Path | None = None,
                       on_log: Callable[[int, float], None] | None = None,
                       on_checkpoint: Callable[[Path], None] | None = None,
                       ranks: Ranks = SINGLE) -> tuple[Any, RewardResult]:
    """Train `model` (from `load_scorer`) on `pairs` with RewardTrainer (DDP over `ranks`): (the
    trained model, merged when `adapter` (LoRA keys) made it a PeftModel; the run)."""
    from trl import RewardConfig, RewardTrainer

    steps = steps_for(len(pairs), training, ranks.world_size)
    result = RewardResult()
    peft_config = _lora(adapter) if adapter else None

    def build(out: Path, callback):
        args = trl_common.trainer_args(training, seed, steps, out, checkpoint_dir is not None, device)
        config = RewardConfig(**args, max_length=max_length, center_rewards_coefficient=center_rewards,
                              dataset_num_proc=None)
        return RewardTrainer(model=model, args=config, train_dataset=_dataset(pairs), processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[callback])

    trainer = trl_common.train(model, build, what="reward model", training=training, device=device, steps=steps,
                               result=result, curves=CURVES, checkpoint_dir=checkpoint_dir,
                               check=lambda trainer: _check_tokenization(trainer.train_dataset, pairs),
                               on_log=on_log, on_checkpoint=on_checkpoint, ranks=ranks)
    trained = trainer.model
    result.trainable_parameters, result.total_parameters = parameter_count(trained)
    result.steps, result.pairs_seen = steps, steps * training.batch_size * training.grad_accum * ranks.world_size
    return (trained.merge_and_unload() if trl_common.is_peft(trained) else trained), result


def _lora(adapter: dict[str, Any]):
    from peft import LoraConfig

    # SEQ_CLS: peft also trains and saves the new head ("score") beside the adapter
    return LoraConfig(task_type="SEQ_CLS", r=adapter["r"], lora_alpha=adapter["alpha"],
                      lora_dropout=adapter["dropout"], target_modules=adapter["target_modules"])


def _dataset(pairs: list[PreferencePair]):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [p.prompt_text for p in pairs], "chosen": [p.chosen_text for p in pairs],
                              "rejected": [p.rejected_text for p in pairs]})


def _check_tokenization(trl_dataset, pairs: list[PreferencePair]) -> None:
    """TRL tokenizes prompt + answer itself; it must be our ids (end-of-turn once, at the end)."""
    for row, pair in zip(trl_dataset.select(range(min(8, len(pairs)))), pairs):
        if (row["chosen_ids"] != pair.prompt_ids + pair.chosen_ids
                or row["rejected_ids"] != pair.prompt_ids + pair.rejected_ids):
            raise tokenized_differently(pair.id)


# --------------------------------------------------------------------------------------
# scoring held-out pairs
# --------------------------------------------------------------------------------------


@torch.inference_mode()
def scores(model, tokenizer, texts: list[list[int]], device: str = "cpu", batch_size: int = 8) -> list[float]:
    """The model's score of each token sequence (right-padded batches)."""
    model.eval()
    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i: i + batch_size]
        width = max(len(t) for t in chunk)
        ids = torch.tensor([t + [tokenizer.pad_token_id] * (width - len(t)) for t in chunk], device=device)
        mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in chunk], device=device)
        out += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    return out


def evaluate(model, tokenizer, pairs: list[PreferencePair], device: str = "cpu") -> dict[str, Any]:
    """Held-out pairs: pairwise accuracy (r_chosen > r_rejected), mean margin, and calibration of
    the Bradley-Terry probability sigmoid(margin) in CALIBRATION_BINS bins of confidence."""
    chosen = scores(model, tokenizer, [p.prompt_ids + p.chosen_ids for p in pairs], device)
    rejected = scores(model, tokenizer, [p.prompt_ids + p.rejected_ids for p in pairs], device)
    margins = [c - r for c, r in zip(chosen, rejected)]
    n = len(pairs)
    return {"pairs": n, "accuracy": round(sum(m > 0 for m in margins) / n, 4) if n else None,
            "mean_margin": round(sum(margins) / n, 4) if n else None,
            "calibration": calibration(margins),
            "rows": [{"id": p.id, "chosen_score": round(c, 4), "rejected_score": round(r, 4)}
                     for p, c, r in zip(pairs, chosen, rejected)]}


def calibration(margins: list[float]) -> list[dict[str, Any]]:
    """Each pair as the model's more confident call (predicted p = sigmoid(|margin|) >= 0.5, right
    when margin > 0), binned by p: the mean p against how often that call was right."""
    bins = [[] for _ in range(CALIBRATION_BINS)]
    for m in margins:
        p = 1 / (1 + math.exp(-abs(m)))
        bins[min(int((p - 0.5) * 2 * CALIBRATION_BINS), CALIBRATION_BINS - 1)].append((p, m > 0))
    out = []
    for i, b in enumerate(bins):
        low, high = 0.5 + i / (2 * CALIBRATION_BINS), 0.5 + (i + 1) / (2 * CALIBRATION_BINS)
        out.append({"bin": f"{low:.1f}-{high:.1f}", "pairs": len(b),
                    "predicted": round(sum(p for p, _ in b) / len(b), 4) if b else None,
                    "observed": round(sum(ok for _, ok in b) / len(b), 4) if b else None})
    return out
