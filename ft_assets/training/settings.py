"""`TrainConfig`: the settings one training run reads: the recipe's `training:` keys
(`from_spec`, unknown keys dropped) plus what the launcher sets (world size, packed-attention
mode). Plain data; nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TrainConfig:
    max_steps: int
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"
    checkpoint_every: int = 20
    log_every: int = 1
    gradient_checkpointing: bool = False
    packing: bool = True  # pack each micro-batch (same rows, same loss; no padding)
    group_by_length: bool = False  # unpacked path: rows of similar length share a micro-batch
    loss: str = "auto"  # "auto" | "chunked": LM head + CE on labelled rows, chunked; "plain": model logits
    compile: bool | None = None  # torch.compile the decoder layers; None/False: off (see prepared.compile_layers)
    seed: int = 42
    # validation-based selection: hold out this fraction of the training rows, measure their loss
    # every `validation_every` steps, end with the weights of the best measurement; stop after
    # `early_stopping_patience` measurements without improvement (None: train to the end)
    validation_fraction: float = 0.0
    validation_every: int = 10
    early_stopping_patience: int | None = None
    # not recipe keys: how packed attention is enforced ("auto" | "varlen" | "flash" | "mask", see
    # training.packing) and the row budget of the "mask" mode
    pack_attention: str = "auto"
    pack_max_tokens: int | None = None
    # not a recipe key: processes training together (data parallel); a step takes
    # batch_size x grad_accum rows on each of them. Set by the launcher (`ft_assets.jobs.train`).
    world_size: int = 1

    @classmethod
    def from_spec(cls, spec: Any, seed: int) -> "TrainConfig":
        fields = {k: v for k, v in spec.model_dump().items() if k in cls.__dataclass_fields__}
        return cls(**fields, seed=seed)
