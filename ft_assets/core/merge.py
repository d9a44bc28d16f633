"""Fold a trained adapter into base weights, and check the result is the same function.

QLoRA adapters are merged into the dequantized NF4 weights in float32 (what the adapter was
trained against), never into 4-bit weights. Methods that cannot merge raise NotMergeable.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import Example
from .methods import Method
from .models import load_model
from .quantize import dequantized, load_quantized
from .train import collate


def merged(method: Method, base_dir: Path, adapter_dir: Path, quantized_dir: Path | None, device: str):
    base = dequantized(quantized_dir, device) if method.uses_quantized_base else load_model(base_dir, device)
    return method.merge(base, adapter_dir)


def unmerged(method: Method, base_dir: Path, adapter_dir: Path, quantized_dir: Path | None, device: str):
    """base + adapter as trained (the reference the merged model must reproduce)."""
    if method.uses_quantized_base:
        base = load_quantized(quantized_dir, device, torch.float32)
    else:
        base = load_model(base_dir, device)
    return method.load(base, adapter_dir)


@torch.inference_mode()
def max_logit_difference(a, b, examples: list[Example], pad_id: int, device: str) -> float:
    """Largest |logit_a - logit_b| over the real (non-padding) positions of `examples`."""
    a.eval()
    b.eval()
    batch = collate(examples, pad_id, device)
    la = a(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    lb = b(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    n = batch["input_ids"].size(1)  # prompt tuning returns its virtual tokens' logits first: compare the real ones
    la, lb = la[:, -n:], lb[:, -n:]
    mask = batch["attention_mask"].bool()
    return float((la - lb).abs()[mask].max())
