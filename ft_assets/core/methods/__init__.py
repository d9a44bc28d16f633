"""The registry of fine-tuning methods.

A method says how to turn a loaded base model into a trainable one, which parameters the
optimizer sees (and at what learning rate), how to save what was trained, how to load it
back for evaluation, and whether (and how) it can be merged into the base weights.

Each family lives in its own small module and registers itself here by `type` name; the
training loop (`core.train`) only talks to this interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch


class NotMergeable(Exception):
    """Raised by `merge` for methods whose trained state cannot be folded into base weights."""


class Method(Protocol):
    type: str
    uses_quantized_base: bool  # trains on `quantized_base` instead of `base_model`
    # how `merge` makes its weights, which sets the rounding `core.merge.compare` accepts:
    # "copy" (the trained tensors themselves), "fold" (computed from base and adapter), "none"
    merge_rounding: str

    def wrap(self, model: torch.nn.Module, spec: Any, *, gradient_checkpointing: bool = False) -> torch.nn.Module:
        """Freeze/replace what the method needs; returns the model to train."""

    def param_groups(self, model: torch.nn.Module, spec: Any, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups (lets a method set per-group learning rates)."""

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        """Write the trained state (safetensors) so `load` reproduces the trained model."""

    def load(self, base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
        """base + saved state -> the trained model (for evaluation and merge checks)."""

    def merge(self, base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
        """A plain transformers model with the trained state folded in, or raise NotMergeable."""

    # Optional hooks, called by the training loop when a method defines them:
    #   after_step(model, spec)      after every optimizer step (Delta-LoRA moves base weights there)
    #   restore(model, saved_dir)    load a checkpoint written by `save` into the live model; without
    #                                it the loop copies saved tensors onto same-named parameters


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.type] = method
    return method


def get_method(type_name: str) -> Method:
    if type_name not in REGISTRY:
        raise KeyError(f"unknown method type {type_name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[type_name]


def default_param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Trainable parameters; no weight decay on biases and norms (the usual AdamW practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


from . import lora  # noqa: E402,F401  (registers lora, qlora)
from . import peft_variants  # noqa: E402,F401  (dora, rslora, lora_plus, lora_fa, vera, ia3, prefix, prompt)
from . import full  # noqa: E402,F401  (full, last_layers)
from . import delta_lora  # noqa: E402,F401  (delta_lora)
from . import bottleneck  # noqa: E402,F401  (bottleneck)
from . import dpo  # noqa: E402,F401  (dpo: peft adapter continued with DPO by core.dpo)
