"""`adapter` (one partition per recipe method) and `merged_model`.

- `adapter[method]`: loads the base (or, for QLoRA, `quantized_base`), wraps it with the
  method, trains it with `core.train` on the `sft_dataset` train split, and saves only what
  was trained. Checkpoints go to $FT_HOME/checkpoints/... during training (a re-run with the
  same inputs resumes from the newest one). Metadata: trainable parameters, loss curve (image
  + numbers), tokens trained, tokens/s, peak memory, wall time.
- `merged_model[method]`: the adapter folded into full-precision base weights, saved as a
  plain transformers checkpoint; check `matches_adapter` compares its logits with
  base+adapter, relative to the logit scale, against the rounding the method's merge
  explains (`core.merge.compare`). Methods that cannot merge record why and still materialize.

Beyond SFT (only for recipes that ask for it; other partitions train exactly as before):
- `adapter[<dpo method>]`: the latest `adapter[<sft_from>]` (read from the store: Dagster cannot
  draw an edge between two partitions of one static-partitioned asset) continued with TRL's
  DPOTrainer on `preference_dataset[<dpo method>]` (a real Dagster dependency, mapped
  partition-to-partition). The manifest inputs name `adapter[<sft_from>]` and its version; the
  `recipe/method` source folds that version into the dpo partition's data version, so a new
  SFT adapter makes the dpo partition stale.
- `continue_from: previous`: the method starts from its own previous adapter version when the
  data changed (`core.continual.pick_start`), replaying `replay_fraction` of the previous
  sft_dataset's train split; manifest inputs name that adapter version under `adapter[<method>]`.
"""


import math
import shutil
from pathlib import Path

import dagster as dg
import torch

from ..core import continual, data, merge, plots, train
from ..core.methods import NotMergeable, get_method
from ..core.models import load_model, load_tokenizer, parameter_count
from ..core.quantize import compute_dtype, load_quantized
from ..recipe import Recipe
from ..store import Artifact, ArtifactStore, derived_version, dir_bytes
from . import _common as c
from .automation import RECIPE_METHOD_KEY
from .models import MODEL_BYTES_HEADROOM
from .preferences import preference_dep
from .resources import ComputeResource, StoreResource


def methods_partitions(recipe: Recipe) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(list(recipe.methods))


