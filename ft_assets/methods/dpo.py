"""`dpo`: a LoRA-shaped peft adapter continued from an SFT adapter with DPO (`trainers.dpo`).

It is not built by `wrap` (the adapter comes from the SFT method's artifact, and TRL's
DPOTrainer trains it), but it is saved, loaded and merged exactly like the peft adapter it
started from, so evaluation and `merged_model` treat it like any LoRA partition.

Recipe keys (`DpoSpec`): `sft_from` (the method whose adapter it continues: one of
`DPO_SFT_TYPES`), `beta`, `loss_type`; the recipe needs a `preferences:` section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, model_validator

from . import register
from .lora import PeftMethod
from ..config.method_spec import PreferenceSpecBase

# The method types a `dpo` method may start from: peft LoRA adapters on the full-precision base.
DPO_SFT_TYPES = ("lora", "dora", "rslora")


class DpoSpec(PreferenceSpecBase):
    """DPO (Rafailov et al. 2023) with TRL's DPOTrainer: continues the adapter of method
    `sft_from` (as `preference_adapter[<name>]`, a declared input) on the recipe's `preferences`; the reference policy is that
    SFT adapter, frozen. `beta` scales the implicit reward; `loss_type` picks TRL's loss."""

    type: Literal["dpo"]
    sft_from: str  # the SFT method (lora, dora or rslora) whose adapter DPO continues
    beta: Annotated[float, Field(gt=0)] = 0.1  # strength of the implicit KL to the SFT adapter
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # TRL's DPO loss

    @model_validator(mode="after")
    def _no_continue(self) -> "DpoSpec":
        if self.continue_from is not None:
            raise ValueError("a dpo method always continues its sft_from adapter; drop continue_from")
        return self

    def describe(self) -> str:
        return f", continues adapter[{self.sft_from}] (beta {self.beta})"

    def check_in_recipe(self, name: str, recipe: "Recipe") -> None:  # config.recipe.Recipe, passed in
        if recipe.preferences is None:
            raise ValueError(f"method {name!r} (dpo) needs a `preferences:` section (prompt/chosen/rejected file)")
        src = recipe.methods.get(self.sft_from)
        if src is None:
            raise ValueError(f"methods.{name}.sft_from: {self.sft_from!r} is not a method of this recipe "
                             f"(methods: {', '.join(recipe.methods)})")
        if src.type not in DPO_SFT_TYPES:
            raise ValueError(f"methods.{name}.sft_from: {self.sft_from!r} is a {src.type} method; dpo continues "
                             f"one of: {', '.join(DPO_SFT_TYPES)}")
        if recipe.training_for(name).validation_fraction:
            raise ValueError(f"methods.{name}: validation_fraction / early stopping apply to SFT methods and "
                             "distillation; dpo trains with TRL's loop, which this project does not validate yet. "
                             f"Set methods.{name}.training.validation_fraction: 0")
        a = recipe.automation
        if a.retrain_cron and not a.eager:  # one partitioned job cannot hold preference_adapter's chain
            raise ValueError("automation.retrain_cron with automation.eager: false cannot retrain dpo methods "
                             "(their merge and evaluation follow preference_adapter, outside the adapter job); "
                             "set automation.eager: true or drop retrain_cron")


@dataclass(frozen=True)
class DpoMethod(PeftMethod):
    def wrap(self, model, spec, *, gradient_checkpointing: bool = False):
        raise TypeError("dpo adapters start from their sft_from adapter and train with trainers.dpo.train_dpo, "
                        "not from a fresh wrap")


register(DpoMethod("dpo"), spec=DpoSpec)
