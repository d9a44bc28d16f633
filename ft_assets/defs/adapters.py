"""`adapter` (one partition per recipe method) and `merged_model`.

- `adapter[method]`: one `trainers.sft.finetune` call (load the base, or for QLoRA
  `quantized_base`; wrap with the method; train on the `sft_dataset` train split) after the
  reuse rule (`_common.reuse_or_say_why`), then the store write and metadata. Checkpoints go to
  $FT_HOME/checkpoints/adapter/<method>/<derived version> during training (a re-run with the
  same inputs resumes from the newest one; on an object store they are mirrored there, so a run
  resumed on another node continues too). Metadata: trainable parameters, loss curve (image
  + numbers), tokens trained, tokens/s, peak memory, wall time.
- `merged_model[method]`: the adapter folded into full-precision base weights, saved as a
  plain transformers checkpoint; check `matches_adapter` compares its logits with
  base+adapter, relative to the logit scale, against the rounding the method's merge
  explains (`evaluation.merge.compare`). Methods that cannot merge record why and still materialize.

Beyond SFT (only for recipes that ask for it):
- a preference method (dpo, orpo, simpo, kto) d is not a partition of `adapter`: `preference_adapter[d]` (defs/preferences.py)
  continues `adapter[<sft_from>]`. `merged_model` and `eval_report` have every method's partition
  and read `preference_adapter[d]` for partition d (a `StaticPartitionMapping` {d: d}) and
  `adapter[m]` for every other m ({m: m}; Dagster's identity when the recipe has no preference
  method, so a partition's adapter and merge can share a run); each partition reads exactly one.
- `continue_from: previous`: the method starts from its own previous adapter version when the
  data changed (`defs.adapter_store.plan_continual`), replaying `replay_fraction` of the previous
  sft_dataset's train split; manifest inputs name that adapter version under `adapter[<method>]`.
"""


import dagster as dg

from ..trainers import sft as finetune
from ..evaluation import merge, plots
from ..methods import get_method
from ..config.recipe import Recipe
from ..artifacts.store import Artifact, ArtifactStore, derived_version, dir_bytes
from . import _common as c
from . import adapter_store
from . import launchers
from .automation import recipe_method_key
from .models import MODEL_BYTES_HEADROOM
from .preferences import preference_mapping
from .resources import ComputeResource, StoreResource


def methods_partitions(recipe: Recipe) -> dg.StaticPartitionsDefinition:
    """Every method of the recipe: the partitions of `merged_model`, `eval_report`, `recipe/method`."""
    return dg.StaticPartitionsDefinition(list(recipe.methods))


def adapter_partitions(recipe: Recipe) -> dg.StaticPartitionsDefinition:
    """The methods `adapter` trains: all but the preference ones (those are `preference_adapter`'s)."""
    names = [n for n in recipe.methods if n not in recipe.preference_methods()]
    return methods_partitions(recipe) if len(names) == len(recipe.methods) else dg.StaticPartitionsDefinition(names)


def adapter_mapping(recipe: Recipe) -> dg.StaticPartitionMapping | None:
    """adapter[m] feeds partition m of a method-partitioned asset (preference partitions read no adapter).
    None (Dagster's identity) when there are no preference methods: only identity lets the automation
    request adapter[m] and its merge in one run."""
    if not recipe.preference_methods():
        return None
    return dg.StaticPartitionMapping({n: n for n in adapter_partitions(recipe).get_partition_keys()})


def _train_adapter(context, recipe: Recipe, compute: ComputeResource, store: ArtifactStore,
                   sft_dataset: Artifact, base_model: Artifact, quantized_base: Artifact | None, cv: str,
                   force: bool):
    name = context.partition_key
    spec = recipe.methods[name]
    method = get_method(spec.type)
    try:
        td = adapter_store.training_data(store, name, spec, sft_dataset.path, sft_dataset.version, base_model.path,
                                    base_model.version, recipe.seed)
    except finetune.StaleDataset as exc:
        raise c.user_error(RuntimeError(str(exc))) from None
    plan, continued = td.plan, td.continued
    for note in plan.notes if plan else []:
        context.log.info(note)
    inputs = c.inputs_of(sft_dataset, base_model, quantized_base if method.uses_quantized_base else None)
    if continued:
        inputs[f"{store.qualified('adapter')}[{name}]"] = plan.start.adapter_version  # the version this run continued from
    derivation = c.derivation(inputs, cv, recipe.section_hash("seed", method=name))
    done = c.reuse_or_say_why(context, store, "adapter", name, derivation, force)
    if done is not None:
        return c.output(done, c.reused_metadata(done))
    hw = compute.resolve()
    ckpts = store.checkpoints("adapter", name, derived_version(derivation))
    request = sft_request(recipe, name, td, ckpts, base_model, quantized_base if method.uses_quantized_base else None)
    with c.training_failures(context, name, user_errors=(launchers.JobFailed,)):
        tuned = launchers.train_method(context, request, recipe.compute, hw, ckpts)
    what = f"The trained `{name}` adapter (method type `{spec.type}`), as ft_assets saved it."
    art = adapter_store.write_adapter(
        store, name, tuned, inputs=inputs, derivation=c.forced(derivation, context) if force else derivation,
        facts=finetune.adapter_facts(name, spec, recipe.training_for(name), tuned, hw.name, plan),
        manifests=(base_model.manifest(), sft_dataset.manifest()),
        write_card=lambda path, lin: c.write_card(path, recipe, lin, what, method.uses_quantized_base),
        recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed)
    ckpts.finished()  # the artifact supersedes its checkpoints
    return c.output(art, {**_trained_metadata(name, spec.type, tuned, art, hw.name, plan), **launchers.facts(recipe)})


