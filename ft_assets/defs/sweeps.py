"""`best_adapter[<method>]`: the winner of a method's sweep, with the table of all its trials.

A recipe method with `sweep:` becomes one `adapter` partition per combination of settings
(`lora@lr=2e-4@r=8`; a value other than letters, digits and `._+-` is a hash, `h<8 hex>`: see
`recipe.expand_sweep`, `recipe.trial_name`); every other asset treats them as ordinary
methods. `best_adapter` has one partition per swept method and reads all of its trials through
a `StaticPartitionMapping` {trial: method} (declared in the graph, so Dagster re-runs it when a
trial changes); one `evaluation.sweep.pick_best` call chooses the lowest validation loss. Its artifact
holds `trials.json` and `best.json` (the winner's adapter version and path); it copies no weights.
"""

import dagster as dg

from ..evaluation.sweep import pick_best
from ..config.recipe import Recipe, sweep_family
from . import _common as c
from .resources import ALL_PARTITIONS, StoreResource

SWEEP_COLUMNS = ("trial", "best_validation_loss", "kept_step", "stopped_early_at", "steps", "adapter_version")


def swept_methods(recipe: Recipe) -> dict[str, list[str]]:
    """{method: its trials} for every method of the recipe that was a sweep."""
    out: dict[str, list[str]] = {}
    for name in recipe.methods:
        if sweep_family(name) != name:
            out.setdefault(sweep_family(name), []).append(name)
    return out


def build(recipe: Recipe) -> list:
    sweeps = swept_methods(recipe)
    if not sweeps:
        return []
    mapping = dg.StaticPartitionMapping({trial: family for family, trials in sweeps.items() for trial in trials})

    @dg.asset(key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "training"), kinds={"json"}, code_version=c.code_version("best_adapter", recipe),
              partitions_def=dg.StaticPartitionsDefinition(sorted(sweeps)),
              ins={"adapter": c.asset_in(recipe, partition_mapping=mapping, metadata={ALL_PARTITIONS: True})})
    def best_adapter(context: dg.AssetExecutionContext, store: StoreResource, adapter: dict) -> dg.Output:
        """The trial of this method's sweep with the lowest validation loss, and every trial's score."""
        family = context.partition_key
        missing = sorted(set(sweeps[family]) - set(adapter))
        if missing:
            raise c.user_error(RuntimeError(f"trials not materialized yet: {', '.join(f'adapter[{m}]' for m in missing)}"))
        try:
            result = pick_best(family, {t: {"version": a.version, "path": a.path, "train": a.manifest().get("train", {})}
                                        for t, a in adapter.items()})
        except ValueError as exc:
            raise c.user_error(exc) from None
        with store.store(recipe.pipeline).write("best_adapter", family, recipe_hash=recipe.recipe_hash,
                                 code_version=c.code_version("best_adapter", recipe), seed=recipe.seed) as st:
            st.inputs = c.inputs_of(*adapter.values())
            result.save(st.path)
        best = result.trials[0]
        context.log.info(f"{family}: {result.winner} wins with validation loss {best['best_validation_loss']} "
                         f"of {len(result.trials)} trials")
        return c.output(st.artifact, {
            "winner": result.winner, "best_validation_loss": best["best_validation_loss"],
            "winner_adapter": dg.MetadataValue.path(best["adapter_path"]),
            "trials": c.table(result.trials, [*SWEEP_COLUMNS[:1], *sorted(set(best) - set(SWEEP_COLUMNS) - {"adapter_path"}),
                                              *SWEEP_COLUMNS[1:]]),
        })

    return [best_adapter]
