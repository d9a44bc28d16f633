"""The model prepared for the training loop: every fact about it looked up once, before the first step.

Contract. `prepare(model, training, objective, device=, pad_id=)` is called once per training run and
returns a `PreparedModel`; the loop then only asks it two things per micro-batch and one at the end:
- `batch(rows)`: the micro-batch of those rows. Packed (`training.packing`) when `training.packing`, the
  objective (`objective.packs`) and the model (`packing.supports_packing`: not prompt/prefix
  tuning) all allow it, in the attention mode decided here (`packing.attention_mode`, or
  `pack_attention`), with the eager-attention mask dtype decided here; else padded.
- `loss_sum(batch)`: the objective's (loss summed over the labelled positions, their count, extra
  sums by name), i.e. `objective.bind(model)`, called here once. For SFT that is `TokenLoss`.
- `release()`: undo what preparing did to the model, in the loop's `finally`.
Preparing changes the model in one way only: with `training.compile` (opt-in, off by default), its
decoder layers are torch.compiled in place (names and state dict unchanged) until `release()`.
It computes exactly what asking the model per batch computed.

`TokenLoss.of(model, loss)` is the SFT loss of one model, its facts looked up once: whether packed
batches are allowed, the config a packed forward routes its attention through, the prompt-tuning
virtual-token offset and, unless `loss` is "plain", the lean head (`lean_head`: body and LM head,
when `head(body(x))` is exactly the model's output, so `training.loss` can apply the head to the
labelled positions only, in chunks). `token_loss_sum(model, batch, loss)` is the same for one
batch (evaluation, tests). Nothing here imports Dagster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import packing as P
from ..data.rows import IGNORE_INDEX, Example
from .distributed import is_sharded
from .loss import linear_cross_entropy_sum
from .objective import LossSum, Objective
from ..config.training import TrainingSpec


# --------------------------------------------------------------------------------------
# the model prepared for the loop
# --------------------------------------------------------------------------------------


@dataclass
class PreparedModel:
    """A model and what the training loop needs of it, decided by `prepare`."""

    model: torch.nn.Module
    pad_id: int
    device: str
    pack_mode: str | None  # "varlen" | "flash" | "mask" (`training.packing`), None: padded micro-batches
    pack_max_tokens: int | None  # row budget of the "mask" mode
    eager_mask_dtype: torch.dtype | None  # "mask" mode under eager attention: the additive mask's dtype
    loss_sum: LossSum  # micro-batch -> (loss sum, labelled positions, extra sums by name)
    compiled_layers: list[torch.nn.Module] = field(default_factory=list)

    def batch(self, rows: list[Example]) -> dict[str, Any]:
        """The micro-batch of `rows`: packed in `pack_mode`, or padded."""
        if self.pack_mode is None:
            return P.collate(rows, self.pad_id, self.device)
        return P.collate_packed(rows, self.pad_id, self.device, self.pack_mode, self.pack_max_tokens,
                                self.eager_mask_dtype)

    def release(self) -> None:
        """Undo the compile: evaluation and generation afterwards run eagerly."""
        uncompile_layers(self.compiled_layers)
        self.compiled_layers = []


def prepare(model, training: TrainingSpec, objective: "Objective", *, device: str, pad_id: int,
            pack_attention: str = "auto", pack_max_tokens: int | None = None) -> PreparedModel:
    """Decide, once, how `model` is fed and scored while training toward `objective` (module docstring).
    `pack_attention` ("auto" | "varlen" | "flash" | "mask") and `pack_max_tokens` (the "mask" mode's
    row budget) force a packed-attention mode (`training.packing`); the loop leaves them at "auto"."""
    packs = training.packing and objective.packs and P.supports_packing(model)
    pack_mode = P.attention_mode(model, pack_attention) if packs else None
    # bound before compiling, so nothing is left to undo if it raises (compiling changes no fact it reads)
    loss_sum = objective.bind(model)
    return PreparedModel(
        model=model, pad_id=pad_id, device=device, pack_mode=pack_mode, pack_max_tokens=pack_max_tokens,
        eager_mask_dtype=P.eager_mask_dtype(model, pack_mode), loss_sum=loss_sum,
        compiled_layers=compile_layers(model, training),
    )


# --------------------------------------------------------------------------------------
# the SFT loss: next-token cross-entropy on the labelled positions
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLoss:
    """Next-token cross-entropy summed over the labelled positions of a micro-batch of `model`.

    Only positions that predict a labelled token go through the LM head: answers are a small part
    of each row, so this skips most of the vocabulary-sized logits (about a fifth of the compute of
    a 135M model, and most of its activation memory).

    With a lean head (`lean_head`, loss "auto"/"chunked") the model body gives hidden states and
    `training.loss` applies the head to exactly the labelled positions, in chunks (Liger on CUDA when
    installed). Without (loss "plain", prompt/prefix tuning, a head that is not a plain Linear,
    logit scaling) the model applies its head to the kept positions (`logits_to_keep`) and
    F.cross_entropy sums. Batches may be padded or packed (`training.packing`)."""

    model: torch.nn.Module
    packable: bool  # `packing.supports_packing`
    attention_config: Any  # the transformers config a packed forward routes its attention through
    lean: tuple[torch.nn.Module, torch.nn.Linear] | None  # (body, LM head), or None: the plain path
    virtual_tokens: int  # prompt tuning: real position p is model position p + this

    @classmethod
    def of(cls, model, loss: str = "plain") -> "TokenLoss":
        """`model`'s token loss; `loss`: "plain", or "auto"/"chunked" (the lean head where exact)."""
        return cls(model=model, packable=P.supports_packing(model), attention_config=P.model_config(model),
                   lean=lean_head(model) if loss != "plain" else None, virtual_tokens=virtual_token_count(model))

    def loss_sum(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """(loss sum, labelled positions, no extra terms): the `training.loop.Objective` form."""
        if batch.get("packed") and not self.packable:
            raise ValueError("prompt/prefix tuning cannot train on packed batches; use collate()")
        targets = batch["labels"][:, 1:]
        kwargs, impl = P.forward_kwargs(batch)
        if self.lean is not None:
            backbone, head = self.lean
            kwargs["use_cache"] = False
            with P.routed_attention(self.attention_config, impl):
                hidden = backbone(**kwargs).last_hidden_state
            labelled = targets != IGNORE_INDEX
            loss_sum = linear_cross_entropy_sum(hidden[:, :-1][labelled], head.weight, head.bias, targets[labelled])
            return loss_sum, int(labelled.sum()), {}
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # positions p predicting p+1
        with P.routed_attention(self.attention_config, impl):
            logits = self.model(**kwargs, logits_to_keep=keep + self.virtual_tokens).logits
        kept_targets = targets[:, keep]
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), kept_targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        return loss, int((kept_targets != IGNORE_INDEX).sum()), {}


