"""Preference methods: a LoRA-shaped peft adapter continued from an SFT adapter of the recipe on its
`preferences:` pairs, by the objective its type names (`trainers.preference`, one module each):

    dpo    DPO, against the frozen SFT adapter                  keys: beta, loss_type
    orpo   ORPO, reference-free (NLL + odds ratio)              keys: beta (lambda)
    simpo  SimPO, reference-free (length-normalized, margin)    keys: beta, gamma, sft_weight
    kto    KTO, on labelled answers (an unpaired set's, or each pair as two), against the frozen SFT adapter
                                                                keys: beta, desirable_weight, undesirable_weight

They are not built by `wrap` (the adapter comes from the SFT method's artifact and TRL's trainer
trains it), but they are saved, loaded and merged exactly like the peft adapter they started from,
so evaluation and `merged_model` treat them like any LoRA partition. Every one needs `sft_from`
(the method whose adapter it continues: one of `config.method_spec.PEFT_LORA_TYPES`) and pairs: the
recipe's `preferences:` section, or `pairs:` naming a `generated_preferences:` entry. Each spec
states the forms of `preferences:` data it trains on (`DATA_FORMS`, checked by the recipe): pairs
for all, unpaired labelled answers (`schema: unpaired`) for kto only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from . import register
from .lora import PeftMethod
from ..config.method_spec import PreferenceSpecBase, lora_source_problem


class _ContinuesSft(PreferenceSpecBase):
    """What every preference method shares: the SFT adapter it continues and the recipe rules."""

    SETTINGS: ClassVar[tuple[str, ...]] = ("beta",)  # the keys its trainer reads (`trainer_settings`)

    sft_from: str  # the SFT method (lora, dora or rslora) whose adapter it continues

    @model_validator(mode="after")
    def _no_continue(self) -> "_ContinuesSft":
        if self.continue_from is not None:
            raise ValueError(f"a {self.type} method always continues its sft_from adapter; drop continue_from")
        return self

    def trainer_settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.SETTINGS}

    def describe(self) -> str:
        return f", continues adapter[{self.sft_from}] (beta {self.beta})"

    def check_in_recipe(self, name: str, recipe: "Recipe") -> None:  # config.recipe.Recipe, passed in
        if self.pairs is None and recipe.preferences is None:
            raise ValueError(f"method {name!r} ({self.type}) needs a `preferences:` section "
                             "(prompt/chosen/rejected file) or `pairs:` naming a generated_preferences entry")
        if self.pairs is not None and self.pairs not in recipe.generated_preferences:
            raise ValueError(f"methods.{name}.pairs: {self.pairs!r} is not in `generated_preferences:` "
                             f"({', '.join(recipe.generated_preferences) or 'none'})")
        problem = lora_source_problem(f"methods.{name}.sft_from", self.sft_from, recipe.methods,
                                      f"{self.type} continues")
        if problem:
            raise ValueError(problem)
        if recipe.training_for(name).validation_fraction:
            raise ValueError(f"methods.{name}: validation_fraction / early stopping apply to SFT methods and "
                             f"distillation; {self.type} trains with TRL's loop, which this project does not "
                             f"validate yet. Set methods.{name}.training.validation_fraction: 0")
        a = recipe.automation
        if a.retrain_cron and not a.eager:  # one partitioned job cannot hold preference_adapter's chain
            raise ValueError(f"automation.retrain_cron with automation.eager: false cannot retrain {self.type} "
                             "methods (their merge and evaluation follow preference_adapter, outside the adapter "
                             "job); set automation.eager: true or drop retrain_cron")


class DpoSpec(_ContinuesSft):
    """DPO (Rafailov et al. 2023) with TRL's DPOTrainer: continues the adapter of method
    `sft_from` (as `preference_adapter[<name>]`, a declared input) on the recipe's `preferences`; the reference policy is that
    SFT adapter, frozen. `beta` scales the implicit reward; `loss_type` picks TRL's loss."""

    SETTINGS: ClassVar[tuple[str, ...]] = ("beta", "loss_type")

    type: Literal["dpo"]
    beta: Annotated[float, Field(gt=0)] = 0.1  # strength of the implicit KL to the SFT adapter
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # TRL's DPO loss


class OrpoSpec(_ContinuesSft):
    """ORPO (Hong et al. 2024) with TRL's ORPOTrainer: the SFT loss on the chosen answer plus an
    odds-ratio term that separates chosen from rejected, no reference model. Continues the adapter
    of method `sft_from` on the recipe's `preferences`. `beta` weighs the odds-ratio term (the paper's lambda)."""

    type: Literal["orpo"]
    beta: Annotated[float, Field(gt=0)] = 0.1  # weight of the odds-ratio term against the NLL


class SimpoSpec(_ContinuesSft):
    """SimPO (Meng et al. 2024) with TRL's CPOTrainer: a margin between the length-normalized
    log-probabilities of chosen and rejected, no reference model. Continues the adapter of method
    `sft_from` on the recipe's `preferences`."""

    SETTINGS: ClassVar[tuple[str, ...]] = ("beta", "gamma", "sft_weight")

    type: Literal["simpo"]
    beta: Annotated[float, Field(gt=0)] = 2.0  # scale of the reward difference (the paper uses 2.0-2.5)
    gamma: Annotated[float, Field(ge=0)] = 0.5  # target reward margin (TRL's simpo_gamma)
    sft_weight: Annotated[float, Field(ge=0)] = 0.0  # NLL on the chosen answer (TRL's cpo_alpha; 0: SimPO as published)


class KtoSpec(_ContinuesSft):
    """KTO (Ethayarajh et al. 2024) with TRL's KTOTrainer: trains on answers labelled desirable or
    undesirable, each moved by how far it is from a KL estimate against the frozen SFT adapter: the
    labelled answers of an unpaired `preferences:` set (`schema: unpaired`, TRL's KTO form) as they
    are, or each pair as a desirable and an undesirable answer. Continues the adapter of method
    `sft_from` on the recipe's `preferences`; needs a batch of 2 or more."""

    SETTINGS: ClassVar[tuple[str, ...]] = ("beta", "desirable_weight", "undesirable_weight")
    ROWS_PER_PAIR: ClassVar[int] = 2
    DATA_FORMS: ClassVar[tuple[str, ...]] = ("paired", "unpaired")

    type: Literal["kto"]
    beta: Annotated[float, Field(gt=0)] = 0.1  # strength of the implicit KL to the SFT adapter
    desirable_weight: Annotated[float, Field(gt=0)] = 1.0  # loss weight of the chosen (desirable) answers
    undesirable_weight: Annotated[float, Field(gt=0)] = 1.0  # loss weight of the rejected (undesirable) answers

    def check_in_recipe(self, name: str, recipe: "Recipe") -> None:
        super().check_in_recipe(name, recipe)
        if recipe.training_for(name).batch_size < 2:
            raise ValueError(f"methods.{name}: kto estimates its KL term from the other answers of a batch; "
                             f"set methods.{name}.training.batch_size to 2 or more")


@dataclass(frozen=True)
class PreferenceMethod(PeftMethod):
    def wrap(self, model, spec, *, gradient_checkpointing: bool = False):
        raise TypeError(f"{self.type} adapters start from their sft_from adapter and train with "
                        "trainers.preference, not from a fresh wrap")


for _type, _spec in (("dpo", DpoSpec), ("orpo", OrpoSpec), ("simpo", SimpoSpec), ("kto", KtoSpec)):
    register(PreferenceMethod(_type), spec=_spec)
