"""The code location: the recipe ($FT_RECIPE, default `recipes/default.yaml`) turned into assets.

    raw/<dataset> ─> sft_dataset <─ base_model ─> quantized_base
    recipe/method[m] ─> adapter[m] ─> merged_model[m] ─> eval_report[m] ─> leaderboard
                                                 base_eval ─┘        └─> model_card[m]
                      (model_card[m] also reads merged_model[m], adapter[m], base_model, sft_dataset)

and, when the recipe asks for them:

    raw/<preferences> ─> preference_dataset[d] ─> preference_adapter[d] ─> merged_model[d] ─> eval_report[d]
                               adapter[sft_from of d] ─┘                  (d: each dpo method; eval_report[d]
                                                                    also reads adapter[sft_from], its reference)
    merged_model[teacher] ─> student                                           (distillation)
    merged_model[m] ─> gguf_model[m]                          (export.gguf: GGUF files + Ollama Modelfile)
    adapter[m@k=v...] (every trial of m's sweep) ─> best_adapter[m]            (sweeps)

plus the automation sensor (eager reruns), the dead-runs sensor (`ft_assets.runs`), and the
retraining schedule when the recipe has one. Launched runs use `runs.worker_executor` (Dagster's
multiprocess executor that records its worker process).
"""

from __future__ import annotations

import dagster as dg

from . import runs
from .defs import adapters, automation, cards, datasets, distill, export, models, preferences, raw, reports, sweeps
from .defs.resources import ArtifactIOManager, ComputeResource, StoreResource
from .recipe import Recipe, load_recipe
from .store import store_location


def build_definitions(recipe: Recipe, home: str | None = None) -> dg.Definitions:
    home = store_location(home)
    parts = adapters.methods_partitions(recipe)
    sources = [*raw.build(recipe), automation.recipe_methods_source(recipe, parts)]
    derived = [*models.build(recipe), *datasets.build(recipe), *preferences.build(recipe), *adapters.build(recipe),
               *reports.build(recipe), *cards.build(recipe), *distill.build(recipe), *sweeps.build(recipe),
               *export.build(recipe)]
    condition = automation.derived_condition(recipe)
    if condition is not None:
        derived = dg.map_asset_specs(lambda spec: spec.replace_attributes(automation_condition=condition), derived)
    jobs, schedules = automation.retrain(recipe, adapters.adapter_partitions(recipe))
    return dg.Definitions(
        assets=[*sources, *derived],
        jobs=jobs,
        schedules=schedules,
        sensors=[automation.automation_sensor(), automation.observation_sensor(recipe), runs.dead_runs_sensor()],
        executor=runs.worker_executor,
        resources={
            "compute": ComputeResource(device=recipe.compute.device, threads=recipe.compute.threads),
            "store": StoreResource(home=home),
            "io_manager": ArtifactIOManager(home=home),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_recipe())
