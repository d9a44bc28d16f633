"""The contract of one preference objective (a module beside this one per method type): how the
pairs (for kto also an unpaired set's labelled answers) become the rows its TRL trainer reads, how
that trainer is built from our settings, that TRL tokenized the rows as `preference_dataset` did,
and which curves it logs. `preference.OBJECTIVES` collects them by method type; nothing else asks
which objective a method has."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from ...data.preferences import PreferencePair
from ..trl_common import Curve

# what DPO, ORPO and SimPO log per step besides the loss (KTO logs neither)
PAIRWISE_CURVES = (Curve("rewards/accuracies", "reward_accuracies", 4, "train_reward_accuracy"),
                   Curve("rewards/margins", "reward_margins", 6, "train_reward_margin"))


@dataclass(frozen=True)
class Objective:
    key: str  # the method type, and the adapter manifest's section of its run facts
    name: str  # for logs: "DPO"
    # (model, tokenizer, rows, trl_common.trainer_args(...), settings, max_length, callback) -> a TRL trainer
    build: Callable[..., Any]
    # (TRL's tokenized train_dataset, rows) -> None; raises when TRL's ids are not ours
    check_tokenization: Callable[[Any, list], None]
    curves: tuple[Curve, ...] = PAIRWISE_CURVES
    rows_per_pair: int = 1  # rows the trainer iterates per pair (steps count rows); a labelled answer is one
    # the rows in training order, from the pairs (or labelled answers) and a seeded Random (as they are, by default)
    rows: Callable[[list[PreferencePair], random.Random], list] = lambda pairs, rng: pairs
    reference: bool = False  # trains against the frozen SFT adapter: its beta is the implicit reward's
    unpaired: bool = False  # trains on an unpaired set's labelled answers too (kto), not only on pairs

    def reward_beta(self, settings: dict[str, Any]) -> float:
        """The beta of the implicit reward the evaluation reports: the objective's own for those
        with a reference (dpo, kto), DPO's default for the reference-free ones (comparable margins)."""
        return settings["beta"] if self.reference else 0.1


def pairs_dataset(pairs: list[PreferencePair]):
    """Text pairs in TRL's standard (non-conversational) preference format: the prompt is already
    chat-rendered and each answer already ends with end-of-turn."""
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [p.prompt_text for p in pairs],
        "chosen": [p.chosen_text for p in pairs],
        "rejected": [p.rejected_text for p in pairs],
    })


def pair_trainer(trainer_cls, config, model, tokenizer, pairs: list[PreferencePair], callback):
    """A TRL pairwise trainer over our text pairs."""
    return trainer_cls(model=model, args=config, train_dataset=pairs_dataset(pairs), processing_class=tokenizer,
                       callbacks=[callback])


def check_prompt_answer_ids(trl_dataset, pairs: list[PreferencePair]) -> None:
    """ORPO's and CPO's columns: `chosen_input_ids` / `rejected_input_ids` hold prompt + answer."""
    check_joined_ids(trl_dataset, pairs, "prompt_input_ids", "chosen_input_ids", "rejected_input_ids", joined=True)


def tokenized_differently(pair_id: str) -> RuntimeError:
    return RuntimeError(f"TRL tokenizes pair {pair_id} differently from preference_dataset; "
                        "re-materialize preference_dataset with this base model's tokenizer")


def check_joined_ids(trl_dataset, pairs: list[PreferencePair], prompt: str, chosen: str, rejected: str,
                     joined: bool) -> None:
    """The first rows' TRL columns against our ids: `chosen`/`rejected` hold prompt + answer
    (`joined`, ORPO/SimPO) or the answer after `prompt` (DPO)."""
    for row, pair in zip(trl_dataset.select(range(min(8, len(pairs)))), pairs):
        head = [] if joined else row[prompt]
        if (row[prompt] != pair.prompt_ids or head + row[chosen] != pair.prompt_ids + pair.chosen_ids
                or head + row[rejected] != pair.prompt_ids + pair.rejected_ids):
            raise tokenized_differently(pair.id)
