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

Checkpoints and resume (`checkpoint_dir`), exact like `training.loop`'s:
    <checkpoint_dir>/step-NNNNNN/   one complete checkpoint (the newest only is kept): HF Trainer's
                                    files (the "default" adapter, optimizer, scheduler, RNG,
                                    trainer_state.json) and our progress.json (curves), written last
    <checkpoint_dir>/hf/            HF Trainer's output_dir: it writes checkpoint-N here, and a
                                    complete one is renamed to step-N; what a kill leaves is cleared
Every `checkpoint_every` steps (not after the last one: the artifact supersedes it), and on a
SIGTERM/SIGINT (that step, then `Preempted`), as `training.preemption` says; one writer per dir
(`checkpoint_lock`). A re-run resumes from the newest step-N with HF's
`train(resume_from_checkpoint=...)`: weights, optimizer, scheduler and RNG restored, the consumed
batches skipped (a seeded sampler per epoch). HF's resume alone is not exact here: a checkpoint of
a PeftModel with two adapters holds "default" at its root and TRL's "ref" in ref/, and HF then
loads only the sub-directory adapters, so "default" silently restarted from the SFT weights with
the checkpoint's optimizer state. The ref/ copy is therefore dropped from every checkpoint: HF
loads "default" from the root, and "ref" stays what TRL built from the SFT adapter in this
process (the reference is the SFT policy, never a checkpoint). Resumed or not, a run computes
the same bits; `resumed_from_step` is in `DpoResult.summary()` only, not in train_log.json.
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
import torch.nn.functional as F

from ..data.rows import IGNORE_INDEX, Example, dataset_info, tokenizer_fingerprint
from ..models.base_model import load_model, load_tokenizer, parameter_count
from ..models.device import Compute
from ..data.preferences import PreferencePair, load_pairs
from ..config.training import TrainingSpec
from ..training import checkpoint
from ..training.checkpoint import PROGRESS, latest_checkpoint
from ..training.steps import steps_for
from ..training.loop import TrainingDiverged, peak_memory_bytes, reset_peak_memory, seed_everything
from ..training.packing import collate
from ..training.preemption import Preempted, StopRequest, checkpoint_lock, stop_requests

KEY = "dpo"  # what this trainer's records are filed under: the adapter manifest's section, the tuned model's preference scores
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
    resumed_from_step: int = 0  # how this run went, not what it computed: in summary(), not in train_log.json

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "pairs_seen": self.pairs_seen, "wall_s": round(self.wall_s, 2),
            "trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters,
            "peak_memory_bytes": self.peak_memory_bytes,
            "first_loss": self.losses[0][1] if self.losses else None,
            "final_loss": self.losses[-1][1] if self.losses else None,
            "final_train_reward_accuracy": self.reward_accuracies[-1][1] if self.reward_accuracies else None,
            "final_train_reward_margin": self.reward_margins[-1][1] if self.reward_margins else None,
            "resumed_from_step": self.resumed_from_step,
        }


def dpo_steps(n_pairs: int, training: TrainingSpec) -> int:
    """Optimizer steps over `n_pairs`: the SFT rule (`training.steps.steps_for`), pairs in place of
    rows, one process."""
    return steps_for(n_pairs, training)


@dataclass
class PreferenceTuning:
    """What `tune_sft_adapter` made: the model (its "default" adapter is the DPO-tuned one) and the run."""

    model: Any
    result: DpoResult
    pairs: int = 0  # the training pairs


@dataclass
class DpoRequest:
    """One DPO run as plain values: what `run` needs, built once by `defs.preferences`."""

    method: str  # the recipe's method name
    base_dir: str
    sft_adapter_dir: str  # the adapter DPO continues (and its frozen reference)
    preference_dataset_dir: str  # its train pairs
    training: dict[str, Any]  # `recipe.training_for(method)`, a TrainingSpec as JSON
    seed: int
    beta: float
    loss_type: str
    max_length: int | None
    checkpoint_dir: str


def run(request: DpoRequest, hw: Compute, *, log: Callable[[str], None] = print,
        on_log: Callable[[int, float], None] | None = None,
        on_checkpoint: Callable[[Path], None] | None = None) -> PreferenceTuning:
    """DPO as `request` says, on `hw`, resuming from its checkpoints."""
    training = TrainingSpec.model_validate(request.training)
    tokenizer = load_tokenizer(request.base_dir)
    if tokenizer_fingerprint(tokenizer) != dataset_info(request.preference_dataset_dir)["tokenizer_fingerprint"]:
        from .sft import TrainingFailed

        raise TrainingFailed("preference_dataset was built with a different tokenizer than base_model has now; "
                             "re-materialize preference_dataset")
    pairs = load_pairs(request.preference_dataset_dir, "train")
    log(f"DPO on {len(pairs)} pairs, {dpo_steps(len(pairs), training)} steps, beta {request.beta}, on {hw.device}")
    tuned = tune_sft_adapter(
        Path(request.base_dir), Path(request.sft_adapter_dir), tokenizer, pairs, training,
        seed=request.seed, beta=request.beta, loss_type=request.loss_type, max_length=request.max_length,
        device=hw.device, dtype=hw.dtype, checkpoint_dir=Path(request.checkpoint_dir), on_log=on_log,
        on_checkpoint=on_checkpoint)
    if tuned.result.resumed_from_step:
        log(f"resumed from checkpoint at step {tuned.result.resumed_from_step}")
    tuned.pairs = len(pairs)
    return tuned


