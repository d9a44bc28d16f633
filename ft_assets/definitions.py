"""The code location: the recipe ($FT_RECIPE, default `recipes/default.yaml`) turned into assets.
$FT_RECIPE may also name several recipes (a directory of them, or paths joined by `:`): each is
then a pipeline of its own in this one code location, its asset keys, groups, jobs, schedules and
sensors prefixed with its name (`finance/adapter`, group `finance_training`) and its artifacts in
its store namespace; the base model read from one file is shared (`ft_assets.artifacts.store`).

    raw/<dataset> ─> sft_dataset <─ base_model ─> quantized_base
    recipe/method[m] ─> adapter[m] ─> merged_model[m] ─> eval_report[m] ─> leaderboard
                                                 base_eval ─┘        └─> champion[m] ─> model_card[m]
                      (champion[m]: the model in use, moved only by a report that passes evaluation.gate;
                       model_card[m] publishes the versions the champion's record names)

and, when the recipe asks for them:

    raw/<preferences> ─> preference_dataset[d] ─> preference_adapter[d] ─> merged_model[d] ─> eval_report[d]
                               adapter[sft_from of d] ─┘                  (d: each preference method; eval_report[d]
                                                                    also reads adapter[sft_from], its reference)
    merged_model[teacher] ─> student                                           (distillation)
    champion[m] ─> gguf_model[m]          (export.gguf: the champion's merged model as GGUF + Ollama Modelfile)
    adapter[m@k=v...] (every trial of m's sweep) ─> best_adapter[m]            (sweeps)
    preference_dataset[r] ─> reward_model[r]                                   (reward models)
    adapter[sft_from of p], reward_model[r] ─> policy_adapter[p]               (policies, GRPO)
    adapter[generator of g], reward_model[r] ─> generated_preferences[g] ─> preference_adapter[d] / reward_model[r]
                                                                  (the hybrid loop: d or r with `pairs: g`)

plus the automation sensor (eager reruns), the dead-runs sensor (`ft_assets.defs.runs`), and the
retraining schedule when the recipe has one. Every run these Definitions execute (the UI, schedules,
sensors, `dagster asset materialize`) uses `runs.worker_executor`: Dagster's multiprocess executor
that records its worker process, marks the processes it starts, and frees the pool slots of dead
runs before and while its steps wait.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from .defs import runs
from .defs import (adapters, automation, cards, champion, datasets, distill, export, generated_preferences, models,
                   policy, preferences, raw, reports, reward, sweeps)
from .defs.resources import ArtifactIOManager, ComputeResource, StoreResource
from .config.recipe import Recipe, load_recipes
from .config.paths import store_location


PIPELINE_TAG = "ft_assets/pipeline"  # each asset's pipeline, with several recipes


def build_definitions(recipes: Recipe | list[Recipe], home: str | None = None) -> dg.Definitions:
    """One recipe, or several pipelines (recipes with distinct `pipeline` names: `load_recipes`)."""
    recipes = [recipes] if isinstance(recipes, Recipe) else list(recipes)
    names = [r.pipeline for r in recipes]
    if len(recipes) > 1 and (None in names or len(set(names)) != len(names)):
        raise ValueError(f"several recipes need distinct pipeline names (load them with load_recipes): {names}")
    home = store_location(home)
    pipelines = [pipeline(recipe) for recipe in recipes]
    machine = recipes[0].compute  # load_recipes refuses recipes whose compute settings differ
    return dg.Definitions(
        assets=[a for p in pipelines for a in p.assets],
        jobs=[j for p in pipelines for j in p.jobs],
        schedules=[s for p in pipelines for s in p.schedules],
        sensors=[*(p.observation_sensor for p in pipelines), automation.automation_sensor(), runs.dead_runs_sensor()],
        executor=runs.worker_executor,
        resources={
            "compute": ComputeResource(device=machine.device, threads=machine.threads),
            "store": StoreResource(home=home),
            "io_manager": ArtifactIOManager(home=home),
        },
    )


@dataclass(frozen=True)
class Pipeline:
    """What one recipe adds to the code location (the deployment adds the shared sensors and resources)."""

    assets: list
    jobs: list
    schedules: list
    observation_sensor: dg.SensorDefinition


def pipeline(recipe: Recipe) -> Pipeline:
    """One recipe's assets, jobs, schedules and source-observation sensor."""
    parts = adapters.methods_partitions(recipe)
    sources = [*raw.build(recipe), automation.recipe_methods_source(recipe, parts)]
    derived = [*models.build(recipe), *datasets.build(recipe), *preferences.build(recipe), *adapters.build(recipe),
               *reports.build(recipe), *champion.build(recipe), *cards.build(recipe), *distill.build(recipe), *sweeps.build(recipe),
               *export.build(recipe), *reward.build(recipe),
               *policy.build(recipe), *generated_preferences.build(recipe)]
    condition = automation.derived_condition(recipe)
    if condition is not None:
        derived = dg.map_asset_specs(lambda spec: spec.replace_attributes(automation_condition=condition), derived)
    if recipe.pipeline:  # the UI filters on it: tag:ft_assets/pipeline=<name> (sources: by key and group)
        derived = dg.map_asset_specs(lambda spec: spec.merge_attributes(tags={PIPELINE_TAG: recipe.pipeline}), derived)
    jobs, schedules = automation.retrain(recipe, adapters.adapter_partitions(recipe))
    return Pipeline([*sources, *derived], jobs, schedules, automation.observation_sensor(recipe))


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_recipes())
