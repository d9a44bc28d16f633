"""The recipe's `generated_preferences:` section: preference pairs a tuned model makes for itself
(`generated_preferences[<name>]`), the hybrid loop of RLHF as lineage.

    generated_preferences:
      self_ranked:
        generator: lora                 # the SFT method whose adapter answers (lora, dora, rslora)
        rank_by:                        # what an answer is worth: the weighted sum (as a policy's rewards)
          - {type: token_f1}            #   verifiable: against the example's reference answer
          - {type: reward_model, reward_model: rm}
        answers_per_prompt: 4           # sampled per training prompt of sft_dataset
        min_margin: 0.1                 # best - worst must exceed this, else that prompt makes no pair

    methods:
      dpo_self: {type: dpo, sft_from: lora, pairs: self_ranked}   # trains on them instead of `preferences:`

Each prompt's best-ranked finished answer (it ended with end-of-turn; any answer with
`finished_only: false`) becomes `chosen`, its worst-ranked answer `rejected`. Cross-section rules (generator, reward model names, who reads the
pairs) are checked by `Recipe`. No torch here.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from .policy import RewardSpec
from .strict import Strict


class GeneratedPreferencesSpec(Strict):
    """Pairs ranked from a tuned model's own answers: `generator`'s adapter samples
    `answers_per_prompt` answers to each of the first `max_prompts` training prompts of
    `sft_dataset`; `rank_by` scores them."""

    generator: str  # the SFT method (lora, dora or rslora) whose adapter samples the answers
    rank_by: Annotated[list[RewardSpec], Field(min_length=1)]  # how answers are ranked: the weighted sum of these rewards (types as in `policies.<p>.rewards`)
    answers_per_prompt: Annotated[int, Field(ge=2, le=64)] = 4  # answers sampled per prompt
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 64  # tokens an answer may have; a longer one is unfinished (never chosen)
    temperature: Annotated[float, Field(gt=0)] = 1.0  # sampling temperature
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0  # nucleus sampling
    max_prompts: Annotated[int, Field(ge=1)] | None = 64  # the first N training prompts of sft_dataset (null: all)
    min_margin: Annotated[float, Field(ge=0)] = 0.0  # a pair needs reward(chosen) - reward(rejected) above this
    finished_only: bool = True  # chosen must have ended with end-of-turn; false: an answer cut at max_new_tokens may be chosen too
    eval_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15  # share of pairs held out for the preference metrics

    def reward_models(self) -> list[str]:
        """The reward models its ranking reads (declared inputs of its asset)."""
        return list(dict.fromkeys(r.reward_model for r in self.rank_by if r.reward_model))