def tune_sft_adapter(base_dir: Path, sft_adapter_dir: Path, tokenizer, pairs: list[PreferencePair],
                     training: TrainingSpec, *, seed: int, beta: float, loss_type: str, max_length: int | None,
                     device: str, dtype: torch.dtype, checkpoint_dir: Path | None = None,
                     on_log: Callable[[int, float], None] | None = None,
                     on_checkpoint: Callable[[Path], None] | None = None) -> PreferenceTuning:
    """Load base + the SFT adapter (trainable) and continue it with DPO on `pairs`, checkpointing
    into and resuming from `checkpoint_dir` (`train_dpo`). Raises `TrainingDiverged` when the loss
    is not finite, `finetune.TrainingFailed` (with the recipe keys to change) when out of memory,
    `Preempted` on SIGTERM/SIGINT, `CheckpointBusy` when another process trains into `checkpoint_dir`."""
    from peft import PeftModel

    seed_everything(seed)
    reset_peak_memory(device)
    model = PeftModel.from_pretrained(load_model(base_dir, device, dtype), sft_adapter_dir, is_trainable=True)
    trainable, total = parameter_count(model)
    try:
        result = train_dpo(model, tokenizer, pairs, training, seed=seed, beta=beta, loss_type=loss_type,
                           max_length=max_length, device=device, checkpoint_dir=checkpoint_dir, on_log=on_log,
                           on_checkpoint=on_checkpoint)
    except torch.OutOfMemoryError as exc:
        from .sft import TrainingFailed, out_of_memory_hint

        raise TrainingFailed(out_of_memory_hint(training, device, exc)) from None
    if not all(math.isfinite(loss) for _, loss in result.losses):
        raise TrainingDiverged(f"DPO loss is not finite; lower the learning rate (now {training.lr})")
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
    model, tokenizer, pairs: list[PreferencePair], training: TrainingSpec, *, seed: int, beta: float,
    loss_type: str = "sigmoid", max_length: int | None = None, device: str = "cpu", checkpoint_dir: Path | None = None,
    on_log: Callable[[int, float], None] | None = None, on_checkpoint: Callable[[Path], None] | None = None,
) -> DpoResult:
    """Continue `model` (a PeftModel, SFT adapter trainable as "default") with DPO on `pairs`, in place.
    With `checkpoint_dir`: checkpoints every `training.checkpoint_every` steps and resumes from the
    newest (the module doc); `on_checkpoint(path)` once each is complete (the store mirrors it).
    Without: no checkpoints (a temporary output dir). Either way a SIGTERM/SIGINT ends the step it
    arrives in and raises `Preempted`."""
    from transformers import PrinterCallback
    from trl import DPOTrainer

    if not hasattr(model, "peft_config"):
        raise TypeError("train_dpo continues a peft adapter: pass a PeftModel loaded with is_trainable=True")
    steps = dpo_steps(len(pairs), training)
    result = DpoResult()
    with checkpoint_lock(checkpoint_dir), stop_requests() as stop, _trainer_output_dir(checkpoint_dir) as out:
        resume = latest_checkpoint(checkpoint_dir)
        if resume is not None:
            result.resumed_from_step = _restore_progress(resume, result)
        run = _hf_callback(result, stop, checkpoint_dir, on_log, on_checkpoint)
        args = _dpo_config(training, seed, steps, out, checkpoint_dir is not None, beta=beta, loss_type=loss_type,
                           max_length=max_length, device=device)
        trainer = DPOTrainer(model=model, args=args, train_dataset=to_trl_dataset(pairs),
                             processing_class=tokenizer, callbacks=[run])
        trainer.remove_callback(PrinterCallback)  # our callback logs; no dicts on stdout
        check_tokenization(trainer.train_dataset, pairs)
        run.t0 = time.perf_counter() - result.wall_s  # a resumed run's wall time includes the time before
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        result.wall_s = time.perf_counter() - run.t0
    if "ref" in model.peft_config:  # TRL's frozen reference copy: not part of what we trained
        model.delete_adapter("ref")
    model.set_adapter("default")
    if stop.signal_name is not None and run.step < steps:  # checkpointed at run.step (the callback)
        raise Preempted(run.step, stop.signal_name, run.saved)
    result.steps = steps
    result.pairs_seen = steps * training.batch_size * training.grad_accum
    return result


