"""The code location: the recipe ($FT_RECIPE, default `recipes/default.yaml`) turned into assets.

    raw/<dataset> -> sft_dataset <- base_model -> quantized_base
                        \\-> adapter[method] -> merged_model[method] -> eval_report[method]
                        \\-> base_eval ----------------------------------^
"""

from __future__ import annotations

import dagster as dg

from .defs import adapters, datasets, models, raw, reports
from .defs.resources import ArtifactIOManager, ComputeResource, StoreResource
from .recipe import Recipe, load_recipe
from .store import ft_home


def build_definitions(recipe: Recipe, home: str | None = None) -> dg.Definitions:
    home = str(home or ft_home())
    assets = [
        *raw.build(recipe),
        *models.build(recipe),
        *datasets.build(recipe),
        *adapters.build(recipe),
        *reports.build(recipe),
    ]
    return dg.Definitions(
        assets=assets,
        resources={
            "compute": ComputeResource(device=recipe.compute.device, threads=recipe.compute.threads),
            "store": StoreResource(home=home),
            "io_manager": ArtifactIOManager(home=home),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_recipe())
