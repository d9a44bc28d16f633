"""Policy optimization: an SFT adapter continued with GRPO (TRL's GRPOTrainer) on the sft_dataset's
training prompts, scored by the recipe's reward functions (`trainers.rewards`). Each step samples
num_generations answers to each of batch_size * grad_accum / num_generations prompts; an answer's
advantage is its reward (the functions' weighted sum) against its group's mean and std; loss = the
clipped (epsilon) policy-gradient surrogate + beta * KL(policy || the SFT adapter, frozen).

A prompt is the example's tokens before its answer, decoded (TRL must re-tokenize it to the same
ids); its reference is the example's answer. The model is a PeftModel whose trainable "default" is
the SFT adapter; with beta > 0 TRL adds "ref", a frozen copy, which the harness removes: only
"default" is saved. GRPO's loss is ~0 on-policy: the reward, KL and per-function curves tell how a
run went. Checkpoints, exact resume, signals: `trainers.trl_common`, with the prompt order seeded
per epoch (`EpochSeededSampler`). Evaluation: `trainers.policy_eval`. No vLLM, no Dagster here.

`PolicyRequest` -> `run(request, hw, ranks=...)` -> `PolicyTraining` (`save(dir)`: the "default"
adapter and train_log.json): in the Dagster step or on every torchrun rank (`jobs.train`, HF
Trainer's DDP over `ranks`: each rank samples the answers of its share of each step's prompts, so
a step takes world_size times the prompts); `TrainedElsewhere` is rank 0's result as the step
receives it, `policy(base_dir, hw)` either one's model and tokenizer for the held-out evaluation.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config.training import TrainingSpec
from ..data.rows import Example, dataset_info, tokenizer_fingerprint
from ..data.sft_dataset import load_split
from ..models.base_model import load_model, load_tokenizer, parameter_count
from ..models.device import Compute
from ..training import checkpoint
from ..training.distributed import SINGLE, Ranks
from ..training.loop import peak_memory_bytes, reset_peak_memory, seed_everything
from . import preference, trl_common
from .rewards import build_rewards
from .trl_common import Curve
from .request import NamedRequest

# the recipe keys GRPOConfig takes as they are; a missing one keeps TRL's default
GRPO_SETTINGS = ("num_generations", "max_completion_length", "temperature", "top_p", "beta", "epsilon", "loss_type")
TRL_NUM_GENERATIONS = 8  # GRPOConfig's default group size
CURVES = (Curve("reward", "rewards", 6, "train_reward"), Curve("reward_std", "reward_stds", 6, "train_reward_std"),
          Curve("kl", "kls", 6, "train_kl"))


def function_field(name: str) -> str:
    """The PolicyResult attribute holding reward function `name`'s mean reward per step."""
    return f"reward_of_{name}"


@dataclass
class PolicyResult(trl_common.TrainedRun):
    """A GRPO run's curves by step; besides the fields, one list per reward function, made from
    `reward_functions` (TRL logs a key per function: `curves`, `function_rewards`)."""

    reward_functions: list[str] = field(default_factory=list)  # their names, as TRL logs them
    rewards: list[tuple[int, float]] = field(default_factory=list)  # the weighted sum, mean over the step
    reward_stds: list[tuple[int, float]] = field(default_factory=list)
    kls: list[tuple[int, float]] = field(default_factory=list)  # logged only when beta != 0
    prompts_seen: int = 0
    epochs: float = 0.0  # passes over the training prompts (TRL's count)

    def __post_init__(self):
        for name in self.reward_functions:  # one curve each (`curves`), named after the function
            setattr(self, function_field(name), [])

    def curves(self) -> tuple[Curve, ...]:
        return CURVES + tuple(Curve(f"rewards/{n}/mean", function_field(n), 6, f"train_reward_{n}")
                              for n in self.reward_functions)

    def function_rewards(self) -> dict[str, list[tuple[int, float]]]:
        return {n: getattr(self, function_field(n)) for n in self.reward_functions}

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out.pop("pairs_seen")  # GRPO trains on prompts
        resumed = out.pop("resumed_from_step")  # last, as in the other trainers
        return {**out, "prompts_seen": self.prompts_seen, "epochs": self.epochs,
                "first_train_reward": self.rewards[0][1] if self.rewards else None,
                "final_train_reward": self.rewards[-1][1] if self.rewards else None,
                "final_train_kl": self.kls[-1][1] if self.kls else None, "resumed_from_step": resumed}

    def train_log(self) -> dict[str, Any]:
        """train_log.json: the curves by step."""
        return {"losses": self.losses, "rewards": self.rewards, "reward_stds": self.reward_stds, "kls": self.kls,
                "function_rewards": self.function_rewards(), "steps": self.steps}


