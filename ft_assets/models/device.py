"""Pick the compute device and dtype: bf16 autocast on CUDA, float32 on CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Compute:
    device: str
    dtype: torch.dtype  # dtype models are loaded in
    autocast_dtype: torch.dtype | None  # mixed precision for training/eval, None on CPU

    @property
    def name(self) -> str:
        return torch.cuda.get_device_name(0) if self.device.startswith("cuda") else "cpu"


def resolve(device: str = "auto", threads: int | None = None) -> Compute:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("compute.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if threads:
        torch.set_num_threads(threads)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        return Compute("cuda", torch.float32, torch.bfloat16)
    return Compute("cpu", torch.float32, None)
