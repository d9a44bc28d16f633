"""Continual learning: continue a method from its previous adapter version when the data changes.

`pick_start` decides where a run starts, from manifests only (no Dagster, no store):

- no previous version, or one trained on another base model, or with other method settings
  (a different rank cannot be loaded into this adapter)     -> from scratch;
- a previous version trained on a different `sft_dataset`   -> continue from it (new data);
- a previous version trained on this same `sft_dataset`     -> start where *that* run started
  (its own `continued_from`, or scratch): re-materializing with unchanged data repeats the same
  run instead of training the adapter further each time.

`load_state` puts a saved adapter's trained tensors into a freshly wrapped model (the same
route a checkpoint resume takes), so the training loop starts at the previous adapter's loss.
`replay_rows` draws `fraction` of the previous train split (rows not in the new one), seeded.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..data.rows import Example

# Method keys that do not change the adapter's shape (so a previous version stays loadable).
NON_STRUCTURAL_KEYS = ("training", "continue_from", "replay_fraction", "dropout")


@dataclass(frozen=True)
class Start:
    """Where a `continue_from: previous` run starts. `adapter_*` None: from scratch."""

    reason: str
    adapter_version: str | None = None
    adapter_path: str | None = None
    previous_sft_dataset: str | None = None  # the data the adapter we continue from was trained on

    @property
    def from_scratch(self) -> bool:
        return self.adapter_version is None


def structural(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in NON_STRUCTURAL_KEYS}


def pick_start(previous: dict[str, Any] | None, previous_path: str | None, *, sft_dataset: str, base_model: str,
               spec: dict[str, Any], manifest_of: Callable[[str], tuple[dict[str, Any], str] | None]) -> Start:
    """`previous`: the latest adapter manifest of this method (None if none); `manifest_of(version)`
    finds another version of it (manifest, path), or None if it is gone."""
    if previous is None:
        return Start("no previous adapter version of this method: training from scratch")
    inputs = previous.get("inputs", {})
    if inputs.get("base_model") != base_model:
        return Start(f"previous version {previous['version']} was trained on another base_model: from scratch")
    prev_spec = previous.get("method", {}).get("spec", {})
    if structural(prev_spec) != structural(spec):
        return Start(f"previous version {previous['version']} has other method settings "
                     f"({structural(prev_spec)} vs {structural(spec)}): from scratch")
    if inputs.get("sft_dataset") != sft_dataset:
        return Start(f"data changed (sft_dataset {inputs.get('sft_dataset')} -> {sft_dataset}): continuing "
                     f"from adapter version {previous['version']}", previous["version"], previous_path,
                     inputs.get("sft_dataset"))
    # Same data as the previous version: repeat the run that produced it.
    earlier = (previous.get("continual") or {}).get("continued_from")
    if not earlier:
        return Start(f"previous version {previous['version']} was trained on this same data from scratch: "
                     "training from scratch again")
    found = manifest_of(earlier["version"])
    if found is None:
        return Start(f"adapter version {earlier['version']} that the previous run continued from is gone: "
                     "training from scratch")
    manifest, path = found
    return Start(f"data unchanged since version {previous['version']}: repeating its continuation from "
                 f"adapter version {earlier['version']}", earlier["version"], path,
                 manifest.get("inputs", {}).get("sft_dataset"))


def load_state(model: torch.nn.Module, method, adapter_dir: Path) -> int:
    """Copy a saved adapter's tensors into `model` (already wrapped by `method`). Returns how many."""
    adapter_dir = Path(adapter_dir)
    restore = getattr(method, "restore", None)
    if restore is not None:  # methods that know their own saved layout (peft variants, full, delta-lora)
        restore(model, adapter_dir)
        return sum(1 for p in model.parameters() if p.requires_grad)
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(adapter_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if hasattr(model, "peft_config"):  # peft names drop the adapter name; peft maps them back
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise RuntimeError(f"{adapter_dir} has tensors this model lacks: {result.unexpected_keys[:5]}")
        return len(state)
    params = dict(model.named_parameters())
    loaded = 0
    with torch.no_grad():
        for name, tensor in state.items():
            if name in params:
                params[name].copy_(tensor.to(params[name].dtype))
                loaded += 1
    trainable = [n for n, p in params.items() if p.requires_grad]
    missing = [n for n in trainable if n not in state]
    if missing:
        raise RuntimeError(f"{adapter_dir} lacks trained tensors {missing[:5]}; cannot continue from it")
    return loaded


def _row_key(e: Example) -> str:
    parts = [e.task, e.question, e.context or "", e.answer]
    if e.messages is not None:  # conversations that end alike differ in their earlier turns
        parts.append(json.dumps(e.messages, sort_keys=True))
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def replay_rows(old_train: list[Example], new_train: list[Example], fraction: float, seed: int) -> list[Example]:
    """round(fraction x |old train split|) old rows that the new split lacks, in a seeded draw."""
    if fraction <= 0 or not old_train:
        return []
    new_keys = {_row_key(e) for e in new_train}
    seen, candidates = set(), []
    for e in old_train:  # a mixture may repeat rows: replay each old row at most once
        k = _row_key(e)
        if k not in new_keys and k not in seen:
            seen.add(k)
            candidates.append(e)
    n = min(len(candidates), round(fraction * len(old_train)))
    order = list(range(len(candidates)))
    random.Random(f"{seed}:replay").shuffle(order)
    return [candidates[i] for i in sorted(order[:n])]
