"""ft_assets: LLM fine-tuning as Dagster software-defined assets, declared by a YAML recipe.

The folders are the architecture; imports go one way (pyproject.toml's import-linter contracts,
checked inside `make test`):

    cli -> defs -> jobs -> {trainers : evaluation : publish} -> training -> {methods : data : models} -> config

`artifacts/` (the versioned store) is used by `defs/` and `cli/` only. Importing this package
starts nothing and pulls in neither torch nor Dagster.

bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" when it is
imported on a CPU with AVX512_BF16. That kernel only serves the bfloat16 inference path that
`models.quantize.exact_nf4_kernels` turns off, so the message is dropped here, before any module
of the package imports bitsandbytes.
"""

import logging


def _drop_unused_kernel_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_unused_kernel_warning)

# The composition root: the method families and the evaluator kinds register their recipe specs
# with the configuration (config.method_spec, config.evaluator_spec) on import, so a recipe
# validates whichever module loads it first.
from . import methods  # noqa: E402,F401
from .evaluation import evaluators  # noqa: E402,F401
