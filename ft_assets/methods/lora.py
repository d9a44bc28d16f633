"""LoRA and QLoRA through peft.

LoRA (Hu et al., 2021): W x + (alpha / r) * B A x with A, B trained and W frozen.
QLoRA (Dettmers et al., 2023): the same adapter on a 4-bit NF4, double-quantized base
(`quantized_base`), trained with a paged 8-bit AdamW. It is merged into the *dequantized*
base weights in full precision, never back into 4-bit weights (that would re-quantize the
sum and lose the update).

Recipe keys: `LoraKeys` (r, alpha, dropout, target_modules) are shared by the whole LoRA
family (dora, rslora, lora_fa, lora_plus in `peft_variants.py`, delta_lora); `LoraSpec`
configures lora and qlora. qlora needs the NF4 `quantized_base` and defaults to the paged
8-bit AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from . import default_param_groups, register
from ..config.method_spec import MethodSpecBase


class LoraKeys(MethodSpecBase):
    """The keys every LoRA-shaped method shares: rank, scale (alpha / r), dropout, where."""

    r: Annotated[int, Field(ge=1, le=4096)] = 16  # rank of A and B
    alpha: Annotated[float, Field(gt=0)] = 32  # scale numerator: the update is (alpha / r) B A
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05  # dropout on the adapter's input
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # Linear layers to adapt (names, or all-linear)


class LoraSpec(LoraKeys):
    """LoRA (Hu et al. 2021) through peft. `qlora` trains it on the 4-bit `quantized_base`."""

    type: Literal["lora", "qlora"]

    def check_in_recipe(self, name: str, recipe: "Recipe") -> None:  # config.recipe.Recipe, passed in
        if self.type == "qlora" and recipe.quantization.method != "nf4":
            raise ValueError(
                f"methods {recipe.methods_of_type('qlora')} (qlora) need quantization.method: nf4, "
                f"not {recipe.quantization.method!r}"
            )

    def training_defaults(self) -> dict[str, Any]:
        return {"optimizer": "paged_adamw_8bit"} if self.type == "qlora" else {}  # QLoRA's paged optimizer


def lora_config(spec: Any):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )


@dataclass(frozen=True)
class PeftMethod:
    """Base for methods that are a peft config on a frozen model."""

    type: str
    uses_quantized_base: bool = False
    fsdp: bool = False  # compute.parallel fsdp shards base and adapter (FSDP2); tested for the LoRA family
    saves_whole_model: bool = False  # saves the adapter's tensors only
    mergeable: bool = True
    merge_rounding: str = "fold"  # W + s·B·A computed once

    def peft_config(self, spec: Any):
        raise NotImplementedError

    def wrap(self, model, spec, *, gradient_checkpointing: bool = False):
        from peft import get_peft_model, prepare_model_for_kbit_training

        if self.uses_quantized_base:
            # casts norms to fp32 and enables input grads so checkpointing works on 4-bit layers
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        elif gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return get_peft_model(model, self.peft_config(spec))

    def param_groups(self, model, spec, lr: float, weight_decay: float) -> list[dict]:
        return default_param_groups(model, lr, weight_decay)

    def save(self, model, out_dir: Path, state_dict: dict | None = None) -> None:
        """`state_dict`: the live tensors gathered from a sharded model (peft keeps the adapter's)."""
        model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)

    def load(self, base, adapter_dir: Path):
        from peft import PeftModel

        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)

    def merge(self, base, adapter_dir: Path):
        if getattr(base, "is_quantized", False):
            raise ValueError("merge needs full-precision base weights; dequantize the base first")
        return self.load(base, adapter_dir).merge_and_unload()


@dataclass(frozen=True)
class LoraMethod(PeftMethod):
    def peft_config(self, spec: Any):
        return lora_config(spec)


register(LoraMethod("lora", fsdp=True), spec=LoraSpec)
register(LoraMethod("qlora", uses_quantized_base=True), spec=LoraSpec)

