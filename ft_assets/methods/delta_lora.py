"""Delta-LoRA (Zi et al., 2023): LoRA whose frozen base weight also moves.

A and B train as in LoRA (`scale * B A` added to W x). After every optimizer step the base
weight W, which gets no gradient, receives the change of the low-rank product:

    W <- W + delta_lambda * scale * (B_t A_t - B_{t-1} A_{t-1})

so the full-rank weight follows the adapter's direction at no extra memory beyond LoRA (only
the previous A and B are kept, as non-persistent buffers of each adapted layer). The paper
turns LoRA's dropout off, since only then is the product delta a stand-in for W's gradient;
our recipe default is dropout 0. peft has no Delta-LoRA: the adapter is peft's LoRA, the W
update is `after_step`, called by the training loop after each optimizer step.

What is saved: `delta_lora.safetensors` with, per adapted Linear (its name in the plain
transformers model, e.g. `model.layers.0.self_attn.q_proj`): `<name>.weight`, the updated base
weight W' itself, and `<name>.lora_A` / `<name>.lora_B`; plus `delta_lora.json` (rank, alpha,
scale, delta_lambda, the adapted module names). W' is stored rather than the accumulated
Delta W = W' - W0: the two are the same size, Delta W would need W0 kept in memory during
training, and W0 + (W' - W0) rounds back to W' only up to one ulp, whereas copying W' makes
the loaded model bit-identical to the trained one. Loading puts W', A and B onto a fresh base
(every other weight comes from that base). Mergeable: W' + scale * B A.

Recipe keys (`DeltaLoraSpec`): the LoRA keys plus `delta_lambda`; dropout defaults to 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Literal

from pydantic import Field

from . import default_param_groups, register
from .lora import LoraKeys, lora_config

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "delta_lora.safetensors"
CONFIG_FILE = "delta_lora.json"
ADAPTER = "default"


class DeltaLoraSpec(LoraKeys):
    """Delta-LoRA (Zi et al. 2023): the frozen W also receives delta_lambda x the change of scale*B*A.
    Dropout defaults to 0: the paper drops it so the product delta stands for the gradient of W."""

    type: Literal["delta_lora"]
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0  # dropout on the adapter's input (0: the W update needs it off)
    delta_lambda: Annotated[float, Field(ge=0)] = 0.5  # share of the change of s·B·A added to W each step


def lora_linears(model) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name in the plain transformers model, peft LoRA Linear layer) for every adapted Linear."""
    from peft.tuners.lora import Linear as LoraLinear

    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and ADAPTER in module.lora_A:
            yield name.removeprefix("base_model.model."), module


def _remember_product(layer) -> None:
    """Keep this step's A and B: the next step's W update needs B_{t-1} A_{t-1}."""
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    layer.register_buffer("delta_prev_A", a.detach().clone(), persistent=False)
    layer.register_buffer("delta_prev_B", b.detach().clone(), persistent=False)


@dataclass(frozen=True)
class DeltaLoraMethod:
    type: str = "delta_lora"
    uses_quantized_base: bool = False
    fsdp: bool = False
    saves_whole_model: bool = False  # the adapter and the base weights it moved
    merge_rounding: str = "fold"  # moved W + s·B·A computed once

    def wrap(self, model, spec, *, gradient_checkpointing: bool = False):
        from peft import get_peft_model

        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, lora_config(spec))
        model.delta_lambda = spec.delta_lambda  # recorded in delta_lora.json (the update itself reads `spec`)
        self._check_only_linears(model)
        for _, layer in lora_linears(model):
            _remember_product(layer)
        return model

    def param_groups(self, model, spec, lr: float, weight_decay: float) -> list[dict]:
        return default_param_groups(model, lr, weight_decay)

    def after_step(self, model, spec: Any) -> None:
        import torch

        with torch.no_grad():
            for _, layer in lora_linears(model):
                a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                a0, b0 = layer.delta_prev_A, layer.delta_prev_B
                w = layer.get_base_layer().weight
                delta = (b.float() @ a.float() - b0.float() @ a0.float()) * (spec.delta_lambda * layer.scaling[ADAPTER])
                w.add_(delta.to(w.dtype))
                _remember_product(layer)

    # -- saving and loading -------------------------------------------------------------

    def save(self, model, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = model.peft_config[ADAPTER]
        state, names = {}, []
        for name, layer in lora_linears(model):
            names.append(name)
            state[f"{name}.weight"] = layer.get_base_layer().weight.detach().contiguous().cpu()
            state[f"{name}.lora_A"] = layer.lora_A[ADAPTER].weight.detach().contiguous().cpu()
            state[f"{name}.lora_B"] = layer.lora_B[ADAPTER].weight.detach().contiguous().cpu()
        save_file(state, str(out_dir / WEIGHTS_FILE))
        scales = {layer.scaling[ADAPTER] for _, layer in lora_linears(model)}
        (out_dir / CONFIG_FILE).write_text(json.dumps({
            "type": self.type, "r": config.r, "alpha": config.lora_alpha, "scale": scales.pop() if len(scales) == 1 else None,
            "dropout": config.lora_dropout, "delta_lambda": getattr(model, "delta_lambda", None), "modules": names,
        }, indent=2))

    def restore(self, model, saved_dir: Path) -> None:
        """Resume a checkpoint: W', A, B into the live layers, and the 'previous' A, B with them."""
        self._copy(model, Path(saved_dir))

    def load(self, base, adapter_dir: Path):
        from peft import LoraConfig, get_peft_model

        adapter_dir = Path(adapter_dir)
        info = json.loads((adapter_dir / CONFIG_FILE).read_text())
        config = LoraConfig(r=info["r"], lora_alpha=info["alpha"], lora_dropout=info["dropout"],
                            target_modules=info["modules"], task_type="CAUSAL_LM")
        model = get_peft_model(base, config)
        self._copy(model, adapter_dir)
        model.requires_grad_(False)
        return model

    def merge(self, base, adapter_dir: Path):
        return self.load(base, adapter_dir).merge_and_unload()  # W' + scale * B A

    @staticmethod
    def _copy(model, directory: Path) -> None:
        import torch
        from safetensors.torch import load_file

        state = load_file(str(directory / WEIGHTS_FILE))
        layers = dict(lora_linears(model))
        saved = {k.rsplit(".", 1)[0] for k in state}
        if saved != set(layers):
            raise KeyError(f"{directory} adapts {sorted(saved - set(layers))[:3]} / misses "
                           f"{sorted(set(layers) - saved)[:3]} compared with this model")
        with torch.no_grad():
            for name, layer in layers.items():
                w = layer.get_base_layer().weight
                w.copy_(state[f"{name}.weight"].to(w.dtype))
                for part in ("lora_A", "lora_B"):
                    target = getattr(layer, part)[ADAPTER].weight
                    target.copy_(state[f"{name}.{part}"].to(target.dtype))
                _remember_product(layer)

    @staticmethod
    def _check_only_linears(model) -> None:
        from peft.tuners.lora import LoraLayer, Linear as LoraLinear

        other = [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and not isinstance(m, LoraLinear)]
        if other:
            raise ValueError(f"delta_lora updates Linear weights only; target_modules also matched {other[:3]}")


register(DeltaLoraMethod(), spec=DeltaLoraSpec)
