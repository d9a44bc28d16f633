"""`training:`: the hyper-parameters shared by every method (a method may override any of them
under `methods.<name>.training`). Read by the training loop. `TrainingOverrides` is the type of
every section's `training:` overrides (methods, reward models, policies, distillation): a mapping
of some of these keys, each checked as TrainingSpec checks it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from .strict import Strict


class TrainingSpec(Strict):
    """Hyper-parameters shared by every method; a method may override any of them."""

    _OMIT_WHEN_DEFAULT = ("validation_fraction", "validation_every", "early_stopping_patience")

    max_steps: Annotated[int, Field(ge=1)] = 40  # optimizer steps at most
    epochs: Annotated[float, Field(gt=0)] = 1.0  # upper bound; max_steps usually stops first
    batch_size: Annotated[int, Field(ge=1)] = 4  # rows per micro-batch
    grad_accum: Annotated[int, Field(ge=1)] = 1  # micro-batches per optimizer step
    lr: Annotated[float, Field(gt=0, lt=1)] = 2e-4  # peak learning rate
    weight_decay: Annotated[float, Field(ge=0)] = 0.0  # AdamW weight decay (not on biases and norms)
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1  # share of the steps spent warming the learning rate up
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # learning-rate schedule after warmup
    max_grad_norm: Annotated[float, Field(gt=0)] | None = 1.0  # clip the gradient norm to this; null: no clipping
    optimizer: Literal["adamw", "paged_adamw_8bit", "adamw_8bit"] = "adamw"  # optimizer (8-bit ones from bitsandbytes)
    checkpoint_every: Annotated[int, Field(ge=1)] = 20  # steps between checkpoints (a re-run resumes from the last)
    log_every: Annotated[int, Field(ge=1)] = 1  # steps between loss log lines
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, slower)
    # Speed switches (same rows per step, same loss up to float rounding; see training/packing.py, training/loss.py).
    packing: bool = True  # micro-batch rows end to end, no padding; prompt/prefix tuning fall back to padding
    group_by_length: bool = False  # padded path: rows of similar length share a micro-batch (changes the order)
    loss: Literal["auto", "plain", "chunked"] = "auto"  # auto/chunked: LM head on labelled rows only, in chunks
    compile: bool | None = None  # torch.compile the decoder layers (opt-in; null = off: no faster on an H200, ~90 s to compile)
    # Validation-based selection (off by default): hold out this fraction of the training rows
    # (never the eval split), measure their loss every `validation_every` steps, end with the
    # weights of the best measurement (`kept_step` in the adapter's metadata).
    validation_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.0  # training rows held out for validation loss; 0: none
    validation_every: Annotated[int, Field(ge=1)] = 10  # steps between validation measurements (and the last step)
    # Stop after this many measurements in a row without a new best (needs validation_fraction).
    early_stopping_patience: Annotated[int, Field(ge=1)] | None = None  # measurements without a new best before stopping; null: never stop early

    @model_validator(mode="after")
    def _patience_needs_validation(self) -> "TrainingSpec":
        if self.early_stopping_patience is not None and not self.validation_fraction:
            raise ValueError("early_stopping_patience needs validation_fraction > 0 (e.g. 0.1): early stopping "
                             "watches the loss on held-out training rows")
        return self


@dataclass(frozen=True)
class OverridesOf:
    """Annotation marker: the mapping holds some keys of `model` (recipe errors list its keys)."""

    model: type


def _known_training_keys(v: dict[str, Any]) -> dict[str, Any]:
    TrainingSpec(**v)  # raises with TrainingSpec's messages for unknown keys and bad values
    return v


# `training:` under a method, a reward model, a policy or distillation: overrides of the recipe's
# `training:` section, kept as the mapping written (its dump, and so every hash, is what the recipe says)
TrainingOverrides = Annotated[dict[str, Any], AfterValidator(_known_training_keys), OverridesOf(TrainingSpec)]
