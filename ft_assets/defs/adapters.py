"""`adapter` (one partition per recipe method) and `merged_model`.

- `adapter[method]`: loads the base (or, for QLoRA, `quantized_base`), wraps it with the
  method, trains it with `core.train` on the `sft_dataset` train split, and saves only what
  was trained. Checkpoints go to $FT_HOME/checkpoints/... during training (a re-run with the
  same inputs resumes from the newest one). Metadata: trainable parameters, loss curve (image
  + numbers), tokens trained, tokens/s, peak memory, wall time.
- `merged_model[method]`: the adapter folded into full-precision base weights, saved as a
  plain transformers checkpoint; check `matches_adapter` compares its logits with
  base+adapter. Methods that cannot merge record why and still materialize.
"""


import hashlib
import json
import shutil

import dagster as dg
import torch

from ..core import data, merge, plots, train
from ..core.methods import NotMergeable, get_method
from ..core.models import load_model, load_tokenizer, parameter_count
from ..core.quantize import compute_dtype, load_quantized
from ..recipe import Recipe
from ..store import Artifact, ArtifactStore, dir_bytes
from . import _common as c
from .automation import RECIPE_METHOD_KEY
from .models import MODEL_BYTES_HEADROOM
from .resources import ComputeResource, StoreResource


def methods_partitions(recipe: Recipe) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(list(recipe.methods))


def _train_adapter(context, recipe: Recipe, compute: ComputeResource, store: ArtifactStore,
                   sft_dataset: Artifact, base_model: Artifact, quantized_base: Artifact | None, cv: str):
    name = context.partition_key
    spec = recipe.methods[name]
    method = get_method(spec.type)
    cfg = train.TrainConfig.from_spec(recipe.training_for(name), recipe.seed)
    hw = compute.resolve()
    info = data.dataset_info(sft_dataset.path)
    tok = load_tokenizer(base_model.path)
    if data.tokenizer_fingerprint(tok) != info["tokenizer_fingerprint"]:
        raise c.user_error(RuntimeError(
            "sft_dataset was built with a different tokenizer than base_model has now; "
            "re-materialize sft_dataset"))
    examples = data.load_split(sft_dataset.path, "train")

    if method.uses_quantized_base:
        model = load_quantized(quantized_base.dir, hw.device, compute_dtype(recipe.quantization.compute_dtype, hw.device))
    else:
        model = load_model(base_model.path, hw.device, hw.dtype)
    train.seed_everything(cfg.seed)  # adapter init is random: seed it so reruns are reproducible
    model = method.wrap(model, spec, gradient_checkpointing=cfg.gradient_checkpointing)
    trainable, total = parameter_count(model)
    context.log.info(f"{name}: {trainable:,} trainable of {total:,} parameters; {len(examples)} train rows; "
                     f"{train.steps_for(len(examples), cfg)} steps on {hw.device}")

    inputs = c.inputs_of(sft_dataset, base_model, quantized_base if method.uses_quantized_base else None)
    run_key = hashlib.sha256(json.dumps([inputs, cv, recipe.section_hash("seed", method=name)]).encode()).hexdigest()[:16]
    ckpt_dir = store.home / "checkpoints" / "adapter" / name / run_key
    try:
        result = train.train(
            model, method, spec, examples, cfg, pad_id=tok.pad_token_id, device=hw.device,
            autocast_dtype=hw.autocast_dtype, checkpoint_dir=ckpt_dir,
            on_log=lambda step, loss: context.log.info(f"step {step}: loss {loss:.4f}"),
        )
    except train.TrainingDiverged as exc:
        raise c.user_error(exc) from None
    except torch.OutOfMemoryError as exc:
        raise c.user_error(RuntimeError(out_of_memory_hint(name, cfg, hw.device, exc))) from None
    if result.resumed_from_step:
        context.log.info(f"resumed from checkpoint at step {result.resumed_from_step}")

    with store.write("adapter", name, recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed) as st:
        st.inputs = inputs
        method.save(model, st.path)
        st.extra["method"] = {"name": name, "type": spec.type, "spec": spec.model_dump(mode="json"),
                              "training": recipe.training_for(name).model_dump(mode="json")}
        st.extra["train"] = {**result.summary(), "trainable_parameters": trainable, "total_parameters": total,
                             "device": hw.name}
        c.write_json(st.path / "train_log.json", {"losses": result.losses, **result.summary()})
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: the artifact supersedes its checkpoints
    art = st.artifact
    png = plots.loss_curve_png(result.losses, f"{name}: train loss")
    return c.output(art, {
        "method": spec.type,
        "trainable_parameters": trainable,
        "trainable_percent": round(100 * trainable / total, 4),
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
        "device": hw.name,
    })


def out_of_memory_hint(name: str, cfg: train.TrainConfig, device: str, exc: Exception) -> str:
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (
        f"{name}: out of memory on {device} with batch_size {cfg.batch_size} (x{cfg.grad_accum} accumulation). "
        f"Try, in the recipe: training.batch_size: {max(1, cfg.batch_size // 2)} with training.grad_accum: "
        f"{cfg.grad_accum * 2} (same effective batch), training.gradient_checkpointing: true, a shorter "
        f"prompt.max_length, or a quantized method (qlora). ({first_line})"
    )


