"""Full fine-tuning and last-layers transfer learning: train (some of) the model's own weights.

- `full`: every weight trains (with tied embeddings, the one shared embedding/LM-head matrix
  trains once). Saved as a complete transformers checkpoint (`config.json` +
  `model*.safetensors`); "merging" is the trained model itself.
- `last_layers` (classic transfer learning, e.g. Howard & Ruder 2018; Yosinski et al. 2014):
  the bottom of the network is a frozen feature extractor; only the top `n_layers` decoder
  blocks, the final norm and the LM head train.

Tied head. SmolLM2 ties `lm_head.weight` to the input embeddings (one matrix). Training that
matrix would also change the input embeddings at the very bottom of the network, which is
exactly what transfer learning keeps frozen. So `last_layers` *unties* the head: it gets its
own copy of the embedding matrix (same values, so the wrapped model starts identical to the
base), which trains while the input embeddings stay frozen, and the config says
`tie_word_embeddings: false` from then on. Cost: one extra vocab x hidden matrix (28M
parameters for SmolLM2-135M), saved with the adapter and present in the merged model.

What `last_layers` saves: `last_layers.safetensors` (the trained tensors under their model
names: the top blocks, the final norm, `lm_head.weight`) + `last_layers.json`. Loading unties
a fresh base's head and copies them in; merging is the same (the result is a plain,
untied transformers model).

Recipe keys: `full` has only the shared ones (`FullSpec`); `last_layers` adds `n_layers`
(`LastLayersSpec`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from . import default_param_groups, register
from ..config.method_spec import MethodSpecBase

if TYPE_CHECKING:
    import torch

LAST_LAYERS_FILE = "last_layers.safetensors"
LAST_LAYERS_CONFIG = "last_layers.json"


class FullSpec(MethodSpecBase):
    """Full fine-tuning: every weight trains."""

    type: Literal["full"]


class LastLayersSpec(MethodSpecBase):
    """Transfer learning: only the top `n_layers` decoder blocks, the final norm and an untied LM head train."""

    type: Literal["last_layers"]
    n_layers: Annotated[int, Field(ge=1)] = 2  # top decoder blocks that train


def _checkpointing(model, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    state: dict[str, torch.Tensor] = {}
    for f in files:  # a large model is saved in shards
        state.update(load_file(str(f)))
    return state


def copy_into(model: torch.nn.Module, state: dict[str, torch.Tensor], *, allowed_missing: set[str] = frozenset()) -> list[str]:
    """Copy every saved tensor into the parameter or buffer of the same name (an unknown name is an
    error); return the names of parameters the state did not cover, less `allowed_missing`."""
    import torch

    live = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = sorted(set(state) - set(live))
    if unknown:
        raise KeyError(f"saved tensors not in the model: {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            live[name].copy_(tensor.to(live[name].dtype))
    missing = sorted(set(dict(model.named_parameters())) - set(state) - set(allowed_missing))
    return missing


def decoder_layers(model) -> torch.nn.ModuleList:
    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `model.layers` (a decoder-only transformers model is needed)")
    return layers


def untie_lm_head(model) -> None:
    """Give the LM head its own weight (a copy of the embedding matrix) and record it in the config."""
    import torch

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is emb.weight:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    model.all_tied_weights_keys = {}  # transformers' record of tied names (save_pretrained drops those)


@dataclass(frozen=True)
class FullMethod:
    type: str = "full"
    uses_quantized_base: bool = False
    fsdp: bool = True  # compute.parallel fsdp shards it (FSDP2)
    saves_whole_model: bool = True  # every weight: sharded, it is gathered whole (`Ranks.save_full`)
    merge_rounding: str = "copy"  # the trained tensors are the merged model

    def wrap(self, model, spec, *, gradient_checkpointing: bool = False):
        _checkpointing(model, gradient_checkpointing)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def param_groups(self, model, spec, lr: float, weight_decay: float) -> list[dict]:
        return default_param_groups(model, lr, weight_decay)

    def save(self, model, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def restore(self, model, saved_dir: Path) -> None:
        self._copy_checkpoint(model, saved_dir)

    def load(self, base, adapter_dir: Path):
        self._copy_checkpoint(base, adapter_dir)
        return base

    def merge(self, base, adapter_dir: Path):
        return self.load(base, adapter_dir)  # the trained model is its own merge

    @staticmethod
    def _copy_checkpoint(model, directory: Path) -> None:
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})  # lm_head.weight is not saved when tied
        missing = copy_into(model, _read_safetensors_dir(directory), allowed_missing=tied)
        if missing:
            raise KeyError(f"{directory} lacks weights for {missing[:5]}")


@dataclass(frozen=True)
class LastLayersMethod:
    type: str = "last_layers"
    uses_quantized_base: bool = False
    fsdp: bool = False
    saves_whole_model: bool = False  # the trained layers only
    merge_rounding: str = "copy"  # the trained tensors are the merged model

    def wrap(self, model, spec, *, gradient_checkpointing: bool = False):
        layers = decoder_layers(model)
        if spec.n_layers > len(layers):
            raise ValueError(f"n_layers={spec.n_layers} but the model has only {len(layers)} decoder layers")
        _checkpointing(model, gradient_checkpointing)
        if gradient_checkpointing:
            model.enable_input_require_grads()  # the frozen bottom gives checkpointed blocks no grad input otherwise
        untie_lm_head(model)
        model.requires_grad_(False)
        for module in (*layers[len(layers) - spec.n_layers:], model.model.norm, model.get_output_embeddings()):
            module.requires_grad_(True)
        return model

    def param_groups(self, model, spec, lr: float, weight_decay: float) -> list[dict]:
        return default_param_groups(model, lr, weight_decay)

    def save(self, model, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        n_layers = len(decoder_layers(model))
        top = sorted({int(n.split(".")[2]) for n in state if n.startswith("model.layers.")})
        save_file(state, str(out_dir / LAST_LAYERS_FILE))
        (out_dir / LAST_LAYERS_CONFIG).write_text(json.dumps(
            {"type": self.type, "n_layers": len(top), "trained_layers": top, "total_layers": n_layers,
             "untied_lm_head": True, "tensors": sorted(state)}, indent=2))

    def load(self, base, adapter_dir: Path):
        from safetensors.torch import load_file

        adapter_dir = Path(adapter_dir)
        info = json.loads((adapter_dir / LAST_LAYERS_CONFIG).read_text())
        if info["total_layers"] != len(decoder_layers(base)):
            raise ValueError(f"{adapter_dir} was trained on a {info['total_layers']}-layer model, "
                             f"this base has {len(decoder_layers(base))}")
        untie_lm_head(base)
        copy_into(base, load_file(str(adapter_dir / LAST_LAYERS_FILE)))
        return base

    def merge(self, base, adapter_dir: Path):
        return self.load(base, adapter_dir)  # the trained tensors replace the base's: a plain model


register(FullMethod(), spec=FullSpec)
register(LastLayersMethod(), spec=LastLayersSpec)