def sft_request(recipe: Recipe, name: str, td: finetune.TrainingData, ckpts, base_model: Artifact,
                quantized_base: Artifact | None) -> finetune.SftRequest:
    """The one description of method `name`'s run, whatever runs it (in process, torchrun, Ray)."""
    plan = td.plan
    replay = {}
    if td.continued and plan.replay_dataset:
        replay = {"dataset_dir": plan.replay_dataset, "fraction": recipe.methods[name].replay_fraction}
    return finetune.SftRequest(
        method=name, method_spec=recipe.methods[name].model_dump(mode="json"),
        training=recipe.training_for(name).model_dump(mode="json"), seed=recipe.seed,
        sft_dataset_dir=str(td.sft_dataset_dir), base_dir=str(base_model.path), pad_id=td.pad_id,
        checkpoint_dir=str(ckpts.dir), quantized_dir=str(quantized_base.dir) if quantized_base else None,
        quantized_compute_dtype=recipe.quantization.compute_dtype,
        start_adapter=plan.start.adapter_path if td.continued else None, replay=replay,
        parallel=recipe.compute.parallel)


def _trained_metadata(name: str, method_type: str, tuned, art: Artifact, device: str, plan) -> dict:
    result = tuned.result
    png = plots.loss_curve_png(result.losses, f"{name}: train loss")
    extra = {}
    if plan is not None:
        s = plan.start
        extra = {"continued_from": s.adapter_version or "scratch", "continue_reason": s.reason,
                 "replay_rows": len(plan.replay),
                 "continued_from_path": dg.MetadataValue.path(s.adapter_path) if s.adapter_path else "-"}
    if result.validation_losses:
        png = plots.loss_curve_png(result.losses, f"{name}: train loss", validation=result.validation_losses)
        extra.update({"kept_step": result.kept_step, "stopped_early_at": result.stopped_early_at or "-",
                      "validation_rows": result.validation_rows,
                      "best_validation_loss": min(v for _, v in result.validation_losses),
                      "validation_losses": dg.MetadataValue.json([[s, v] for s, v in result.validation_losses])})
    return {
        **extra,
        "method": method_type,
        "trainable_parameters": tuned.trainable,
        "trainable_percent": round(100 * tuned.trainable / tuned.total, 4),
        "loss_curve": dg.MetadataValue.md(plots.markdown_image(png, f"{name} loss curve")),
        "losses": dg.MetadataValue.json([[s, l] for s, l in result.losses]),
        "first_loss": result.losses[0][1],
        "final_loss": result.losses[-1][1],
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "tokens_trained": result.tokens_trained,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "peak_memory_bytes": result.peak_memory_bytes,
        "wall_time_s": round(result.wall_s, 2),
        "adapter_bytes": dir_bytes(art.dir),
        "device": device,
    }


