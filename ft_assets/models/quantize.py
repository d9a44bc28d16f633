"""Quantize a base model with bitsandbytes and save it as a normal checkpoint.

NF4 with double quantization is QLoRA's storage format: 4-bit NormalFloat weights whose
per-block scales are themselves quantized to 8 bits. `save_pretrained` writes the packed
weights and their quantization state to safetensors; `from_pretrained(path)` reads them back
(the quantization config travels in config.json).

Numerics: every 4-bit model we build computes `x @ dequantize_nf4(W).T` in its compute dtype,
in training and in evaluation, on every CPU. bitsandbytes 0.50 would otherwise switch an NF4
layer, the first time it runs in eval mode without grad on a CPU with AVX512_BF16, to a
repacked layout whose kernel rounds activations and block scales to bfloat16 (8 mantissa
bits, so about 0.4 % of the output scale), and it keeps that layout for later training steps.
`exact_nf4_kernels` turns that switch off, so an evaluation is the function that was trained.
"""

from __future__ import annotations

from pathlib import Path

import torch


def compute_dtype(name: str, device: str) -> torch.dtype:
    """`auto`: bf16 on CUDA (what NF4 kernels are fast at), float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def bnb_config(method: str, double_quant: bool, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if method == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization method {method!r}")


def quantize(base_dir: Path, out_dir: Path, method: str, double_quant: bool, compute_dtype: torch.dtype, device: str):
    """Load `base_dir` quantized, save it to `out_dir`, return the quantized model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=bnb_config(method, double_quant, compute_dtype),
        dtype=compute_dtype, device_map={"": device}, use_safetensors=True,
    )
    exact_nf4_kernels(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return model


def load_quantized(path: Path, device: str, compute_dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype, device_map={"": device}, use_safetensors=True)
    return exact_nf4_kernels(model)


def exact_nf4_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """Keep every 4-bit layer on the dequantize-then-matmul path (see the module docstring).

    `support_avx512bf16_for_cpu` is the public flag `Linear4bit.forward` reads before repacking
    for the bfloat16 CPU kernel; each layer sets it from the CPU's features when it is built.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def dequantized(path: Path, device: str) -> torch.nn.Module:
    """The 4-bit checkpoint's weights, dequantized into a fresh float32 model (for merging).

    A fresh model (not `model.dequantize()` in place) because a model loaded from a quantized
    checkpoint keeps its load-time weight conversions, and `save_pretrained` cannot undo those.
    """
    import copy

    from transformers import AutoModelForCausalLM

    q = load_quantized(path, device, torch.float32).dequantize()
    state = {k: v.to(torch.float32) for k, v in q.state_dict().items()}
    config = copy.deepcopy(q.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    model.generation_config = q.generation_config
    return model.to(device)
