"""ORPO (Hong et al. 2024) with TRL's ORPOTrainer (`trl.experimental`):

    loss = NLL(y_w|x) - beta * log sigmoid(log odds(y_w|x) - log odds(y_l|x)),  odds = p / (1 - p)

Reference-free: no frozen copy, nothing but the adapter in memory; the NLL term keeps the SFT
behaviour while the odds ratio separates the pairs. Recipe key: `beta` (the paper's lambda)."""

from __future__ import annotations

from .objective import Objective, check_prompt_answer_ids, pair_trainer


def build(model, tokenizer, pairs, args: dict, settings: dict, max_length: int | None, callback):
    from .experimental import trl_experimental

    with trl_experimental():
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    # remove_unused_columns: its collator reads the tokenized columns (TRL warns otherwise)
    config = ORPOConfig(**args, beta=settings["beta"], max_length=max_length, remove_unused_columns=False,
                        dataset_num_proc=None)
    return pair_trainer(ORPOTrainer, config, model, tokenizer, pairs, callback)


OBJECTIVE = Objective("orpo", "ORPO", build, check_prompt_answer_ids)
