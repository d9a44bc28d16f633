"""KTO (Ethayarajh et al. 2024) with TRL's KTOTrainer: each pair becomes two labelled answers, the
chosen one desirable and the rejected one undesirable, shuffled with the seed (TRL's sampler is
sequential, and KTO's own unpairing puts every desirable answer first):

    loss = w(y) * (1 - sigmoid(beta * (r(x, y) - z))),  r = log pi - log ref,  z = a batch estimate of the KL

against the SFT adapter, frozen (TRL's "ref" copy, as for DPO). Batches need 2 rows or more (z is
estimated from mismatched answers within the batch). Recipe keys: `beta`, `desirable_weight`,
`undesirable_weight`."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...data.preferences import PreferencePair
from ..trl_common import Curve
from .objective import Objective, tokenized_differently


@dataclass(frozen=True)
class LabelledAnswer:
    pair: PreferencePair  # the pair it comes from
    desirable: bool

    @property
    def answer_ids(self) -> list[int]:
        return self.pair.chosen_ids if self.desirable else self.pair.rejected_ids


def unpaired(pairs, rng: random.Random) -> list[LabelledAnswer]:
    rows = [LabelledAnswer(p, good) for p in pairs for good in (True, False)]
    rng.shuffle(rows)
    return rows


def build(model, tokenizer, rows: list[LabelledAnswer], args: dict, settings: dict, max_length: int | None, callback):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    data = Dataset.from_dict({
        "prompt": [r.pair.prompt_text for r in rows],
        "completion": [r.pair.chosen_text if r.desirable else r.pair.rejected_text for r in rows],
        "label": [r.desirable for r in rows],
    })
    config = KTOConfig(**args, beta=settings["beta"], desirable_weight=settings["desirable_weight"],
                       undesirable_weight=settings["undesirable_weight"], max_length=max_length,
                       dataset_num_proc=None)
    return KTOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[callback])


def check_tokenization(trl_dataset, rows: list[LabelledAnswer]) -> None:
    for row, ours in zip(trl_dataset.select(range(min(8, len(rows)))), rows):
        if row["prompt_ids"] != ours.pair.prompt_ids or row["completion_ids"] != ours.answer_ids:
            raise tokenized_differently(ours.pair.id)


OBJECTIVE = Objective("kto", "KTO", build, check_tokenization, curves=(Curve("kl", "kl", 6, "train_kl"),), rows_per_pair=2,
                      rows=unpaired, reference=True)