@dataclass(frozen=True)
class PolicyPrompt:
    id: str
    text: str  # chat-rendered: what the model reads before its answer
    ids: list[int]  # its tokens in the sft_dataset
    reference: str  # the example's answer


@dataclass
class PolicyTraining:
    """What `run` made: the model (its "default" adapter is the tuned policy) and the run."""

    model: Any
    tokenizer: Any
    result: PolicyResult
    prompts: int = 0  # the training prompts

    def policy(self, base_dir: str, hw: Compute) -> tuple[Any, Any]:
        """The tuned policy and its tokenizer, for the held-out evaluation."""
        return self.model, self.tokenizer

    def save(self, out_dir: Path, ranks: Ranks = SINGLE) -> None:
        """The tuned adapter ("default" only) and train_log.json, by rank 0."""
        if ranks.is_main:
            save_adapter(self.model, out_dir)
            (out_dir / "train_log.json").write_text(json.dumps(self.result.train_log(), indent=2, sort_keys=True) + "\n")

    def report(self) -> dict[str, Any]:
        """What rank 0 reports to the Dagster step (`TrainedElsewhere.from_report`)."""
        return {"result": asdict(self.result), "function_rewards": self.result.function_rewards(),
                "prompts": self.prompts}


@dataclass
class TrainedElsewhere:
    """A policy torchrun's ranks trained (`ft_assets.jobs.train`): the files rank 0 saved in `staged`
    (`PolicyTraining.save`), what it reported, and the base it loads onto for the evaluation."""

    staged: Path
    result: PolicyResult
    prompts: int

    @classmethod
    def from_report(cls, staged: Path, message: dict[str, Any]) -> "TrainedElsewhere":
        result = PolicyResult.from_dict(message["result"])
        for name, curve in message["function_rewards"].items():
            setattr(result, function_field(name), [tuple(x) for x in curve])
        return cls(staged, result, message["prompts"])

    def policy(self, base_dir: str, hw: Compute) -> tuple[Any, Any]:
        """The saved adapter on `base_dir` (the request's base), and its tokenizer."""
        from peft import PeftModel

        return (PeftModel.from_pretrained(load_model(base_dir, hw.device, hw.dtype), self.staged),
                load_tokenizer(base_dir))

    def save(self, out_dir: Path) -> None:
        checkpoint.move_files(self.staged, out_dir)


@dataclass
class PolicyRequest(NamedRequest):
    """One GRPO run as plain values: what `run` needs, built once by the Dagster layer."""

    name: str  # the recipe's policy name
    base_dir: str
    sft_adapter_dir: str  # the adapter it continues (and, with beta > 0, its frozen reference)
    sft_dataset_dir: str  # prompts and reference answers: its train split
    rewards: list[dict[str, Any]]  # `trainers.rewards.build_rewards`' specs: type, weight, pattern / model_dir
    settings: dict[str, Any]  # GRPO_SETTINGS keys
    training: dict[str, Any]  # a TrainingSpec as JSON
    seed: int
    checkpoint_dir: str | None
    max_prompts: int | None = None  # the train split's first prompts only


def run(request: PolicyRequest, hw: Compute, *, ranks: Ranks = SINGLE, log: Callable[[str], None] = print,
        on_log: Callable[..., None] | None = None,
        on_checkpoint: Callable[[Path], None] | None = None) -> PolicyTraining:
    """GRPO as `request` says, on `hw`, as this process's place among `ranks`, resuming from its
    checkpoints."""
    training = TrainingSpec.model_validate(request.training)
    settings = grpo_settings(request.settings)
    tokenizer = load_tokenizer(request.base_dir)
    prompts = load_prompts(request.sft_dataset_dir, tokenizer, request.max_prompts)
    # a batch that splits a group fails here, before loading
    steps = policy_steps(len(prompts), training, settings, ranks.world_size)
    log(f"GRPO ({request.name}) on {len(prompts)} prompts, {steps} steps, rewards "
        f"{', '.join(r['type'] for r in request.rewards)}, {', '.join(f'{k} {v}' for k, v in settings.items())}, "
        f"on {hw.device}{f' x {ranks.world_size} processes' if ranks.distributed else ''}")
    tuned = tune_sft_adapter(
        Path(request.base_dir), Path(request.sft_adapter_dir), tokenizer, prompts, training, rewards=request.rewards,
        settings=settings, seed=request.seed, device=ranks.device(hw.device), dtype=hw.dtype,
        checkpoint_dir=Path(request.checkpoint_dir) if request.checkpoint_dir else None, on_log=on_log,
        on_checkpoint=on_checkpoint, ranks=ranks)
    if tuned.result.resumed_from_step:
        log(f"resumed from checkpoint at step {tuned.result.resumed_from_step}")
    return tuned


