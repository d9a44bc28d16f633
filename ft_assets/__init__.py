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

transformers imports scikit-learn and SciPy when a model class is first loaded, only for assisted
generation's confidence-threshold tuning (`generation.candidate_generator`) and object-detection
losses (`loss.loss_for_object_detection`), neither of which ft_assets uses: 1.5 to 2.5 CPU-seconds
in every process that loads a model (each training rank, each Dagster step; ../shared/NOTES.md).
`_TransformersWithoutSciPy` makes transformers see both as absent; lm-eval, which computes some
metrics with scikit-learn, imports it itself when it needs it.
"""

import importlib.machinery
import logging
import sys


def _drop_unused_kernel_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_unused_kernel_warning)


class _TransformersWithoutSciPy:
    """An import hook: once `transformers.utils.import_utils` has run, its `is_sklearn_available`
    and `is_scipy_available` say False (the module doc). A later transformers without them is left
    as it is."""

    target = "transformers.utils.import_utils"

    def find_spec(self, name, path, target=None):
        if name != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                for check in ("is_sklearn_available", "is_scipy_available"):
                    if hasattr(module, check):
                        setattr(module, check, lambda: False)
            spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _TransformersWithoutSciPy) for f in sys.meta_path):
    sys.meta_path.insert(0, _TransformersWithoutSciPy())

# The composition root: the method families and the evaluator kinds register their recipe specs
# with the configuration (config.method_spec, config.evaluator_spec) on import, so a recipe
# validates whichever module loads it first.
from . import methods  # noqa: E402,F401
from .evaluation import evaluators  # noqa: E402,F401
