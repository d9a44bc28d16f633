"""`dpo`: a LoRA-shaped peft adapter continued from an SFT adapter with DPO (`core.dpo`).

It is not built by `wrap` (the adapter comes from the SFT method's artifact, and TRL's
DPOTrainer trains it), but it is saved, loaded and merged exactly like the peft adapter it
started from, so evaluation and `merged_model` treat it like any LoRA partition.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import register
from .lora import PeftMethod


@dataclass(frozen=True)
class DpoMethod(PeftMethod):
    def wrap(self, model, spec, *, gradient_checkpointing: bool = False):
        raise TypeError("dpo adapters start from their sft_from adapter and train with core.dpo.train_dpo, "
                        "not from a fresh wrap")


register(DpoMethod("dpo"))