# --------------------------------------------------------------------------------------
# prompts and steps
# --------------------------------------------------------------------------------------


def load_prompts(dataset_dir: str | Path, tokenizer, max_prompts: int | None = None) -> list[PolicyPrompt]:
    """The train split's prompts (the first `max_prompts`), refused when the sft_dataset was
    tokenized by another tokenizer."""
    if tokenizer_fingerprint(tokenizer) != dataset_info(dataset_dir)["tokenizer_fingerprint"]:
        from .sft import TrainingFailed

        raise TrainingFailed("sft_dataset was built with a different tokenizer than base_model has now; "
                             "re-materialize sft_dataset")
    rows = load_split(dataset_dir, "train")
    return [prompt_of(ex, tokenizer) for ex in (rows[:max_prompts] if max_prompts else rows)]


def prompt_of(ex: Example, tokenizer) -> PolicyPrompt:
    """The example's prompt text (chat-rendered, up to the answer) and reference answer."""
    # decoded from the example's tokens, not rendered again from its question: they are exactly
    # what the SFT model learned to answer after (system prompt, template, earlier turns), and
    # rendering again would need the recipe's chat settings, which only sft_dataset applies
    ids = list(ex.input_ids[:ex.prompt_len])
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return PolicyPrompt(ex.id, text, ids, ex.answer)


def check_prompt_ids(tokenizer, prompts: list[PolicyPrompt]) -> None:
    """TRL tokenizes each prompt text itself (`processing_class(text=...)`): it must get our ids."""
    got = tokenizer(text=[p.text for p in prompts])["input_ids"] if prompts else []
    for ids, p in zip(got, prompts):
        if list(ids) != p.ids:
            raise RuntimeError(f"the prompt of example {p.id} does not tokenize back to sft_dataset's ids (TRL "
                               "tokenizes prompt text): the tokenizer changed since sft_dataset was built (re-"
                               "materialize it), or its decode does not round-trip this text")


def prompts_per_step(training: TrainingSpec, settings: dict[str, Any], world_size: int = 1) -> int:
    """Distinct prompts an optimizer step trains on: TRL generates batch_size * grad_accum
    completions per step and process (its generation batch), num_generations for each prompt."""
    group = settings.get("num_generations", TRL_NUM_GENERATIONS)
    completions = training.batch_size * training.grad_accum * world_size
    if group < 2:
        raise ValueError(f"num_generations is {group}: GRPO compares each completion with its group, so it needs 2 "
                         "or more")
    if completions % group:
        raise ValueError(f"training.batch_size * training.grad_accum{' * processes' if world_size > 1 else ''} "
                         f"({training.batch_size} * {training.grad_accum}{f' * {world_size}' if world_size > 1 else ''} "
                         f"= {completions} completions a step) must be a multiple of num_generations ({group}): "
                         "a step holds whole groups of one prompt's completions")
    return completions // group


def policy_steps(n_prompts: int, training: TrainingSpec, settings: dict[str, Any], world_size: int = 1) -> int:
    """Optimizer steps over `n_prompts`: min(max_steps, ceil(epochs * steps in an epoch)), where
    an epoch is n_prompts // prompts_per_step steps (TRL's sampler drops an epoch's last partial
    batch of prompts). Raises ValueError when there are fewer prompts than one step takes."""
    per_step = prompts_per_step(training, settings, world_size)
    epoch_steps = n_prompts // per_step
    if epoch_steps == 0:
        raise ValueError(f"{n_prompts} training prompts, fewer than the {per_step} a step takes (training.batch_size "
                         "* training.grad_accum / num_generations): lower those or add data")
    return max(1, min(training.max_steps, math.ceil(training.epochs * epoch_steps)))


