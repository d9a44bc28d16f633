"""LoRA variants and other adapters that peft implements: dora, rslora, lora_plus, lora_fa,
vera, ia3, prefix, prompt.

- DoRA (Liu et al., 2024): W = m * (W0 + s B A) / ||W0 + s B A||, a trained per-output-row
  magnitude m on top of LoRA's direction update. Mergeable.
- rsLoRA (Kalajdzievski, 2023): LoRA scaled by alpha / sqrt(r) instead of alpha / r, so the
  update does not shrink as the rank grows. Mergeable.
- LoRA+ (Hayou et al., 2024): plain LoRA, but B learns at `ratio` x A's learning rate. Done in
  `param_groups` with the grouping of peft's `create_loraplus_optimizer` (B and 1-D parameters
  at lr * ratio, A at lr), so the training loop still builds the optimizer. Mergeable.
- LoRA-FA (Zhang et al., 2023): A stays frozen at its random init (a fixed random projection),
  only B trains: half the adapter's optimizer state and no A activations to keep. Done with
  `requires_grad=False` on A and plain AdamW on B, as in the paper; peft's
  `create_lorafa_optimizer` additionally projects B's gradient (a later refinement), which we
  do not use because the loop builds a standard optimizer. Mergeable.
- VeRA (Kopiczko et al., 2024): one pair of frozen random matrices A, B (a single buffer each,
  sized for the largest adapted layer and shared by all of them); each layer trains only two
  scaling vectors, d (r entries) and b (out_features entries): W0 + diag(b) B diag(d) A.
  Mergeable.
- (IA)^3 (Liu et al., 2022): learned vectors rescale the outputs of keys and values and the
  input of the feed-forward down projection. Mergeable (each vector scales a weight's rows or
  columns).
- Prefix tuning (Li & Liang, 2021): trained key/value vectors for `num_virtual_tokens`
  positions in every layer, handed to the model as a key/value cache. Not mergeable. With
  `init_text` the prefix starts as the keys/values the base model computes for that text
  (the paper's initialisation from real words' activations, which it found much more stable
  than random init): before training, the model behaves exactly as if the text preceded every
  input. peft's own init is random and starts far from the base model.
- Prompt tuning (Lester et al., 2021): `num_virtual_tokens` trained input embeddings put in
  front of every input (optionally initialised from `init_text`). Not mergeable.

What is saved: peft's own `adapter_config.json` + `adapter_model.safetensors` (for VeRA the
shared projections too, so loading does not depend on regenerating them from the seed).
Checkpoints are restored with peft's `set_peft_model_state_dict`, because peft's saved names
(e.g. DoRA's `lora_magnitude_vector`, prompt tuning's `prompt_embeddings`) are not the live
parameter names the training loop's generic name matching looks for.

Recipe keys: `LoraVariantSpec` (dora, rslora, lora_fa: the LoRA keys of `lora.LoraKeys`),
`LoraPlusSpec` (+ `ratio`), `VeraSpec`, `IA3Spec`, `PromptLearningSpec` (prefix, prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from . import NotMergeable, default_param_groups, register
from .lora import LoraKeys, PeftMethod, lora_config
from ..config.method_spec import MethodSpecBase

if TYPE_CHECKING:
    import torch

ADAPTER_FILE = "adapter_model.safetensors"


# --------------------------------------------------------------------------------------
# Recipe keys
# --------------------------------------------------------------------------------------


class LoraVariantSpec(LoraKeys):
    """LoRA variants with only the LoRA keys: `dora` (weight-decomposed, Liu et al. 2024),
    `rslora` (scale alpha/sqrt(r), Kalajdzievski 2023), `lora_fa` (A frozen, Zhang et al. 2023)."""

    type: Literal["dora", "rslora", "lora_fa"]


class LoraPlusSpec(LoraKeys):
    """LoRA+ (Hayou et al. 2024): B learns at `ratio` times A's learning rate."""

    type: Literal["lora_plus"]
    ratio: Annotated[float, Field(gt=0)] = 16.0  # B's learning rate / A's


