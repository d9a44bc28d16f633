"""What re-runs on its own: data-change reruns, code/recipe-change reruns, scheduled retraining.

- Raw data files are observed on the recipe's cron (`automation.observe_data_cron`); their
  data version is the content hash, so touching or rewriting a file unchanged does nothing.
- Each method's recipe section is an observable, partitioned source `recipe/method[<name>]`
  whose data version is the hash of that method's settings (its spec + effective training
  settings + seed). Editing one method's learning rate therefore makes only that partition of
  `adapter` stale.
- Every derived asset is `eager()` (re-materializes when a dependency has a new version),
  optionally `| code_version_changed()` (a stage's code version bump re-runs it).
- `retrain`: an optional cron schedule requesting every method partition of
  adapter -> merged_model -> eval_report, its default state from the recipe.
The automation sensor is on by default, so all of this works as soon as `dagster dev` runs.
"""

import dagster as dg

from ..recipe import Recipe

RECIPE_METHOD_KEY = dg.AssetKey(["recipe", "method"])
AUTOMATION_SENSOR = "default_automation_condition_sensor"


def derived_condition(recipe: Recipe) -> dg.AutomationCondition | None:
    """The condition every materializable asset gets (None: manual only)."""
    a = recipe.automation
    if not a.eager:
        return dg.AutomationCondition.code_version_changed() if a.rerun_on_code_change else None
    cond = dg.AutomationCondition.eager()
    return cond | dg.AutomationCondition.code_version_changed() if a.rerun_on_code_change else cond


def observe_condition(recipe: Recipe) -> dg.AutomationCondition:
    return dg.AutomationCondition.cron_tick_passed(recipe.automation.observe_data_cron)


def method_version(recipe: Recipe, name: str) -> str:
    return recipe.section_hash("seed", method=name)


def recipe_methods_source(recipe: Recipe, partitions: dg.PartitionsDefinition):
    @dg.observable_source_asset(
        key=RECIPE_METHOD_KEY,
        group_name="raw_data",
        partitions_def=partitions,
        automation_condition=observe_condition(recipe),
        description="Each method's recipe settings; data version = hash of that method's section.",
    )
    def recipe_method():
        return dg.DataVersionsByPartition({name: dg.DataVersion(method_version(recipe, name)) for name in recipe.methods})

    return recipe_method


def retrain(recipe: Recipe, partitions: dg.PartitionsDefinition) -> tuple[list, list]:
    """(jobs, schedules) for scheduled retraining; empty when the recipe sets no retrain_cron."""
    if recipe.automation.retrain_cron is None:
        return [], []
    job = dg.define_asset_job(
        "retrain_job",
        selection=dg.AssetSelection.assets("adapter", "merged_model", "eval_report"),
        partitions_def=partitions,
        description="Retrain, merge and evaluate one method partition.",
    )

    @dg.schedule(
        cron_schedule=recipe.automation.retrain_cron,
        job=job,
        default_status=(dg.DefaultScheduleStatus.RUNNING if recipe.automation.retrain_schedule_running
                        else dg.DefaultScheduleStatus.STOPPED),
        description="Scheduled retraining of every recipe method (GPU pool keeps them one at a time).",
    )
    def retrain_schedule(context: dg.ScheduleEvaluationContext):
        stamp = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
        return [dg.RunRequest(run_key=f"retrain-{name}-{stamp}", partition_key=name) for name in recipe.methods]

    return [job], [retrain_schedule]


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR, target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
    )