def grpo_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` checked: GRPO_SETTINGS keys only (GRPOConfig takes them as they are)."""
    unknown = sorted(set(settings) - set(GRPO_SETTINGS))
    if unknown:
        raise ValueError(f"unknown GRPO settings {', '.join(unknown)}; known: {', '.join(GRPO_SETTINGS)}")
    return dict(settings)


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------


def tune_sft_adapter(base_dir: Path, sft_adapter_dir: Path, tokenizer, prompts: list[PolicyPrompt],
                     training: TrainingSpec, *, rewards: list[dict[str, Any]], settings: dict[str, Any], seed: int,
                     device: str = "cpu", dtype: torch.dtype = torch.float32, checkpoint_dir: Path | None = None,
                     on_log: Callable[[int, float], None] | None = None,
                     on_checkpoint: Callable[[Path], None] | None = None, ranks: Ranks = SINGLE) -> PolicyTraining:
    """Load base + the SFT adapter (trainable) and continue it with GRPO on `prompts`,
    checkpointing into and resuming from `checkpoint_dir` (`train_policy`). Raises
    `TrainingDiverged`, `sft.TrainingFailed` (out of memory), `Preempted` on SIGTERM/SIGINT and
    `CheckpointBusy` as `trl_common.train` does."""
    from peft import PeftModel

    seed_everything(seed)
    reset_peak_memory(device)
    model = PeftModel.from_pretrained(load_model(base_dir, device, dtype), sft_adapter_dir, is_trainable=True)
    trainable, total = parameter_count(model)
    result = train_policy(model, tokenizer, prompts, training, rewards=rewards, settings=settings, seed=seed,
                          device=device, dtype=dtype, checkpoint_dir=checkpoint_dir, on_log=on_log,
                          on_checkpoint=on_checkpoint, ranks=ranks)
    result.trainable_parameters, result.total_parameters = trainable, total
    result.peak_memory_bytes = peak_memory_bytes(device)
    return PolicyTraining(model, tokenizer, result, len(prompts))


def train_policy(model, tokenizer, prompts: list[PolicyPrompt], training: TrainingSpec, *,
                 rewards: list[dict[str, Any]], settings: dict[str, Any], seed: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, checkpoint_dir: Path | None = None,
                 on_log: Callable[[int, float], None] | None = None,
                 on_checkpoint: Callable[[Path], None] | None = None, ranks: Ranks = SINGLE) -> PolicyResult:
    """Continue `model` (a PeftModel, SFT adapter trainable as "default") with GRPO on `prompts`,
    in place: `trl_common.train` (checkpoints in `checkpoint_dir`, exact resume, signals; DDP over `ranks`)."""
    if not trl_common.is_peft(model):
        raise TypeError("GRPO continues a peft adapter: pass a PeftModel loaded with is_trainable=True")
    settings = grpo_settings(settings)
    steps = policy_steps(len(prompts), training, settings, ranks.world_size)
    funcs, weights = build_rewards(rewards, device=device, dtype=dtype)
    result = PolicyResult(reward_functions=[f.__name__ for f in funcs])

    def build(out: Path, callback):
        args = trl_common.trainer_args(training, seed, steps, out, checkpoint_dir is not None, device)
        return _grpo_trainer(model, tokenizer, prompts, args, settings, funcs, weights, callback)

    trainer = trl_common.train(model, build, what="GRPO", training=training, device=device, steps=steps,
                               result=result, curves=result.curves(), checkpoint_dir=checkpoint_dir,
                               check=lambda trainer: check_prompt_ids(trainer.processing_class, prompts),
                               on_log=on_log, on_checkpoint=on_checkpoint, ranks=ranks)
    result.steps, result.epochs = steps, round(trainer.state.epoch, 4)
    result.prompts_seen = steps * prompts_per_step(training, settings, ranks.world_size)
    return result


def _grpo_trainer(model, tokenizer, prompts: list[PolicyPrompt], args: dict[str, Any], settings: dict[str, Any],
                  funcs: list, weights: list[float], callback):
    from datasets import Dataset
    from trl import GRPOConfig

    config = GRPOConfig(**args, **settings, reward_weights=weights)
    # `reference` reaches every reward function as a keyword argument, one entry per completion
    data = Dataset.from_dict({"prompt": [p.text for p in prompts], "reference": [p.reference for p in prompts]})
    return _resumable_grpo_trainer()(model=model, reward_funcs=funcs, args=config, train_dataset=data,
                                     processing_class=tokenizer, callbacks=[callback])


class EpochSeededSampler(torch.utils.data.Sampler):
    """TRL's GRPO sampler (`RepeatSampler`) with its shuffle seeded by (seed, epoch) at the start of
    each epoch. TRL draws every epoch's prompt order from one generator seeded once; a resumed run
    builds a new one, so resumed in a later epoch it trained on the first epoch's order again
    (measured). HF tells the sampler each epoch (`set_epoch`), resumed or not."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if self.sampler.shuffle:
            self.sampler.generator.manual_seed(self.sampler.seed + epoch)


@functools.cache
def _resumable_grpo_trainer():
    """GRPOTrainer with `EpochSeededSampler` (a class made at first use: trl stays unimported until a run)."""
    from trl import GRPOTrainer

    class ResumableGRPOTrainer(GRPOTrainer):
        def _get_train_sampler(self, dataset=None):
            return EpochSeededSampler(super()._get_train_sampler(dataset))

    return ResumableGRPOTrainer


def save_adapter(model, out_dir: Path) -> None:
    """The tuned policy as a plain peft adapter directory: "default" only (never TRL's "ref")."""
    preference.save_adapter(model, out_dir)