def _merge(context, recipe: Recipe, compute: ComputeResource, store: ArtifactStore, adapter: Artifact,
           base_model: Artifact, quantized_base: Artifact | None, sft_dataset: Artifact, cv: str):
    """`adapter`: what partition m trained: adapter[m], or preference_adapter[m] for a preference method."""
    name = context.partition_key
    method = get_method(recipe.methods[name].type)
    q_dir = quantized_base.dir if (quantized_base and method.uses_quantized_base) else None
    what = f"`{c.key_of(adapter)}` merged into the base weights: a plain transformers checkpoint with its tokenizer."
    made = merge.write_merged_model(
        store, name, method, base_model=base_model, adapter=adapter, quantized_dir=q_dir, sft_dataset=sft_dataset,
        device=compute.resolve().device, inputs=c.inputs_of(adapter, base_model, quantized_base if q_dir else None),
        write_card=lambda path, lin: c.write_card(path, recipe, lin, what, False),
        min_free_bytes=MODEL_BYTES_HEADROOM, recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed)
    art, cmp = made.artifact, made.comparison
    if cmp is None:
        # no merged weights, nothing to compare: the check is not emitted, so Dagster shows it skipped
        context.log.warning(f"{name} cannot be merged: {made.reason}; it is evaluated in adapter form; "
                            "check matches_adapter skipped")
        yield c.output(art, {"mergeable": False, "reason": made.reason}, output_name="merged_model")
        return
    numbers = cmp.numbers()
    yield c.output(art, {"mergeable": True, "bytes": dir_bytes(art.dir), **numbers}, output_name="merged_model")
    yield dg.AssetCheckResult(
        check_name="matches_adapter", passed=cmp.passed,
        metadata={**numbers, "expected": cmp.expected, "prompts": made.prompts},
        description=f"logits off by {cmp.relative_diff:.3g} of their scale (tolerance {cmp.tolerance:.3g}); "
                    f"worst layer {cmp.worst_layer} off by {cmp.layer_relative_diff:.3g} "
                    f"(tolerance {cmp.layer_tolerance:.3g}). {cmp.expected}",
    )


MERGED_MODEL = "The adapter merged into full-precision base weights, ready to deploy."
MATCHES_ADAPTER = (
    "The merged model computes what base + adapter computes, up to what float rounding explains: "
    "every Linear layer on random inputs (2·(2·sqrt(K)+1)·u of its output scale) and the logits on "
    "eval prompts (identical weights: one rounding u; folded weights: (4L+1)·sqrt(K)·u of the logit "
    "scale). A failure names the layer furthest off. See ft_assets/evaluation/merge.py."
)


def build(recipe: Recipe) -> list:
    parts = methods_partitions(recipe)
    trained_parts = adapter_partitions(recipe)
    preference = bool(recipe.preference_methods())
    quantized = recipe.quantization.method != "none"
    # Per-method settings are versioned per partition by the `recipe/method` source (an edit of
    # one method re-trains only that partition), so they are not part of the asset's code version.
    cv_adapter = c.code_version("adapter", recipe)
    cv_merged = c.code_version("merged_model", recipe)
    recipe_dep = [dg.AssetDep(recipe_method_key(recipe), partition_mapping=adapter_mapping(recipe))]
    # what each partition of merged_model trained: adapter[m] or, for a preference method, preference_adapter[m]
    trained_in = {"adapter": c.asset_in(recipe, partition_mapping=adapter_mapping(recipe)),
                  **({"preference_adapter": c.asset_in(recipe, partition_mapping=preference_mapping(recipe))} if preference else {})}

    # quantized_base is an input only when the recipe quantizes (QLoRA trains on it)
    q_in = {"quantized_base": c.asset_in(recipe)} if quantized else {}

    @dg.asset(key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "training"), kinds={"pytorch", "peft"}, code_version=cv_adapter, deps=recipe_dep,
              ins={"sft_dataset": c.asset_in(recipe), "base_model": c.asset_in(recipe), **q_in},
              partitions_def=trained_parts, pool="gpu")
    def adapter(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                config: c.TrainingRun, **inputs):
        """The trained adapter (or trained weights) of one method: one partition per recipe method.
        Its version is that of its inputs, code and settings; an existing one is reused (`force` retrains)."""
        return _train_adapter(context, recipe, compute, store.store(recipe.pipeline), inputs["sft_dataset"], inputs["base_model"],
                              inputs.get("quantized_base"), cv_adapter, config.force)

    # A multi_asset only so that its check is optional (can_subset): a method that cannot merge has
    # nothing to compare, and a check reported passed=True would claim a comparison never made.
    @dg.multi_asset(
        name=c.named(recipe, "merged_model"), can_subset=True, partitions_def=parts, pool="gpu",
        outs={"merged_model": dg.AssetOut(key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "training"), kinds={"pytorch", "safetensors"},
                                          code_version=cv_merged, description=MERGED_MODEL)},
        ins={**trained_in, "base_model": c.asset_in(recipe), "sft_dataset": c.asset_in(recipe), **q_in},
        check_specs=[dg.AssetCheckSpec("matches_adapter", asset=c.key(recipe, "merged_model"), partitions_def=parts,
                                       description=MATCHES_ADAPTER)])
    def merged_model(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource, **inputs):
        if c.key(recipe, "merged_model") not in context.selected_asset_keys:
            raise c.user_error(RuntimeError("matches_adapter checks the merged model a run writes: "
                                            "materialize merged_model (the check runs with it)"))
        trained = inputs.get("preference_adapter") or inputs["adapter"]
        yield from _merge(context, recipe, compute, store.store(recipe.pipeline), trained, inputs["base_model"],
                          inputs.get("quantized_base"), inputs["sft_dataset"], cv_merged)

    return [adapter, merged_model]
