"""KTO (Ethayarajh et al. 2024) with TRL's KTOTrainer, on labelled answers (desirable or not):

    loss = w(y) * (1 - sigmoid(beta * (r(x, y) - z))),  r = log pi - log ref,  z = a batch estimate of the KL

against the SFT adapter, frozen (TRL's "ref" copy, as for DPO). Its rows are the labelled answers
in a seeded shuffle (TRL's sampler is sequential): an unpaired preference_dataset's (schema
`unpaired`, TRL's own KTO form) as they are, one row each; a paired one's pairs as two each, the
chosen answer desirable and the rejected one undesirable (`PreferencePair.labelled`; KTO's own
unpairing would put every desirable answer first). Batches need 2 rows or more (z is estimated from
mismatched answers within the batch). Recipe keys: `beta`, `desirable_weight`, `undesirable_weight`."""

from __future__ import annotations

import random

from ...data.preferences import LabelledAnswer, is_unpaired
from ..trl_common import Curve
from .objective import Objective, tokenized_differently


def labelled_answers(rows, rng: random.Random) -> list[LabelledAnswer]:
    """The rows KTO trains on, in their seeded order: an unpaired set's answers, or each pair's two."""
    answers = list(rows) if is_unpaired(rows) else [a for p in rows for a in p.labelled()]
    rng.shuffle(answers)
    return answers


def build(model, tokenizer, rows: list[LabelledAnswer], args: dict, settings: dict, max_length: int | None, callback):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    data = Dataset.from_dict({
        "prompt": [r.prompt_text for r in rows],
        "completion": [r.completion_text for r in rows],
        "label": [r.label for r in rows],
    })
    config = KTOConfig(**args, beta=settings["beta"], desirable_weight=settings["desirable_weight"],
                       undesirable_weight=settings["undesirable_weight"], max_length=max_length,
                       dataset_num_proc=None)
    return KTOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[callback])


def check_tokenization(trl_dataset, rows: list[LabelledAnswer]) -> None:
    for row, ours in zip(trl_dataset.select(range(min(8, len(rows)))), rows):
        if row["prompt_ids"] != ours.prompt_ids or row["completion_ids"] != ours.completion_ids:
            raise tokenized_differently(ours.id)


OBJECTIVE = Objective("kto", "KTO", build, check_tokenization, curves=(Curve("kl", "kl", 6, "train_kl"),), rows_per_pair=2,
                      rows=labelled_answers, reference=True, unpaired=True)
