"""Reward models: `reward_model[r]`, one partition per entry r of the recipe's `reward_models:`.

- inputs: `base_model` and `preference_dataset[r]` (the recipe's pairs: every partition of
  `preference_dataset` holds the same ones), or `generated_preferences[g]` when r says `pairs: g`,
  all declared, so a new base or new pairs make r stale;
- work: `trainers.reward.run` (TRL's RewardTrainer, LoRA + head or full; in the step, or on
  torchrun's ranks as `compute.launcher` says: `defs.launchers`), then its held-out pairs scored
  in the step (`trainers.reward.evaluate`);
- the artifact: a plain `AutoModelForSequenceClassification` directory (merged: config,
  safetensors, tokenizer), `train_log.json` (loss, accuracy, margin per step) and
  `heldout.json` (pairwise accuracy, mean margin, calibration bins, each pair's two scores);
- metadata: held-out accuracy against chance (0.5), mean margin, the calibration table and plot,
  the loss curve.

Versioned like `adapter`: by what made it (input versions, stage code version, r's recipe
section, its training settings, seed); the same derivation again reuses the existing version
(`force: true` retrains into a version of its own). Checkpoints go to
$FT_HOME/checkpoints/reward_model/r/<derived version>; a re-run after a crash resumes there.
Dagster's code version carries the `reward_models:` section's hash, so the automation sees an edit
of it (entries that did not change are then reused).
"""

import json
from typing import Any

import dagster as dg

from ..artifacts.store import Artifact, derived_version
from ..config.recipe import Recipe
from ..data import preferences
from ..evaluation import plots
from ..trainers import reward
from . import _common as c, launchers
from .models import MODEL_BYTES_HEADROOM
from .preferences import pairs_ins, pairs_of
from .resources import ComputeResource, StoreResource

CALIBRATION_COLUMNS = ["bin", "pairs", "predicted", "observed"]


def partitions(recipe: Recipe) -> dg.StaticPartitionsDefinition | None:
    return dg.StaticPartitionsDefinition(list(recipe.reward_models)) if recipe.reward_models else None


def build(recipe: Recipe) -> list:
    parts = partitions(recipe)
    if parts is None:
        return []
    cv = c.code_version("reward_model", recipe)

    @dg.asset(
        key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "training"), kinds={"pytorch", "safetensors"},
        # the section's hash too, so that the automation sees an edit of it (unchanged entries then reuse)
        code_version=c.code_version("reward_model", recipe, "reward_models"), partitions_def=parts, pool="gpu",
        ins={**pairs_ins(recipe, list(recipe.reward_models)), "base_model": c.asset_in(recipe)},
        description="A reward model (one-score head on the base) trained on the preference pairs; its "
                    "held-out pairwise accuracy and calibration.",
    )
    def reward_model(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                     config: c.TrainingRun, base_model: Artifact, **pairs: Artifact | None) -> dg.Output:
        """Trained on the pairs, scored on the held-out ones. Its version is that of its inputs,
        code and settings; an existing one is reused (`force` retrains)."""
        name, preference_dataset = context.partition_key, pairs_of(pairs)
        artifacts = store.store(recipe.pipeline)
        inputs = c.inputs_of(preference_dataset, base_model)
        derivation = c.derivation(inputs, cv, settings_of(recipe, name))
        done = c.reuse_or_say_why(context, artifacts, "reward_model", name, derivation, config.force)
        if done is not None:
            return c.output(done, c.reused_metadata(done))
        hw = compute.resolve()
        ckpts = artifacts.checkpoints("reward_model", name, derived_version(derivation))
        request = reward_request(recipe, name, base_model, preference_dataset, ckpts.dir)
        with c.training_failures(context, name, user_errors=(launchers.JobFailed,)):
            trained = launchers.train_method(context, request, recipe.compute, hw, ckpts)
        heldout = reward.evaluate(*trained.scorer(hw.device), preferences.load_pairs(preference_dataset.path, "eval"),
                                  hw.device)
        art = _write(artifacts, recipe, name, trained, heldout, inputs,
                     c.forced(derivation, context) if config.force else derivation, cv, hw.name)
        ckpts.finished()  # the artifact supersedes its checkpoints
        return c.output(art, {**metadata_of(name, trained, heldout, hw.name), **launchers.facts(recipe, request)})

    return [reward_model]


def settings_of(recipe: Recipe, name: str) -> str:
    """The recipe settings part of the derivation: r's section, its training settings, the prompt
    (the pairs' rendering) and the seed."""
    return recipe.section_hash("prompt", "seed", reward_model=name)


def reward_request(recipe: Recipe, name: str, base_model: Artifact, prefs: Artifact, checkpoint_dir) -> reward.RewardRequest:
    """The one description of reward model `name`'s run."""
    spec = recipe.reward_models[name]
    return reward.RewardRequest(
        name=name, base_dir=str(base_model.dir), preference_dataset_dir=str(prefs.path),
        training=recipe.training_for_reward_model(name).model_dump(mode="json"), seed=recipe.seed,
        adapter=spec.adapter_keys(), center_rewards=spec.center_rewards, max_length=recipe.prompt.max_length,
        checkpoint_dir=str(checkpoint_dir))


def _write(artifacts, recipe: Recipe, name: str, trained: reward.RewardTraining | reward.TrainedElsewhere,
           heldout: dict[str, Any],
           inputs: dict[str, str], derivation: dict[str, Any], cv: str, device: str) -> Artifact:
    with artifacts.write("reward_model", name, recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed,
                         min_free_bytes=MODEL_BYTES_HEADROOM, derivation=derivation) as st:
        st.inputs = inputs
        trained.save(st.path)
        (st.path / "heldout.json").write_text(json.dumps(heldout, indent=2, sort_keys=True) + "\n")
        spec = recipe.reward_models[name]
        st.extra["reward_model"] = {"type": spec.type, "spec": spec.model_dump(mode="json"),
                                    "training": recipe.training_for_reward_model(name).model_dump(mode="json"),
                                    "heldout": {k: heldout[k] for k in ("pairs", "accuracy", "mean_margin")}}
        st.extra["train"] = {**trained.result.summary(), "device": device}
    return st.artifact


def metadata_of(name: str, trained: reward.RewardTraining | reward.TrainedElsewhere, heldout: dict[str, Any], device: str) -> dict[str, Any]:
    result = trained.result
    loss_png = plots.loss_curve_png(result.losses, f"{name}: reward model loss (Bradley-Terry)")
    cal_png = plots.calibration_png(heldout["calibration"], f"{name}: held-out calibration")
    return {
        "heldout_accuracy": heldout["accuracy"],
        "heldout_mean_margin": heldout["mean_margin"],
        "heldout_pairs": heldout["pairs"],
        "chance_accuracy": 0.5,
        "calibration": c.table(heldout["calibration"], CALIBRATION_COLUMNS),
        "calibration_plot": dg.MetadataValue.md(plots.markdown_image(cal_png, f"{name} calibration")),
        "loss_curve": dg.MetadataValue.md(plots.markdown_image(loss_png, f"{name} loss curve")),
        "losses": dg.MetadataValue.json([list(x) for x in result.losses]),
        **{cu.shown_as: dg.MetadataValue.json([list(x) for x in getattr(result, cu.field)]) for cu in reward.CURVES},
        "train_pairs": trained.pairs,
        "trainable_parameters": result.trainable_parameters,
        "steps": result.steps,
        "wall_time_s": round(result.wall_s, 2),
        "device": device,
    }