def _merge(context, recipe: Recipe, compute: ComputeResource, store: ArtifactStore, adapter: Artifact,
           base_model: Artifact, quantized_base: Artifact | None, sft_dataset: Artifact, cv: str):
    name = context.partition_key
    method = get_method(recipe.methods[name].type)
    hw = compute.resolve()
    q_dir = quantized_base.dir if (quantized_base and method.uses_quantized_base) else None
    inputs = c.inputs_of(adapter, base_model, quantized_base if q_dir else None)
    with store.write("merged_model", name, recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed,
                     min_free_bytes=MODEL_BYTES_HEADROOM) as st:
        st.inputs = inputs
        try:
            model = merge.merged(method, base_model.dir, adapter.dir, q_dir, hw.device)
        except NotMergeable as exc:
            model, reason = None, str(exc)
            c.write_json(st.path / "merge_status.json", {"mergeable": False, "reason": reason})
        else:
            reason = None
            model.save_pretrained(st.path, safe_serialization=True)
            load_tokenizer(base_model.path).save_pretrained(st.path)
            c.write_json(st.path / "merge_status.json", {"mergeable": True})
        st.extra["mergeable"] = model is not None
    art = st.artifact

    if model is None:
        context.log.warning(f"{name} cannot be merged: {reason}; it is evaluated in adapter form")
        yield c.output(art, {"mergeable": False, "reason": reason})
        yield dg.AssetCheckResult(check_name="matches_adapter", passed=True,
                                  metadata={"skipped": f"not mergeable: {reason}"})
        return

    # The merged checkpoint, reloaded from disk, must compute what base+adapter computes.
    examples = data.load_split(sft_dataset.path, "eval")[:8]
    pad = load_tokenizer(base_model.path).pad_token_id
    reloaded = load_model(art.path, hw.device)
    reference = merge.unmerged(method, base_model.dir, adapter.dir, q_dir, hw.device)
    diff = merge.max_logit_difference(reloaded, reference, examples, pad, hw.device)
    tol = recipe.evaluation.merge_tolerance
    yield c.output(art, {"mergeable": True, "bytes": dir_bytes(art.dir), "max_abs_logit_diff": diff,
                         "tolerance": tol})
    yield dg.AssetCheckResult(
        check_name="matches_adapter", passed=diff <= tol,
        metadata={"max_abs_logit_diff": diff, "tolerance": tol, "prompts": len(examples)},
        description="max |logits(merged) - logits(base+adapter)| over eval prompts",
    )


def build(recipe: Recipe) -> list:
    parts = methods_partitions(recipe)
    quantized = recipe.quantization.method != "none"
    # Per-method settings are versioned per partition by the `recipe/method` source (an edit of
    # one method re-trains only that partition), so they are not part of the asset's code version.
    cv_adapter = c.code_version("adapter", recipe)
    cv_merged = c.code_version("merged_model", recipe)
    common = dict(partitions_def=parts, pool="gpu")
    recipe_dep = [dg.AssetDep(RECIPE_METHOD_KEY)]

    if quantized:
        @dg.asset(group_name="training", kinds={"pytorch", "peft"}, code_version=cv_adapter, deps=recipe_dep, **common)
        def adapter(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                    sft_dataset: Artifact, base_model: Artifact, quantized_base: Artifact):
            """The trained adapter (or trained weights) of one method: one partition per recipe method."""
            return _train_adapter(context, recipe, compute, store.store(), sft_dataset, base_model, quantized_base, cv_adapter)

        @dg.asset(group_name="training", kinds={"pytorch", "safetensors"}, code_version=cv_merged,
                  check_specs=[dg.AssetCheckSpec("matches_adapter", asset="merged_model", partitions_def=parts)], **common)
        def merged_model(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                         adapter: Artifact, base_model: Artifact, quantized_base: Artifact, sft_dataset: Artifact):
            """The adapter merged into full-precision base weights, ready to deploy."""
            yield from _merge(context, recipe, compute, store.store(), adapter, base_model, quantized_base, sft_dataset, cv_merged)
    else:
        @dg.asset(group_name="training", kinds={"pytorch", "peft"}, code_version=cv_adapter, deps=recipe_dep, **common)
        def adapter(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                    sft_dataset: Artifact, base_model: Artifact):
            """The trained adapter (or trained weights) of one method: one partition per recipe method."""
            return _train_adapter(context, recipe, compute, store.store(), sft_dataset, base_model, None, cv_adapter)

        @dg.asset(group_name="training", kinds={"pytorch", "safetensors"}, code_version=cv_merged,
                  check_specs=[dg.AssetCheckSpec("matches_adapter", asset="merged_model", partitions_def=parts)], **common)
        def merged_model(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                         adapter: Artifact, base_model: Artifact, sft_dataset: Artifact):
            """The adapter merged into full-precision base weights, ready to deploy."""
            yield from _merge(context, recipe, compute, store.store(), adapter, base_model, None, sft_dataset, cv_merged)

    return [adapter, merged_model]