class VeraSpec(MethodSpecBase):
    """VeRA (Kopiczko et al. 2024): frozen random A/B shared by all layers, trained scaling vectors."""

    type: Literal["vera"]
    r: Annotated[int, Field(ge=1, le=16384)] = 256  # rank of the shared frozen random matrices
    d_initial: Annotated[float, Field(gt=0)] = 0.1  # initial value of the trained scaling vector d
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # Linear layers to adapt (names, or all-linear)


class IA3Spec(MethodSpecBase):
    """(IA)^3 (Liu et al. 2022): learned vectors rescale keys, values and feed-forward activations.
    Unset module lists use peft's per-architecture defaults (Llama: k_proj, v_proj, down_proj)."""

    type: Literal["ia3"]
    target_modules: Annotated[list[str], Field(min_length=1)] | None = None  # modules to rescale; null: peft's default for the architecture
    feedforward_modules: list[str] | None = None  # those of target_modules that are feed-forward (rescaled at the input)

    @model_validator(mode="after")
    def _feedforward_within_targets(self) -> "IA3Spec":
        if self.feedforward_modules is not None:
            if self.target_modules is None:
                raise ValueError("feedforward_modules needs target_modules (a list that contains them)")
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules")
        return self


class PromptLearningSpec(MethodSpecBase):
    """Learned virtual tokens: `prompt` tuning (Lester et al. 2021) prepends trained input
    embeddings; `prefix` tuning (Li & Liang 2021) trains key/value prefixes of every layer.
    `init_text` starts the virtual tokens from a phrase: prompt tuning from its token embeddings,
    prefix tuning from the keys/values the base model computes for it."""

    type: Literal["prefix", "prompt"]
    num_virtual_tokens: Annotated[int, Field(ge=1, le=4096)] = 16  # trained virtual tokens
    init_text: Annotated[str, Field(min_length=1)] | None = None  # phrase the virtual tokens start from; null: random init


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeftVariant(PeftMethod):
    """A peft method whose checkpoints are restored through peft's own state-dict loader."""

    def restore(self, model, saved_dir: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(Path(saved_dir) / ADAPTER_FILE))
        result = set_peft_model_state_dict(model, state)
        # prompt learning's `prompt_embeddings` go to the prompt encoder, outside load_state_dict's view
        unexpected = [k for k in result.unexpected_keys if k != "prompt_embeddings"]
        if unexpected:
            raise RuntimeError(f"checkpoint {saved_dir} has tensors this model lacks: {unexpected[:5]}")


@dataclass(frozen=True)
class LoraOptions(PeftVariant):
    """LoRA with one of peft's `LoraConfig` switches on (use_dora / use_rslora)."""

    option: str = ""

    def peft_config(self, spec: Any):
        config = lora_config(spec)
        setattr(config, self.option, True)
        return config


