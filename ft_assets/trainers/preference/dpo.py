"""DPO (Rafailov et al. 2023) with TRL's DPOTrainer:

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

TRL adds a frozen copy of the PeftModel's SFT adapter named "ref" and computes the reference
log-probabilities with it, so no second model is loaded (the reference policy is the SFT policy,
as in the DPO paper). Recipe keys: `beta`, `loss_type` (TRL's sigmoid / ipo / hinge)."""

from __future__ import annotations

from .objective import Objective, check_joined_ids, pair_trainer


def build(model, tokenizer, pairs, args: dict, settings: dict, max_length: int | None, callback):
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(**args, beta=settings["beta"], loss_type=[settings["loss_type"]], max_length=max_length,
                       dataset_num_proc=None)
    return pair_trainer(DPOTrainer, config, model, tokenizer, pairs, callback)


def check_tokenization(trl_dataset, pairs) -> None:
    check_joined_ids(trl_dataset, pairs, "prompt_ids", "chosen_ids", "rejected_ids", joined=False)


OBJECTIVE = Objective("dpo", "DPO", build, check_tokenization, reference=True)