def token_loss_sum(model, batch: dict[str, Any], loss: str = "plain") -> tuple[torch.Tensor, int]:
    """(Sum of next-token cross-entropy over the labelled positions of `batch`, how many there were).
    Looks the model's facts up on every call: outside a loop (a loop binds `TokenLoss.of` once)."""
    loss_sum, n_labels, _ = TokenLoss.of(model, loss).loss_sum(batch)
    return loss_sum, n_labels


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def lean_head(model) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(model body, LM head) when `head(body(x))` is exactly what the model computes, else None."""
    if not P.supports_packing(model):  # prompt learning: peft adds virtual tokens / a prefix cache in its forward
        return None
    inner = P.inner_model(model)
    if is_sharded(model) or is_sharded(inner):  # FSDP2: only the root's own forward gathers the head's (and embedding's) shards
        return None
    if "forward" in vars(inner) or not type(inner).__name__.endswith("ForCausalLM"):
        return None  # a patched forward, or not a plain causal LM
    backbone = getattr(inner, getattr(inner, "base_model_prefix", "") or "model", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if backbone is None or type(head) is not torch.nn.Linear or not head.weight.is_floating_point():
        return None  # e.g. a LoRA-wrapped or quantized head
    if head._forward_hooks or head._forward_pre_hooks:
        return None
    config = getattr(inner, "config", None)
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS):
        return None
    return backbone, head


def virtual_token_count(model) -> int:
    """Positions a peft prompt-learning model prepends to the sequence (prompt tuning, p-tuning).
    Prefix tuning puts its virtual tokens in the key/value cache instead: no extra positions."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning or config.peft_type in ("PREFIX_TUNING", "CARTRIDGE"):
        return 0
    return config.num_virtual_tokens


# --------------------------------------------------------------------------------------
# compiled decoder layers
# --------------------------------------------------------------------------------------


def compile_layers(model, training: TrainingSpec) -> list[torch.nn.Module]:
    """torch.compile each decoder layer in place (names and state dicts unchanged) when `training.compile`
    is true. Off by default (None) on every device: measured on an H200 (SmolLM2-135M LoRA, 16 rows
    a step; ft_assets/bench/results/train_throughput_h200_2026-11-30.md) compiling took about 90 s
    of a 105 s run and the compiled steps were no faster (7.3k useful tok/s; the steps stay bound by
    the CPU launching kernels, and the packed per-sample attention splits each layer's graph in two);
    on a few CPU cores it costs minutes. The choice is the recipe's, whatever the device."""
    if not training.compile:
        return []
    layers = getattr(getattr(P.inner_model(model), "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        return []
    for layer in layers:
        layer.compile(dynamic=True)
    return list(layers)


def uncompile_layers(layers: list[torch.nn.Module]) -> None:
    for layer in layers:  # evaluation and generation afterwards run eagerly
        layer._compiled_call_impl = None


@dataclass(frozen=True)
class CrossEntropy:
    """SFT: next-token cross-entropy on the labelled (answer) tokens, `training.prepared.TokenLoss`."""

    loss: str = "auto"  # TrainingSpec.loss: "auto" | "chunked" | "plain"
    packs: bool = True

    def bind(self, model) -> LossSum:
        return TokenLoss.of(model, self.loss).loss_sum
