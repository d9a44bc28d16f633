"""What re-runs on its own: data-change reruns, code/recipe-change reruns, scheduled retraining.

- A sensor (`ft_assets_observe_sources`) hashes every data file (datasets and the preference
  file: `source_versions`) and every method's settings each `automation.observe_interval_s`
  seconds, inside the code server, and records an observation only when a version changed.
  Runs started outside the daemon (the demo) first record what they consume (`record_sources`),
  so the sensor's first observation of the same versions after `make ui` re-runs nothing. (Observing through runs instead would start a
  process per observation that imports torch; on a busy machine those runs outlast the
  interval, the sources always look "in progress", and eager() never fires.) Touching or
  rewriting a file unchanged does nothing.
- Each method's recipe section is an observable, partitioned source `recipe/method[<name>]`
  whose data version is the hash of that method's settings (its spec + effective training
  settings + seed). Editing one method's learning rate therefore makes only that partition of
  `adapter` (or, for a preference method, `preference_adapter`) stale. A preference method's SFT adapter is a
  declared input of `preference_adapter`, so a new SFT adapter version re-runs it like any input.
- Every derived asset is `on_new_input_versions()`: Dagster's eager(), except that a dependency
  counts as updated only when its *data version* changed. Trained artifacts are versioned by
  what made them (store.py), so re-materializing an adapter with identical inputs reuses it,
  keeps its version and re-runs nothing below it. Optionally `| code_version_changed()` (a
  stage's code version bump re-runs it).
- `retrain`: an optional cron schedule requesting `adapter` for every partition (see `retrain`
  for what re-runs; preference methods follow their SFT adapter), its default state from the recipe.
The automation sensor is on by default, so all of this works as soon as `dagster dev` runs.
"""

import json

import dagster as dg

from ..config.recipe import Recipe
from . import _common as c
from .resources import DATA_VERSION_TAG  # observations carry their data version in it too

AUTOMATION_SENSOR = "ft_assets_automation"
OBSERVATION_SENSOR = "ft_assets_observe_sources"


