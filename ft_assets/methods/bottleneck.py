"""Bottleneck adapters (Houlsby et al., 2019), written out in plain PyTorch.

Each decoder block gets two small adapters, one on the output of its attention sublayer and
one on the output of its MLP sublayer, each applied before the block adds its residual:

    h  ->  h + up(act(down(h)))      down: hidden -> d,  up: d -> hidden,  d = hidden // reduction_factor

`up` starts at zero (weight and bias), so the wrapped model computes exactly what the base
computes until training moves it. Only the adapters train: 2 * hidden * d + d + hidden
parameters each, two per layer. The adapters are child modules named `bottleneck_adapter`
of `self_attn` and `mlp`, applied by forward hooks, so the base model's own parameter names
and forward code stay untouched.

What is saved: `bottleneck.safetensors` (the adapters' weights under their model names) +
`bottleneck.json` (hidden size, bottleneck size, non-linearity, layers); loading
attaches fresh adapters to a base and copies the weights in. Not mergeable: the non-linearity
between `down` and `up` cannot be folded into the neighbouring linear weights.

Recipe keys (`BottleneckSpec`): `reduction_factor`, `non_linearity`. The adapter's
`torch.nn.Module` class is made on first use (`adapter_class`), so that importing this module,
which the recipe does for its spec, does not import torch.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from . import NotMergeable, default_param_groups, register
from .full import copy_into, decoder_layers
from ..config.method_spec import MethodSpecBase

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "bottleneck.safetensors"
CONFIG_FILE = "bottleneck.json"


class BottleneckSpec(MethodSpecBase):
    """Houlsby bottleneck adapters (Houlsby et al. 2019) after each attention and MLP sublayer."""

    type: Literal["bottleneck"]
    reduction_factor: Annotated[int, Field(ge=1)] = 16  # bottleneck width = hidden size / this
    non_linearity: Literal["relu", "gelu", "silu"] = "relu"  # activation between the down and up projections


@functools.cache
def adapter_class() -> type[torch.nn.Module]:
    """`BottleneckAdapter(hidden, dim, non_linearity)`: h -> h + up(act(down(h)))."""
    import torch

    activations = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}

    class BottleneckAdapter(torch.nn.Module):
        def __init__(self, hidden: int, dim: int, non_linearity: str):
            super().__init__()
            self.non_linearity = non_linearity
            self.down = torch.nn.Linear(hidden, dim)
            self.act = activations[non_linearity]()
            self.up = torch.nn.Linear(dim, hidden)
            torch.nn.init.zeros_(self.up.weight)  # starts as the identity
            torch.nn.init.zeros_(self.up.bias)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return h + self.up(self.act(self.down(h)))

    return BottleneckAdapter


def _after_attention(module, args, output):
    # attention returns (hidden_states, attention_weights)
    return (module.bottleneck_adapter(output[0]), *output[1:])


def _after_mlp(module, args, output):
    return module.bottleneck_adapter(output)


def attach_adapters(model, dim: int, non_linearity: str) -> list[torch.nn.Module]:
    hidden = model.config.hidden_size
    ref = model.get_input_embeddings().weight
    adapters = []
    for layer in decoder_layers(model):
        for sublayer, hook in ((layer.self_attn, _after_attention), (layer.mlp, _after_mlp)):
            if hasattr(sublayer, "bottleneck_adapter"):
                raise ValueError("this model already has bottleneck adapters")
            sublayer.bottleneck_adapter = adapter_class()(hidden, dim, non_linearity).to(ref.device, ref.dtype)
            sublayer.register_forward_hook(hook)
            adapters.append(sublayer.bottleneck_adapter)
    return adapters


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if ".bottleneck_adapter." in n}


@dataclass(frozen=True)
class BottleneckMethod:
    type: str = "bottleneck"
    uses_quantized_base: bool = False
    fsdp: bool = False
    saves_whole_model: bool = False  # the bottleneck modules' tensors only
    merge_rounding: str = "none"

    def wrap(self, model, spec, *, gradient_checkpointing: bool = False):
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        hidden = model.config.hidden_size
        dim = hidden // spec.reduction_factor
        if dim < 1:
            raise ValueError(f"reduction_factor {spec.reduction_factor} leaves no bottleneck for hidden size {hidden}")
        model.requires_grad_(False)
        attach_adapters(model, dim, spec.non_linearity)  # the new modules require grad
        return model

    def param_groups(self, model, spec, lr: float, weight_decay: float) -> list[dict]:
        return default_param_groups(model, lr, weight_decay)

    def save(self, model, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(adapter_state(model), str(out_dir / WEIGHTS_FILE))
        first = decoder_layers(model)[0].mlp.bottleneck_adapter
        (out_dir / CONFIG_FILE).write_text(json.dumps({
            "type": self.type, "hidden_size": first.down.in_features, "bottleneck_dim": first.down.out_features,
            "non_linearity": first.non_linearity, "layers": len(decoder_layers(model)),
            "positions": ["after self_attn output", "after mlp output"],
        }, indent=2))

    def load(self, base, adapter_dir: Path):
        from safetensors.torch import load_file

        adapter_dir = Path(adapter_dir)
        info = json.loads((adapter_dir / CONFIG_FILE).read_text())
        if info["hidden_size"] != base.config.hidden_size or info["layers"] != len(decoder_layers(base)):
            raise ValueError(f"{adapter_dir} was trained for hidden size {info['hidden_size']} and "
                             f"{info['layers']} layers; this base differs")
        attach_adapters(base, info["bottleneck_dim"], info["non_linearity"])
        missing = copy_into(base, load_file(str(adapter_dir / WEIGHTS_FILE)))
        missing = [n for n in missing if ".bottleneck_adapter." in n]
        if missing:
            raise KeyError(f"{adapter_dir} lacks adapter weights {missing[:3]}")
        base.requires_grad_(False)
        return base

    def merge(self, base, adapter_dir: Path):
        raise NotMergeable(
            "bottleneck adapters apply a non-linearity between their down and up projections, so "
            "h + up(act(down(h))) is not a linear map and cannot be folded into the base weights"
        )


register(BottleneckMethod(), spec=BottleneckSpec)