@dataclass(frozen=True)
class LoraPlus(PeftVariant):
    def peft_config(self, spec: Any):
        return lora_config(spec)

    def param_groups(self, model, spec, lr: float, weight_decay: float) -> list[dict]:
        # peft's create_loraplus_optimizer: lora_B and every 1-D parameter learn at lr * ratio.
        a, b, b_1d = [], [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim == 1:
                b_1d.append(p)
            elif "lora_B" in name:
                b.append(p)
            else:
                a.append(p)
        groups = [
            {"name": "lora_A", "params": a, "lr": lr, "weight_decay": weight_decay},
            {"name": "lora_B", "params": b, "lr": lr * spec.ratio, "weight_decay": weight_decay},
            {"name": "lora_B_1d", "params": b_1d, "lr": lr * spec.ratio, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]


@dataclass(frozen=True)
class LoraFA(PeftVariant):
    def peft_config(self, spec: Any):
        return lora_config(spec)

    def wrap(self, model, spec, *, gradient_checkpointing: bool = False):
        model = super().wrap(model, spec, gradient_checkpointing=gradient_checkpointing)
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)  # the frozen random down-projection
        return model

    def param_groups(self, model, spec, lr: float, weight_decay: float) -> list[dict]:
        return default_param_groups(model, lr, weight_decay)  # only B requires grad


@dataclass(frozen=True)
class Vera(PeftVariant):
    def peft_config(self, spec: Any):
        from peft import VeraConfig

        return VeraConfig(
            r=spec.r, d_initial=spec.d_initial, target_modules=spec.target_modules,
            projection_prng_key=0, save_projection=True, task_type="CAUSAL_LM",
        )


@dataclass(frozen=True)
class IA3(PeftVariant):
    def peft_config(self, spec: Any):
        from peft import IA3Config

        return IA3Config(
            target_modules=spec.target_modules, feedforward_modules=spec.feedforward_modules, task_type="CAUSAL_LM",
        )


@dataclass(frozen=True)
class PromptLearning(PeftVariant):
    """Prefix and prompt tuning: trained virtual tokens, nothing to fold into weights."""

    mergeable: bool = False
    merge_rounding: str = "none"

    def wrap(self, model, spec, *, gradient_checkpointing: bool = False):
        import torch
        from peft import get_peft_model

        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        # init_text is tokenized with the tokenizer saved next to the base weights
        tokenizer_dir = getattr(model, "name_or_path", None)
        prefix = None
        if self.type == "prefix" and spec.init_text is not None:
            prefix = prefix_from_text(model, tokenizer_dir, spec.init_text, spec.num_virtual_tokens)
        peft_model = get_peft_model(model, self.peft_config(spec, tokenizer_dir=tokenizer_dir))
        if prefix is not None:
            with torch.no_grad():
                peft_model.prompt_encoder["default"].embedding.weight.copy_(prefix)
        return peft_model

    def peft_config(self, spec: Any, tokenizer_dir: str | None = None):
        from peft import PrefixTuningConfig, PromptTuningConfig

        if self.type == "prefix":
            return PrefixTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type="CAUSAL_LM")
        if spec.init_text is None:
            return PromptTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type="CAUSAL_LM")
        return PromptTuningConfig(
            num_virtual_tokens=spec.num_virtual_tokens, task_type="CAUSAL_LM", prompt_tuning_init="TEXT",
            prompt_tuning_init_text=spec.init_text, tokenizer_name_or_path=tokenizer_dir,
        )

    def merge(self, base, adapter_dir: Path):
        where = "in every layer's key/value cache" if self.type == "prefix" else "in front of every input"
        raise NotMergeable(
            f"{self.type} tuning adds trained virtual tokens {where}; they are extra sequence positions, "
            "not a change of any weight, so there is nothing to fold into the base model"
        )


def prefix_from_text(model, tokenizer_dir: str | None, text: str, n: int) -> torch.Tensor:
    """The key/value cache `model` computes for `text` (its tokens repeated or cut to n), laid out
    as peft's prefix embedding: [n, layers x (key, value) x kv_heads x head_dim]. The keys are
    rotary-encoded for positions 0..n-1, and the real input then starts at position n, so the
    prefix is exactly the text's cache."""
    import torch
    from transformers import AutoTokenizer

    if not tokenizer_dir:
        raise ValueError("prefix init_text needs the base model's tokenizer next to its weights")
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prefix init_text {text!r} has no tokens")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([ids], device=device), use_cache=True).past_key_values
    model.train(was_training)
    per_layer = []
    for layer in cache.layers:  # keys/values: [1, kv_heads, n, head_dim]
        per_layer += [layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)]  # [n, kv_heads, head_dim]
    return torch.stack(per_layer, dim=1).reshape(n, -1)


register(LoraOptions("dora", option="use_dora", fsdp=True), spec=LoraVariantSpec)
register(LoraOptions("rslora", option="use_rslora", fsdp=True), spec=LoraVariantSpec)
register(LoraPlus("lora_plus", fsdp=True), spec=LoraPlusSpec)
register(LoraFA("lora_fa", fsdp=True), spec=LoraVariantSpec)
register(Vera("vera"), spec=VeraSpec)
register(IA3("ia3"), spec=IA3Spec)
register(PromptLearning("prefix"), spec=PromptLearningSpec)
register(PromptLearning("prompt"), spec=PromptLearningSpec)
