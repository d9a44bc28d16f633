"""Direct Preference Optimization on top of an SFT adapter, with TRL's DPOTrainer.

    SFT adapter (peft, trainable "default")  --TRL copies it-->  frozen "ref" adapter
    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

The model handed to `train_dpo` is a PeftModel whose "default" adapter is the SFT adapter
loaded trainable; TRL then adds a frozen copy named "ref" and computes the reference
log-probabilities with it, so no second model is loaded (the reference policy is the SFT
policy, as in the DPO paper). Only "default" is saved. TRL runs offline here: the data are
in-memory `datasets.Dataset`s, `report_to` is off, bf16 only on CUDA.

The metrics are ours (`sequence_logps`, `preference_metrics`), so they mean the same thing for
the base, SFT and DPO models: log-probability accuracy (pi(chosen) > pi(rejected)) for any
model, and for a policy with a reference, DPO's implicit reward r = beta * (log pi - log ref):
reward accuracy (r_chosen > r_rejected) and the mean reward margin r_chosen - r_rejected.
No Dagster here.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..data.rows import IGNORE_INDEX, Example
from ..models.base_model import load_model, parameter_count
from ..data.preferences import PreferencePair
from ..training.steps import steps_for
from ..training.loop import TrainConfig, TrainingDiverged, collate, peak_memory_bytes, reset_peak_memory, seed_everything

TRL_OPTIMIZERS = {"adamw": "adamw_torch", "paged_adamw_8bit": "paged_adamw_8bit", "adamw_8bit": "adamw_bnb_8bit"}


@dataclass
class DpoResult:
    losses: list[tuple[int, float]] = field(default_factory=list)
    reward_accuracies: list[tuple[int, float]] = field(default_factory=list)
    reward_margins: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    pairs_seen: int = 0
    wall_s: float = 0.0
    trainable_parameters: int = 0
    total_parameters: int = 0
    peak_memory_bytes: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "pairs_seen": self.pairs_seen, "wall_s": round(self.wall_s, 2),
            "trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters,
            "peak_memory_bytes": self.peak_memory_bytes,
            "first_loss": self.losses[0][1] if self.losses else None,
            "final_loss": self.losses[-1][1] if self.losses else None,
            "final_train_reward_accuracy": self.reward_accuracies[-1][1] if self.reward_accuracies else None,
            "final_train_reward_margin": self.reward_margins[-1][1] if self.reward_margins else None,
        }


def dpo_steps(n_pairs: int, cfg: TrainConfig) -> int:
    """Optimizer steps over `n_pairs`: the SFT rule (`train.steps_for`), pairs in place of rows."""
    return steps_for(n_pairs, cfg)


@dataclass
class PreferenceTuning:
    """What `tune_sft_adapter` made: the model (its "default" adapter is the DPO-tuned one) and the run."""

    model: Any
    result: DpoResult


def tune_sft_adapter(base_dir: Path, sft_adapter_dir: Path, tokenizer, pairs: list[PreferencePair], cfg: TrainConfig,
                     *, beta: float, loss_type: str, max_length: int | None, device: str, dtype: torch.dtype,
                     work_dir: Path, on_log: Callable[[int, float], None] | None = None) -> PreferenceTuning:
    """Load base + the SFT adapter (trainable) and continue it with DPO on `pairs`. Raises
    `TrainingDiverged` when the loss is not finite, `finetune.TrainingFailed` (with the recipe keys
    to change) when out of memory."""
    from peft import PeftModel

    seed_everything(cfg.seed)
    reset_peak_memory(device)
    model = PeftModel.from_pretrained(load_model(base_dir, device, dtype), sft_adapter_dir, is_trainable=True)
    trainable, total = parameter_count(model)
    try:
        result = train_dpo(model, tokenizer, pairs, cfg, beta=beta, loss_type=loss_type, max_length=max_length,
                           device=device, work_dir=work_dir, on_log=on_log)
    except torch.OutOfMemoryError as exc:
        from .sft import TrainingFailed, out_of_memory_hint

        raise TrainingFailed(out_of_memory_hint(cfg, device, exc)) from None
    if not all(math.isfinite(loss) for _, loss in result.losses):
        raise TrainingDiverged(f"DPO loss is not finite; lower the learning rate (now {cfg.lr})")
    result.trainable_parameters, result.total_parameters = trainable, total
    result.peak_memory_bytes = peak_memory_bytes(device)
    return PreferenceTuning(model, result)


def to_trl_dataset(pairs: list[PreferencePair]):
    """Text pairs in TRL's standard (non-conversational) preference format: the prompt is
    already chat-rendered and each answer already ends with end-of-turn."""
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [p.prompt_text for p in pairs],
        "chosen": [p.chosen_text for p in pairs],
        "rejected": [p.rejected_text for p in pairs],
    })


def train_dpo(
    model, tokenizer, pairs: list[PreferencePair], cfg: TrainConfig, *, beta: float, loss_type: str = "sigmoid",
    max_length: int | None = None, device: str = "cpu", work_dir: Path | None = None,
    on_log: Callable[[int, float], None] | None = None,
) -> DpoResult:
    """Continue `model` (a PeftModel, SFT adapter trainable as "default") with DPO on `pairs`, in place."""
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if not hasattr(model, "peft_config"):
        raise TypeError("train_dpo continues a peft adapter: pass a PeftModel loaded with is_trainable=True")
    steps = dpo_steps(len(pairs), cfg)
    result = DpoResult()

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                step = state.global_step
                result.losses.append((step, round(float(logs["loss"]), 6)))
                if "rewards/accuracies" in logs:
                    result.reward_accuracies.append((step, round(float(logs["rewards/accuracies"]), 4)))
                if "rewards/margins" in logs:
                    result.reward_margins.append((step, round(float(logs["rewards/margins"]), 6)))
                if on_log:
                    on_log(step, float(logs["loss"]))

    with tempfile.TemporaryDirectory(dir=work_dir) as out:
        args = DPOConfig(
            output_dir=out, max_steps=steps, per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
            warmup_steps=int(cfg.warmup_ratio * steps), lr_scheduler_type=cfg.lr_scheduler,
            max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm else 0.0, optim=TRL_OPTIMIZERS[cfg.optimizer],
            gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed, data_seed=cfg.seed,
            beta=beta, loss_type=[loss_type], max_length=max_length,
            bf16=device.startswith("cuda") and torch.cuda.is_bf16_supported(), fp16=False,
            use_cpu=not device.startswith("cuda"), logging_steps=1, save_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0, dataset_num_proc=None,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=to_trl_dataset(pairs),
                             processing_class=tokenizer, callbacks=[Record()])
        trainer.remove_callback(PrinterCallback)  # our Record callback logs; no dicts on stdout
        check_tokenization(trainer.train_dataset, pairs)
        t0 = time.perf_counter()
        trainer.train()
        result.wall_s = time.perf_counter() - t0
    result.steps = steps
    result.pairs_seen = steps * cfg.batch_size * cfg.grad_accum
    if "ref" in model.peft_config:  # TRL's frozen reference copy: not part of what we trained
        model.delete_adapter("ref")
    model.set_adapter("default")
    return result


def check_tokenization(trl_dataset, pairs: list[PreferencePair]) -> None:
    """TRL re-tokenizes our text; it must see exactly the ids our metrics and SFT masking use."""
    for row, pair in zip(trl_dataset.select(range(min(8, len(pairs)))), pairs):
        if (row["prompt_ids"] + row["chosen_ids"] != pair.prompt_ids + pair.chosen_ids
                or row["prompt_ids"] + row["rejected_ids"] != pair.prompt_ids + pair.rejected_ids):
            raise RuntimeError(f"TRL tokenizes pair {pair.id} differently from preference_dataset; "
                               "re-materialize preference_dataset with this base model's tokenizer")


def save_dpo_adapter(model, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True, selected_adapters=["default"])


def write_preference_adapter(store, name: str, tuned: PreferenceTuning, *, inputs: dict[str, str],
                             derivation: dict[str, Any], facts: dict[str, Any], **manifest: Any):
    """`tuned` stored as `preference_adapter[name]` under `derivation` (an `ArtifactStore`), with
    its train log; `facts` go to the manifest's extra keys, `manifest` (recipe_hash, code_version,
    seed) to the store write. Returns the Artifact."""
    r = tuned.result
    log = {"losses": r.losses, "reward_accuracies": r.reward_accuracies, "reward_margins": r.reward_margins,
           "steps": r.steps}
    with store.write("preference_adapter", name, derivation=derivation, **manifest) as st:
        st.inputs = inputs
        save_dpo_adapter(tuned.model, st.path)
        st.extra.update(facts)
        (st.path / "train_log.json").write_text(json.dumps(log, indent=2, sort_keys=True) + "\n")
    return st.artifact


# --------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------


def _as_example(pair: PreferencePair, answer_ids: list[int]) -> Example:
    ids = pair.prompt_ids + answer_ids
    return Example(pair.id, pair.prompt, None, "", pair.line, pair.task, ids,
                   [IGNORE_INDEX] * len(pair.prompt_ids) + answer_ids)


@torch.inference_mode()
def sequence_logps(model, pairs: list[PreferencePair], pad_id: int, device: str = "cpu",
                   batch_size: int = 8) -> tuple[list[float], list[float]]:
    """Sum of log pi(answer token | prefix) over each answer (incl. end-of-turn): (chosen, rejected)."""
    model.eval()
    out = []
    for which in ("chosen_ids", "rejected_ids"):
        rows = [_as_example(p, getattr(p, which)) for p in pairs]
        sums: list[float] = []
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i: i + batch_size], pad_id, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logits = logits[:, -batch["input_ids"].size(1):]  # prompt-learning peft prepends virtual tokens
            targets = batch["labels"][:, 1:]
            logp = F.log_softmax(logits[:, :-1], dim=-1)
            mask = targets != IGNORE_INDEX
            tok = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            sums += (tok * mask).sum(dim=1).tolist()
        out.append(sums)
    return out[0], out[1]


def preference_metrics(policy: tuple[list[float], list[float]], reference: tuple[list[float], list[float]] | None = None,
                       beta: float = 0.1) -> dict[str, float]:
    chosen, rejected = policy
    n = len(chosen)
    m = {
        "pairs": n,
        "logp_accuracy": round(sum(c > r for c, r in zip(chosen, rejected)) / n, 4),
        "logp_margin": round(sum(c - r for c, r in zip(chosen, rejected)) / n, 4),
    }
    if reference is not None:
        rc = [beta * (c - c0) for c, c0 in zip(chosen, reference[0])]
        rr = [beta * (r - r0) for r, r0 in zip(rejected, reference[1])]
        m.update({
            "reward_accuracy": round(sum(a > b for a, b in zip(rc, rr)) / n, 4),
            "reward_margin": round(sum(a - b for a, b in zip(rc, rr)) / n, 4),
            "reward_chosen": round(sum(rc) / n, 4),
            "reward_rejected": round(sum(rr) / n, 4),
        })
    return m


def evaluate_preferences(tuned, reference, base, pairs: list[PreferencePair], *, beta: float, pad_id: int,
                         device: str = "cpu") -> dict[str, Any]:
    """Held-out pairs scored the same way for three models: log-prob accuracy of the base, the SFT
    reference and the DPO-tuned model, and the tuned model's DPO rewards against the reference."""
    ref = sequence_logps(reference, pairs, pad_id, device)
    return {
        "pairs": len(pairs), "beta": beta,
        "base": preference_metrics(sequence_logps(base, pairs, pad_id, device)),
        "sft": preference_metrics(ref),
        "dpo": preference_metrics(sequence_logps(tuned, pairs, pad_id, device), ref, beta),
    }