def on_new_input_versions() -> dg.AutomationCondition:
    """Dagster's eager(), but a dependency counts as updated only when its data version changed
    (not when it merely re-materialized: an adapter reused for identical inputs keeps its version)
    or when it will be requested this tick; an update made by a run that also ran this asset is
    not news to it (as in eager())."""
    AC = dg.AutomationCondition
    new_version = (AC.data_version_changed() & ~AC.executed_with_root_target()).with_label("new_data_version")
    deps_changed = AC.any_deps_match(new_version | AC.will_be_requested()).with_label("any_deps_new_data_version")
    return (
        AC.in_latest_time_window()
        & (AC.newly_missing() | deps_changed).since_last_handled()
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("eager_on_new_data_versions")


def derived_condition(recipe: Recipe) -> dg.AutomationCondition | None:
    """The condition every materializable asset gets (None: manual only)."""
    a = recipe.automation
    if not a.eager:
        return dg.AutomationCondition.code_version_changed() if a.rerun_on_code_change else None
    cond = on_new_input_versions()
    return cond | dg.AutomationCondition.code_version_changed() if a.rerun_on_code_change else cond


def method_version(recipe: Recipe, name: str) -> str:
    """The version of one method's settings: its recipe section, effective training settings, seed."""
    return recipe.section_hash("seed", method=name)


def recipe_method_key(recipe: Recipe) -> dg.AssetKey:
    """The `recipe/method` source of the recipe's pipeline."""
    return c.key(recipe, "recipe", "method")


def recipe_methods_source(recipe: Recipe, partitions: dg.PartitionsDefinition):
    @dg.observable_source_asset(
        key=recipe_method_key(recipe),
        group_name=c.group(recipe, "raw_data"),
        partitions_def=partitions,
        description="Each method's recipe settings; data version = hash of that method's section.",
    )
    def recipe_method():
        return dg.DataVersionsByPartition({name: dg.DataVersion(method_version(recipe, name)) for name in recipe.methods})

    return recipe_method


def retrain(recipe: Recipe, partitions: dg.PartitionsDefinition) -> tuple[list, list]:
    """(jobs, schedules) for scheduled retraining; empty when the recipe sets no retrain_cron.

    Each tick requests `adapter` for each of its partitions (`partitions`: every method but the
    preference ones). An adapter whose inputs, code and settings did not change is reused at once and
    keeps its version, so nothing downstream re-runs; one that changed trains, logs what changed,
    and (with automation on) its new version re-runs merge and evaluation, and the
    `preference_adapter` of any preference method that continues it. With automation off the job runs
    merge and evaluation itself (the recipe refuses preference methods there: their chain crosses
    partitions sets that one job cannot hold). `retrain_force: true` retrains every adapter
    regardless (each gets a new version, so the preference methods retrain too)."""
    a = recipe.automation
    if a.retrain_cron is None:
        return [], []
    selection = ["adapter"] if a.eager else ["adapter", "merged_model", "eval_report"]
    job = dg.define_asset_job(
        c.named(recipe, "retrain_job"),
        selection=dg.AssetSelection.assets(*[c.key(recipe, name) for name in selection]),
        partitions_def=partitions,
        description="Retrain one method partition where its inputs changed (or always, with force).",
    )
    adapter_op = c.key(recipe, "adapter").to_python_identifier()
    run_config = {"ops": {adapter_op: {"config": {"force": True}}}} if a.retrain_force else {}

    @dg.schedule(
        name=c.named(recipe, "retrain_schedule"),
        cron_schedule=a.retrain_cron,
        job=job,
        default_status=(dg.DefaultScheduleStatus.RUNNING if a.retrain_schedule_running
                        else dg.DefaultScheduleStatus.STOPPED),
        description="Scheduled retraining of every recipe method: what changed, or everything with "
                    "automation.retrain_force (GPU pool keeps them one at a time).",
    )
    def retrain_schedule(context: dg.ScheduleEvaluationContext):
        stamp = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
        mode = "force" if a.retrain_force else "changed"
        return [dg.RunRequest(run_key=f"retrain-{name}-{stamp}", partition_key=name, run_config=run_config,
                              tags={"ft_assets/retrain": mode}) for name in partitions.get_partition_keys()]

    return [job], [retrain_schedule]


def source_versions(recipe: Recipe) -> dict[str, tuple[dg.AssetKey, str | None, str]]:
    """Every source the graph reads, with its current version: each data file of the recipe
    (datasets and the preference file) and each method's settings. The observation sensor and
    `record_sources` both use this one list."""
    from ..data.rows import source_path
    from .raw import data_files, file_version, raw_key

    out = {}
    for ds in data_files(recipe):
        out[f"raw/{ds.name}"] = (raw_key(recipe, ds), None, file_version(source_path(recipe, ds)))
    for name in recipe.methods:
        out[f"recipe/method[{name}]"] = (recipe_method_key(recipe), name, method_version(recipe, name))
    return out


def observation_sensor(recipe: Recipe) -> dg.SensorDefinition:
    """Record a new observation for each source whose version changed since the last tick."""

    @dg.sensor(name=c.named(recipe, OBSERVATION_SENSOR), minimum_interval_seconds=recipe.automation.observe_interval_s,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Hashes the data files and each method's recipe settings; records changes.")
    def observe_sources(context: dg.SensorEvaluationContext):
        previous = json.loads(context.cursor) if context.cursor else {}
        current = source_versions(recipe)
        events = [dg.AssetObservation(key, partition=partition, tags={DATA_VERSION_TAG: version})
                  for name, (key, partition, version) in current.items() if previous.get(name) != version]
        if not events:
            return dg.SkipReason("no data file or method setting changed")
        return dg.SensorResult(asset_events=events,
                               cursor=json.dumps({name: v for name, (_, _, v) in current.items()}, sort_keys=True))

    return observe_sources


def record_sources(defs: dg.Definitions, instance: dg.DagsterInstance) -> int:
    """Record every source's current version in `instance`, as the observation sensor would on
    its first tick. Runs launched outside the daemon (the demo) call it, so what they consumed is
    on record: the sensor's first real observation of the same versions is then no change, and
    opening the UI after the demo re-runs nothing. Returns how many observations it recorded."""
    recorded = 0
    for sensor in defs.sensors or []:  # one per pipeline (`<pipeline>__ft_assets_observe_sources`)
        if sensor.name.endswith(OBSERVATION_SENSOR):
            result = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs))
            for event in result.asset_events:
                instance.report_runless_asset_event(event)
            recorded += len(result.asset_events)
    return recorded


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        # include_sources: the observable data files are evaluated by this sensor too (else Dagster
        # gives them a default sensor that starts stopped, and no data change is ever seen)
        AUTOMATION_SENSOR, target=dg.AssetSelection.all(include_sources=True),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
    )