def _train_adapter(context, recipe: Recipe, compute: ComputeResource, store: ArtifactStore,
                   sft_dataset: Artifact, base_model: Artifact, quantized_base: Artifact | None, cv: str,
                   force: bool):
    name = context.partition_key
    spec = recipe.methods[name]
    if spec.type == "dpo":
        return _train_dpo(context, recipe, compute, store, base_model, cv, force)
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
    start, replay = None, []
    if spec.continue_from == "previous":
        start = _continual_start(store, name, spec, sft_dataset, base_model)
        context.log.info(f"{name}: {start.reason}")
        replay = _replay(context, store, start, spec, examples, info, recipe.seed)
        examples = examples + replay

    inputs = c.inputs_of(sft_dataset, base_model, quantized_base if method.uses_quantized_base else None)
    if start is not None and not start.from_scratch:
        inputs[f"adapter[{name}]"] = start.adapter_version  # the version this run continued from
    derivation = c.derivation(inputs, cv, recipe.section_hash("seed", method=name))
    done = c.reuse_or_say_why(context, store, "adapter", name, derivation, force)
    if done is not None:
        return c.output(done, c.reused_metadata(done))

    if method.uses_quantized_base:
        model = load_quantized(quantized_base.dir, hw.device, compute_dtype(recipe.quantization.compute_dtype, hw.device))
    else:
        model = load_model(base_model.path, hw.device, hw.dtype)
    train.seed_everything(cfg.seed)  # adapter init is random: seed it so reruns are reproducible
    model = method.wrap(model, spec, gradient_checkpointing=cfg.gradient_checkpointing)
    if start is not None and not start.from_scratch:
        continual.load_state(model, method, Path(start.adapter_path))
    trainable, total = parameter_count(model)
    context.log.info(f"{name}: {trainable:,} trainable of {total:,} parameters; {len(examples)} train rows; "
                     f"{train.steps_for(len(examples), cfg)} steps on {hw.device}")

    ckpt_dir = store.home / "checkpoints" / "adapter" / name / derived_version(derivation)
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

    with store.write("adapter", name, recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed,
                     derivation=c.forced(derivation, context) if force else derivation) as st:
        st.inputs = inputs
        method.save(model, st.path)
        st.extra["method"] = {"name": name, "type": spec.type, "spec": spec.model_dump(mode="json"),
                              "training": recipe.training_for(name).model_dump(mode="json")}
        st.extra["train"] = {**result.summary(), "trainable_parameters": trainable, "total_parameters": total,
                             "device": hw.name}
        if start is not None:
            st.extra["continual"] = _continual_facts(store, name, start, replay, spec)
        c.write_json(st.path / "train_log.json", result.log())
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: the artifact supersedes its checkpoints
    art = st.artifact
    png = plots.loss_curve_png(result.losses, f"{name}: train loss")
    extra = {}
    if start is not None:
        extra = {"continued_from": start.adapter_version or "scratch", "continue_reason": start.reason,
                 "replay_rows": len(replay),
                 "continued_from_path": dg.MetadataValue.path(start.adapter_path) if start.adapter_path else "-"}
    return c.output(art, {
        **extra,
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


# --------------------------------------------------------------------------------------
# continual learning
# --------------------------------------------------------------------------------------


def _continual_start(store: ArtifactStore, name: str, spec, sft_dataset: Artifact, base_model: Artifact):
    prev = store.latest("adapter", name)  # the newest version before this run

    def manifest_of(version: str):
        art = store.get("adapter", name, version)
        return (art.manifest(), art.path) if art else None

    return continual.pick_start(prev.manifest() if prev else None, prev.path if prev else None,
                                sft_dataset=sft_dataset.version, base_model=base_model.version,
                                spec=spec.model_dump(mode="json"), manifest_of=manifest_of)


def _replay(context, store: ArtifactStore, start, spec, examples, info: dict, seed: int) -> list:
    if start.from_scratch or not spec.replay_fraction or not start.previous_sft_dataset:
        return []
    old = store.get("sft_dataset", None, start.previous_sft_dataset)
    if old is None:
        context.log.warning(f"previous sft_dataset {start.previous_sft_dataset} is gone: no replay")
        return []
    if data.dataset_info(old.path).get("tokenizer_fingerprint") != info["tokenizer_fingerprint"]:
        context.log.warning("previous sft_dataset used another tokenizer: no replay")
        return []
    rows = continual.replay_rows(data.load_split(old.path, "train"), examples, spec.replay_fraction, seed)
    context.log.info(f"replaying {len(rows)} rows of sft_dataset {old.version} ({spec.replay_fraction:.0%} of its train split)")
    return rows


def _continual_facts(store: ArtifactStore, name: str, start, replay: list, spec) -> dict:
    return {
        "continued_from": None if start.from_scratch else {"version": start.adapter_version, "path": start.adapter_path},
        "previous_sft_dataset": start.previous_sft_dataset,
        "reason": start.reason,
        "replay_fraction": spec.replay_fraction,
        "replay_rows": len(replay),
    }


# --------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------


def _train_dpo(context, recipe: Recipe, compute: ComputeResource, store: ArtifactStore, base_model: Artifact, cv: str,
               force: bool):
    from peft import PeftModel

    from ..core import dpo, preferences

    name = context.partition_key
    spec = recipe.methods[name]
    hw = compute.resolve()
    sft = store.latest("adapter", spec.sft_from)
    if sft is None:
        raise c.user_error(RuntimeError(f"{name} continues adapter[{spec.sft_from}], which has not been "
                                        f"materialized yet; materialize adapter[{spec.sft_from}] first"))
    if sft.manifest().get("inputs", {}).get("base_model") != base_model.version:
        raise c.user_error(RuntimeError(f"adapter[{spec.sft_from}] {sft.version} was trained on another base_model; "
                                        f"re-materialize adapter[{spec.sft_from}] first"))
    prefs = store.latest("preference_dataset", name)
    if prefs is None:
        raise c.user_error(RuntimeError(f"preference_dataset[{name}] has not been materialized yet; materialize it first"))
    tok = load_tokenizer(base_model.path)
    if data.tokenizer_fingerprint(tok) != data.dataset_info(prefs.path)["tokenizer_fingerprint"]:
        raise c.user_error(RuntimeError("preference_dataset was built with a different tokenizer than base_model "
                                        "has now; re-materialize preference_dataset"))
    inputs = {**c.inputs_of(sft, base_model), c.key_of(prefs): prefs.version}
    derivation = c.derivation(inputs, cv, recipe.section_hash("seed", method=name))
    done = c.reuse_or_say_why(context, store, "adapter", name, derivation, force)
    if done is not None:
        return c.output(done, c.reused_metadata(done))
    pairs = preferences.load_pairs(prefs.path, "train")
    cfg = train.TrainConfig.from_spec(recipe.training_for(name), recipe.seed)
    train.seed_everything(cfg.seed)
    train.reset_peak_memory(hw.device)
    model = PeftModel.from_pretrained(load_model(base_model.path, hw.device, hw.dtype), sft.dir, is_trainable=True)
    trainable, total = parameter_count(model)
    context.log.info(f"{name}: DPO from adapter[{spec.sft_from}] {sft.version} on {len(pairs)} pairs, "
                     f"{dpo.dpo_steps(len(pairs), cfg)} steps, beta {spec.beta}, on {hw.device}")
    try:
        result = dpo.train_dpo(
            model, tok, pairs, cfg, beta=spec.beta, loss_type=spec.loss_type, max_length=recipe.prompt.max_length,
            device=hw.device, work_dir=_work_dir(store),
            on_log=lambda step, loss: context.log.info(f"step {step}: DPO loss {loss:.4f}"))
    except torch.OutOfMemoryError as exc:
        raise c.user_error(RuntimeError(out_of_memory_hint(name, cfg, hw.device, exc))) from None
    if not all(math.isfinite(l) for _, l in result.losses):
        raise c.user_error(train.TrainingDiverged(f"{name}: DPO loss is not finite; lower the learning rate (now {cfg.lr})"))
    summary = {**result.summary(), "trainable_parameters": trainable, "total_parameters": total, "device": hw.name,
               "peak_memory_bytes": train.peak_memory_bytes(hw.device)}
    with store.write("adapter", name, recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed,
                     derivation=c.forced(derivation, context) if force else derivation) as st:
        st.inputs = inputs
        dpo.save_dpo_adapter(model, st.path)
        st.extra["method"] = {"name": name, "type": spec.type, "spec": spec.model_dump(mode="json"),
                              "training": recipe.training_for(name).model_dump(mode="json")}
        st.extra["dpo"] = {"sft_adapter": {"method": spec.sft_from, "version": sft.version, "path": sft.path},
                           "preference_dataset": prefs.version, "beta": spec.beta, "loss_type": spec.loss_type}
        st.extra["train"] = summary
        c.write_json(st.path / "train_log.json", {"losses": result.losses, "reward_accuracies": result.reward_accuracies,
                                                  "reward_margins": result.reward_margins, **summary})
    art = st.artifact
    png = plots.loss_curve_png(result.losses, f"{name}: DPO loss")
    return c.output(art, {
        "method": spec.type,
        "sft_adapter": f"adapter[{spec.sft_from}] {sft.version}",
        "sft_adapter_path": dg.MetadataValue.path(sft.path),
        "preference_dataset": prefs.version,
        "train_pairs": len(pairs),
        "beta": spec.beta,
        "trainable_parameters": trainable,
        "trainable_percent": round(100 * trainable / total, 4),
        "loss_curve": dg.MetadataValue.md(plots.markdown_image(png, f"{name} DPO loss curve")),
        "losses": dg.MetadataValue.json([[s_, l] for s_, l in result.losses]),
        "train_reward_accuracy": dg.MetadataValue.json([[s_, a] for s_, a in result.reward_accuracies]),
        "train_reward_margin": dg.MetadataValue.json([[s_, m] for s_, m in result.reward_margins]),
        "first_loss": result.losses[0][1] if result.losses else None,
        "final_loss": result.losses[-1][1] if result.losses else None,
        "steps": result.steps,
        "wall_time_s": round(result.wall_s, 2),
        "adapter_bytes": dir_bytes(art.dir),
        "device": hw.name,
    })


def _work_dir(store: ArtifactStore) -> Path:
    d = store.home / "checkpoints" / "dpo"
    d.mkdir(parents=True, exist_ok=True)
    return d


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
    cmp = merge.check_saved_merge(method, art.dir, base_model.dir, adapter.dir, q_dir, examples, pad, hw.device)
    numbers = cmp.numbers()
    yield c.output(art, {"mergeable": True, "bytes": dir_bytes(art.dir), **numbers})
    yield dg.AssetCheckResult(
        check_name="matches_adapter", passed=cmp.passed,
        metadata={**numbers, "expected": cmp.expected, "prompts": len(examples)},
        description=f"logits off by {cmp.relative_diff:.3g} of their scale (tolerance {cmp.tolerance:.3g}); "
                    f"worst layer {cmp.worst_layer} off by {cmp.layer_relative_diff:.3g} "
                    f"(tolerance {cmp.layer_tolerance:.3g}). {cmp.expected}",
    )


MATCHES_ADAPTER = (
    "The merged model computes what base + adapter computes, up to what float rounding explains: "
    "every Linear layer on random inputs (2·(2·sqrt(K)+1)·u of its output scale) and the logits on "
    "eval prompts (identical weights: one rounding u; folded weights: (4L+1)·sqrt(K)·u of the logit "
    "scale). A failure names the layer furthest off. See ft_assets/core/merge.py."
)


def build(recipe: Recipe) -> list:
    parts = methods_partitions(recipe)
    quantized = recipe.quantization.method != "none"
    # Per-method settings are versioned per partition by the `recipe/method` source (an edit of
    # one method re-trains only that partition), so they are not part of the asset's code version.
    cv_adapter = c.code_version("adapter", recipe)
    cv_merged = c.code_version("merged_model", recipe)
    common = dict(partitions_def=parts, pool="gpu")
    recipe_dep = [dg.AssetDep(RECIPE_METHOD_KEY), *preference_dep(recipe)]

    # quantized_base is an input only when the recipe quantizes (QLoRA trains on it)
    q_in = {"quantized_base": dg.AssetIn()} if quantized else {}

    @dg.asset(group_name="training", kinds={"pytorch", "peft"}, code_version=cv_adapter, deps=recipe_dep,
              ins={"sft_dataset": dg.AssetIn(), "base_model": dg.AssetIn(), **q_in}, **common)
    def adapter(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                config: c.TrainingRun, **inputs):
        """The trained adapter (or trained weights) of one method: one partition per recipe method.
        Its version is that of its inputs, code and settings; an existing one is reused (`force` retrains)."""
        return _train_adapter(context, recipe, compute, store.store(), inputs["sft_dataset"], inputs["base_model"],
                              inputs.get("quantized_base"), cv_adapter, config.force)

    @dg.asset(group_name="training", kinds={"pytorch", "safetensors"}, code_version=cv_merged,
              ins={"adapter": dg.AssetIn(), "base_model": dg.AssetIn(), "sft_dataset": dg.AssetIn(), **q_in},
              check_specs=[dg.AssetCheckSpec("matches_adapter", asset="merged_model", partitions_def=parts,
                                           description=MATCHES_ADAPTER)], **common)
    def merged_model(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource, **inputs):
        """The adapter merged into full-precision base weights, ready to deploy."""
        yield from _merge(context, recipe, compute, store.store(), inputs["adapter"], inputs["base_model"],
                          inputs.get("quantized_base"), inputs["sft_dataset"], cv_merged)

    return [adapter, merged_model]
