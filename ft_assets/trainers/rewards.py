"""GRPO's reward functions (`trainers.policy`), called as TRL calls them, one entry per completion:
`f(prompts=[...], completions=[...], reference=[...], **kwargs) -> [float, ...]`; a completion is
decoded without special tokens (no end-of-turn). A function's `__name__` is its log key
(`rewards/<name>/mean`). `build_rewards` turns the recipe's `{"type", "weight", ...}` list into
TRL's `reward_funcs` and `reward_weights` (the step's reward is the weighted sum). Types:

    exact_match, token_f1  the completion against the reference answer: the pipeline's QA metrics
                           (`evaluation.qa_metrics`, the held-out evaluation's normalisation)
    format                 1.0 when the completion, stripped, matches `pattern` whole (`re.fullmatch`,
                           DOTALL: write `.*x.*` for "contains x"), else 0.0
    reward_model           a merged sequence classifier (`trainers.reward.save`'s directory), frozen, on
                           the policy's device: its score of prompt + completion + end-of-turn, the text
                           RewardTrainer trained it on (`trainers.reward.scores`)
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from ..config.policy import REWARD_TYPES
RewardFunction = Callable[..., list[float]]


class AnswerScore:
    """A QA metric of the completion against the reference answer (`qa_metrics.score_answers`)."""

    def __init__(self, metric: str, name: str):
        self.metric, self.__name__ = metric, name

    def __call__(self, prompts: list[str], completions: list[str], reference: list[str], **kwargs) -> list[float]:
        from ..evaluation.qa_metrics import score_answers

        return [float(s) for s in score_answers(list(completions), list(reference)).per_example[self.metric]]


class FormatMatch:
    """1.0 when the stripped completion matches `pattern` whole, else 0.0."""

    def __init__(self, pattern: str, name: str):
        try:
            self.pattern = re.compile(pattern, re.DOTALL)
        except re.error as exc:
            raise ValueError(f"rewards: format pattern {pattern!r} is not a regular expression ({exc})") from None
        self.__name__ = name

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        return [1.0 if self.pattern.fullmatch(c.strip()) else 0.0 for c in completions]


class RewardModelScore:
    """A reward model's score of prompt + completion + end-of-turn, batched, without gradients."""

    def __init__(self, model, tokenizer, name: str, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size, self.__name__ = model, tokenizer, batch_size, name

    def token_ids(self, prompts: list[str], completions: list[str]) -> list[list[int]]:
        # GRPO's completions lost the end-of-turn (decoded without special tokens); RewardTrainer
        # scored texts ending in it, at that last token: put it back so the score is read there
        eos = self.tokenizer.eos_token
        return [self.tokenizer(p + c + eos, add_special_tokens=False)["input_ids"]
                for p, c in zip(prompts, completions)]

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        from .reward import scores

        device = next(self.model.parameters()).device
        return scores(self.model, self.tokenizer, self.token_ids(prompts, completions), str(device), self.batch_size)


def build_rewards(specs: list[dict[str, Any]], *, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[list[RewardFunction], list[float]]:
    """The recipe's reward list as (functions, weights) in its order. A type used twice gets
    `_2`, `_3`... after its name (TRL logs each function under its name). Raises ValueError on an
    unknown type or a missing key."""
    if not specs:
        raise ValueError(f"rewards: give at least one reward ({', '.join(REWARD_TYPES)})")
    funcs: list[RewardFunction] = []
    weights: list[float] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        kind = spec.get("type")
        if kind not in REWARD_TYPES:
            raise ValueError(f"rewards[{i}]: unknown type {kind!r}; known types: {', '.join(REWARD_TYPES)}")
        seen[kind] = seen.get(kind, 0) + 1
        name = kind if seen[kind] == 1 else f"{kind}_{seen[kind]}"
        funcs.append(_reward_function(kind, spec, name, i, device, dtype))
        weights.append(float(spec.get("weight", 1.0)))
    return funcs, weights


def _reward_function(kind: str, spec: dict[str, Any], name: str, i: int, device: str,
                     dtype: torch.dtype) -> RewardFunction:
    if kind in ("exact_match", "token_f1"):
        return AnswerScore(kind, name)
    if kind == "format":
        return FormatMatch(_required(spec, "pattern", i), name)
    from ..models.base_model import load_tokenizer
    from .reward import load_scorer

    model_dir = _required(spec, "model_dir", i)
    tokenizer = load_tokenizer(model_dir)
    model = load_scorer(model_dir, tokenizer, device, dtype).eval().requires_grad_(False)
    return RewardModelScore(model, tokenizer, name)


def _required(spec: dict[str, Any], key: str, i: int) -> str:
    if spec.get(key) is None:  # an empty pattern is one: it matches the empty completion
        raise ValueError(f"rewards[{i}]: type {spec['type']} needs {key!r}")
    return spec[key]


def weighted_total(per_function: list[list[float]], weights: list[float]) -> list[float]:
    """Each completion's reward as GRPO sums it: sum over functions of weight * reward."""
    return [sum(w * r for w, r in zip(weights, rewards)) for rewards in zip(*per_function)]
