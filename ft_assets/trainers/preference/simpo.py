"""SimPO (Meng et al. 2024) with TRL's CPOTrainer (`trl.experimental`, `loss_type: simpo`):

    loss = -log sigmoid(beta * (mean log pi(y_w|x) - mean log pi(y_l|x)) - gamma) + sft_weight * NLL(y_w|x)

Length-normalized log-probabilities, a target margin `gamma`, no reference model. `sft_weight` 0 is
SimPO as published (TRL's `cpo_alpha`; above 0 it is CPO-SimPO). Recipe keys: `beta`, `gamma`,
`sft_weight`."""

from __future__ import annotations

from .objective import Objective, check_prompt_answer_ids, pair_trainer


def build(model, tokenizer, pairs, args: dict, settings: dict, max_length: int | None, callback):
    from .experimental import trl_experimental

    with trl_experimental():
        from trl.experimental.cpo import CPOConfig, CPOTrainer
    config = CPOConfig(**args, loss_type="simpo", beta=settings["beta"], simpo_gamma=settings["gamma"],
                       cpo_alpha=settings["sft_weight"], max_length=max_length, remove_unused_columns=False,
                       dataset_num_proc=None)
    return pair_trainer(CPOTrainer, config, model, tokenizer, pairs, callback)


OBJECTIVE = Objective("simpo", "SimPO", build, check_prompt_answer_ids)
