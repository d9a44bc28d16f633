"""The recipe's `policies:` section: policy optimization (`policy_adapter[<name>]`), an SFT adapter
continued with GRPO against rewards.

    policies:
      grpo:
        sft_from: lora                  # the SFT method whose adapter it continues (lora, dora, rslora)
        rewards:                        # summed with their weights into each completion's reward
          - {type: token_f1}            #   verifiable: against the example's reference answer
          - {type: reward_model, reward_model: rm, weight: 0.5}   # a reward_models entry's score
          - {type: format, pattern: '\\$?[0-9.,]+%?'}            # 1 when the whole answer (stripped) matches
        num_generations: 4              # the group: answers sampled per prompt
        beta: 0.04                      # KL penalty to the SFT adapter (0: none, and no reference kept)

Settings are TRL's GRPOConfig keys of the same names; `training:` overrides the recipe's training
section for this policy (batch_size * grad_accum completions a step: a multiple of num_generations).
Cross-section rules (sft_from, reward model names) are checked by `Recipe`. No torch here.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .strict import Strict
from .training import TrainingOverrides

REWARD_TYPES = ("exact_match", "token_f1", "format", "reward_model")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
# GRPOConfig keys a policy sets as they are (`PolicySpec.trainer_settings`)
GRPO_KEYS = ("num_generations", "max_completion_length", "temperature", "top_p", "beta", "epsilon", "loss_type")


class RewardSpec(Strict):
    """One reward function of a policy; a completion's reward is the weighted sum of them all."""

    type: Literal["exact_match", "token_f1", "format", "reward_model"]  # exact_match / token_f1: against the reference answer (SQuAD normalization); format: the pattern; reward_model: its score
    weight: float = 1.0  # its weight in the sum (negative: a penalty)
    pattern: str | None = None  # type format: a regular expression the whole answer, stripped, must match (re.fullmatch)
    reward_model: str | None = None  # type reward_model: a name in the recipe's `reward_models:`

    @model_validator(mode="after")
    def _keys_of_its_type(self) -> "RewardSpec":
        if self.type == "format":
            if not self.pattern:
                raise ValueError("a format reward needs `pattern`: the regular expression an answer must match")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {exc}") from None
        elif self.pattern is not None:
            raise ValueError(f"`pattern` belongs to format rewards, not {self.type}")
        if self.type == "reward_model" and not self.reward_model:
            raise ValueError("a reward_model reward needs `reward_model`: the name of one of the recipe's "
                             "reward_models")
        if self.type != "reward_model" and self.reward_model is not None:
            raise ValueError(f"`reward_model` belongs to reward_model rewards, not {self.type}")
        return self


class PolicySpec(Strict):
    """A policy (`policy_adapter[<name>]`): adapter[sft_from] continued with GRPO (TRL's GRPOTrainer)
    on the SFT dataset's training prompts, each answer scored by `rewards`."""

    algorithm: Literal["grpo"] = "grpo"  # GRPO: group-relative advantages, no value model (see docs/design.md)
    sft_from: str  # the SFT method (lora, dora or rslora) whose adapter it continues; with beta > 0 also the reference
    rewards: Annotated[list[RewardSpec], Field(min_length=1)]  # what a completion is worth: the weighted sum
    num_generations: Annotated[int, Field(ge=2, le=64)] = 4  # answers sampled per prompt (the group)
    max_completion_length: Annotated[int, Field(ge=1, le=4096)] = 64  # tokens an answer may have
    temperature: Annotated[float, Field(gt=0)] = 1.0  # sampling temperature of the answers
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0  # nucleus sampling of the answers
    beta: Annotated[float, Field(ge=0)] = 0.04  # weight of KL(policy || SFT adapter); 0: no KL term and no reference
    epsilon: Annotated[float, Field(gt=0, lt=1)] = 0.2  # clipping of the policy ratio (PPO's epsilon)
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"  # how tokens are averaged into the loss (TRL's default dapo)
    max_prompts: Annotated[int, Field(ge=1)] | None = None  # train on the first N training prompts only (null: all)
    heldout_prompts: Annotated[int, Field(ge=1)] | None = 32  # held-out prompts its report answers (null: every eval example)
    training: TrainingOverrides = Field(default_factory=dict)  # overrides of TrainingSpec

    def trainer_settings(self) -> dict[str, Any]:
        """The GRPOConfig keys this policy sets (`trainers.policy.PolicyRequest.settings`)."""
        return {k: getattr(self, k) for k in GRPO_KEYS}

    def reward_models(self) -> list[str]:
        """The reward models its rewards read (declared inputs of its asset)."""
        return list(dict.fromkeys(r.reward_model for r in self.rewards if r.reward_model))
