"""The registry of fine-tuning methods: one module per method family, spec and code together.

A method says how to turn a loaded base model into a trainable one, which parameters the
optimizer sees (and at what learning rate), how to save what was trained, how to load it
back for evaluation, and whether (and how) it can be merged into the base weights. Its spec
(a pydantic class extending `config.method_spec.MethodSpecBase`) says which recipe keys it
takes under `methods.<name>:`.

Contract:
- `register(method, spec=SpecClass)` makes `method.type` a method: the training loop and
  the Dagster assets find it with `get_method(type)` (only through the `Method` interface
  below), and the recipe validates a `methods.<name>` entry of that type against `SpecClass`
  (registered with `config.method_spec.register_spec`, looked up at validation time, so a later
  registration is picked up too). This room imports `config` only; `ft_assets/__init__.py`
  imports it, so every family has registered before any recipe is validated.
- Importing this package imports every family module listed at the bottom, which registers
  itself. It imports neither torch nor peft nor Dagster: every import of `ft_assets` imports
  it, and `python -m ft_assets validate` must stay fast. Method modules therefore import
  torch, peft, safetensors and transformers inside the functions that use them (the one
  rule a new module must follow; `test_recipe.py` checks it).

How to add a method (its module, one import line here, its tests; nothing in recipe.py):
1. Write `methods/<family>.py` with, at module level, only light imports
   (`from __future__ import annotations`, dataclasses, pathlib, pydantic) and:
   - its spec: `class MySpec(MethodSpecBase): type: Literal["my_method"]` plus its keys,
     with defaults and bounds (override `check_in_recipe` / `training_defaults` if needed);
   - its method: an object with the attributes and hooks of `Method` (see `lora.py`,
     `full.py`, `bottleneck.py` for the three shapes: peft config, own weights, own modules);
   - `register(MyMethod("my_method"), spec=MySpec)`.
2. Import the module at the bottom of this file (the order there is the order in which
   recipe errors list the known types).
3. Test it: add it to `SPECS` in `ft_assets_tests/methods/test_methods.py` (the shared tests then
   check that it learns, reloads, merges or says why not, and resumes) and to `METHOD_SPECS` in
   `ft_assets_tests/training/test_packing.py` (packed and lean-loss training equal plain training), and give its defining
   property a test of its own. Add it to `ft_assets/recipes/all_methods.yaml` (the leaderboard).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..config.method_spec import MethodSpecBase, register_spec

if TYPE_CHECKING:
    import torch


class NotMergeable(Exception):
    """Raised by `merge` for methods whose trained state cannot be folded into base weights."""


class Method(Protocol):
    type: str
    uses_quantized_base: bool  # trains on `quantized_base` instead of `base_model`
    fsdp: bool  # compute.parallel fsdp may shard it (FSDP2); else it trains data-parallel (ddp)
    saves_whole_model: bool  # `save` writes every weight of the model (full fine-tuning), not an adapter
    # how `merge` makes its weights, which sets the rounding `evaluation.merge.compare` accepts:
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


REGISTRY: dict[str, Method] = {}  # type -> method


def register(method: Method, *, spec: type[MethodSpecBase]) -> Method:
    """Make `method.type` a method whose recipe entries are validated by `spec` (a
    `MethodSpecBase` subclass whose `type` Literal includes `method.type`; see
    `config.method_spec.register_spec`). Registering a type again replaces it."""
    register_spec(method.type, spec)
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


# Each module registers its methods with their specs; this order is the order of the types
# listed in recipe errors ("known types: ...").
from . import lora  # noqa: E402,F401  (lora, qlora: LoraSpec; LoraKeys for the LoRA family)
from . import peft_variants  # noqa: E402,F401  (dora, rslora, lora_plus, lora_fa, vera, ia3, prefix, prompt)
from . import full  # noqa: E402,F401  (full, last_layers)
from . import delta_lora  # noqa: E402,F401  (delta_lora)
from . import bottleneck  # noqa: E402,F401  (bottleneck)
from . import preference  # noqa: E402,F401  (dpo, orpo, simpo, kto: an SFT adapter continued by trainers.preference)