def _dpo_config(training: TrainingSpec, seed: int, steps: int, out: Path, checkpoints: bool, *, beta: float,
                loss_type: str, max_length: int | None, device: str):
    """TRL's settings for our recipe keys. Checkpoints: HF saves every `checkpoint_every` steps
    (`_RunCallback` drops the one after the last step and adds one on a stop request)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.grad_accum, learning_rate=training.lr,
        weight_decay=training.weight_decay, warmup_steps=int(training.warmup_ratio * steps),
        lr_scheduler_type=training.lr_scheduler, max_grad_norm=training.max_grad_norm or 0.0,
        optim=TRL_OPTIMIZERS[training.optimizer], gradient_checkpointing=training.gradient_checkpointing,
        seed=seed, data_seed=seed, beta=beta, loss_type=[loss_type], max_length=max_length,
        bf16=device.startswith("cuda") and torch.cuda.is_bf16_supported(), fp16=False,
        use_cpu=not device.startswith("cuda"), logging_steps=1,
        save_strategy="steps" if checkpoints else "no", save_steps=training.checkpoint_every, save_total_limit=1,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, dataset_num_proc=None,
    )


class _RunCallback:
    """(HF's `TrainerCallback` added at use, `_hf_callback`: transformers' trainer stays unimported
    until DPO runs.) Records the logged curves into `result`; checkpoints on a stop request and never after the
    last step; turns each HF checkpoint into a complete step-N (`checkpoint.publish`)."""

    def __init__(self, result: DpoResult, stop: StopRequest, checkpoint_dir: Path | None,
                 on_log: Callable[[int, float], None] | None, on_checkpoint: Callable[[Path], None] | None):
        self.result, self.stop, self.checkpoint_dir = result, stop, checkpoint_dir
        self.on_log_, self.on_checkpoint = on_log, on_checkpoint
        self.step, self.saved, self.t0 = 0, None, time.perf_counter()

    def _decide(self, state, control) -> None:
        """After a step's update: HF's periodic save stands, except after the last step; a stop
        request saves this step (with a checkpoint dir) and ends training."""
        self.step = state.global_step
        if state.global_step >= state.max_steps:
            control.should_save = False  # the artifact supersedes a checkpoint of the last step
        elif self.stop.signal_name is not None:
            control.should_save = self.checkpoint_dir is not None
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kw):
        self._decide(state, control)

    def on_log(self, args, state, control, logs=None, **kw):
        r = self.result
        if logs and "loss" in logs:
            step = state.global_step
            r.losses.append((step, round(float(logs["loss"]), 6)))
            if "rewards/accuracies" in logs:
                r.reward_accuracies.append((step, round(float(logs["rewards/accuracies"]), 4)))
            if "rewards/margins" in logs:
                r.reward_margins.append((step, round(float(logs["rewards/margins"]), 6)))
            if self.on_log_:
                self.on_log_(step, float(logs["loss"]))
            self._decide(state, control)  # HF logs after on_step_end: a signal sent while logging counts for this step

    def on_save(self, args, state, control, **kw):
        progress = {"step": state.global_step, "losses": self.result.losses,
                    "reward_accuracies": self.result.reward_accuracies, "reward_margins": self.result.reward_margins,
                    "wall_s": time.perf_counter() - self.t0}
        hf_checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        shutil.rmtree(hf_checkpoint / "ref", ignore_errors=True)  # TRL's copy: HF would load it (module doc)
        self.saved = checkpoint.publish(hf_checkpoint, self.checkpoint_dir, state.global_step, progress)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.saved)


def _hf_callback(*args) -> _RunCallback:
    from transformers import TrainerCallback

    return type("RunCallback", (_RunCallback, TrainerCallback), {})(*args)


@contextmanager
def _trainer_output_dir(checkpoint_dir: Path | None) -> Iterator[Path]:
    """HF Trainer's output_dir: `checkpoint_dir/hf`, emptied of what a killed run left there (the
    caller holds the checkpoint lock), or a temporary directory without checkpoints."""
    if checkpoint_dir is None:
        with tempfile.TemporaryDirectory(prefix="ft-dpo-") as tmp:
            yield Path(tmp)
        return
    out = checkpoint_dir / "hf"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    yield out


def _restore_progress(ckpt: Path, result: DpoResult) -> int:
    """The curves logged before `ckpt` into `result`; its step."""
    progress = json.loads((ckpt / PROGRESS).read_text())
    result.losses = [tuple(x) for x in progress["losses"]]
    result.reward_accuracies = [tuple(x) for x in progress["reward_accuracies"]]
    result.reward_margins = [tuple(x) for x in progress["reward_margins"]]
    result.wall_s = progress["wall_s"]
    return progress["step"]


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
        KEY: preference_metrics(sequence_logps(tuned, pairs, pad_id, device), ref, beta),
    }
