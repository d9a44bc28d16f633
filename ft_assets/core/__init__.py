"""The ML layer: plain Python over torch, transformers and peft; nothing here imports Dagster.

bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" when it is
imported on a CPU with AVX512_BF16. That kernel only serves the bfloat16 inference path that
`quantize.exact_nf4_kernels` turns off, so the message is dropped here, before any of our
modules imports bitsandbytes.
"""

import logging


def _drop_unused_kernel_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_unused_kernel_warning)
