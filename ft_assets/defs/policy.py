"""Policy optimization: `policy_adapter[p]`, one partition per entry p of the recipe's `policies:`.

- inputs, all declared: `adapter[<sft_from of p>]` (through a `StaticPartitionMapping` {sft_from: p},
  so the UI draws the edge and a new SFT adapter version makes p stale), `sft_dataset` (its train
  prompts and reference answers; its eval split for the report), `base_model`, and
  `reward_model[r]` for each reward model p's rewards read ({r: p}; none: no edge);
- work: `trainers.policy.run` (TRL's GRPOTrainer, the SFT adapter continued against the weighted
  rewards, KL to the SFT adapter with beta; in the step, or on torchrun's ranks as
  `compute.launcher` says: `defs.launchers`), then, in the step, the held-out prompts answered by
  the policy and by its SFT start (`trainers.policy_eval.evaluate_heldout`);
- the artifact: a plain peft adapter directory (the SFT adapter's config, tuned weights),
  `train_log.json` (loss, reward, reward std, KL and each reward function's mean per step) and
  `policy_eval.json` (mean reward, each function's, exact match / token F1 / ROUGE-L of the policy
  and of its start, the KL estimate, every answer);
- metadata: held-out reward of the policy against its start, task metrics, KL, the reward curve.

Versioned like `adapter`: by what made it (input versions, stage code version, p's recipe section,
its training settings, the prompt section, seed); the same derivation again reuses the existing
version (`force: true` retrains into a version of its own). Checkpoints go to
$FT_HOME/checkpoints/policy_adapter/p/<derived version>; a re-run after a crash resumes there.
Dagster's code version carries the `policies:` section's hash, so the automation sees an edit of
it (entries that did not change are then reused).
"""

import json
from typing import Any

import dagster as dg

from ..artifacts.store import Artifact, ArtifactStore, derived_version, dir_bytes
from ..config.policy import RewardSpec
from ..config.recipe import Recipe
from ..evaluation import plots
from ..models.device import Compute
from ..trainers import policy, policy_eval
from . import _common as c, launchers
from .resources import ALL_PARTITIONS, ComputeResource, StoreResource

EVAL_COLUMNS = ["model", "reward", "exact_match", "token_f1", "rouge_l"]


def partitions(recipe: Recipe) -> dg.StaticPartitionsDefinition | None:
    return dg.StaticPartitionsDefinition(list(recipe.policies)) if recipe.policies else None


def build(recipe: Recipe) -> list:
    parts = partitions(recipe)
    if parts is None:
        return []
    cv = c.code_version("policy_adapter", recipe)

    @dg.asset(
        key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "training"), kinds={"pytorch", "peft"},
        # the section's hash too, so that the automation sees an edit of it (unchanged entries then reuse)
        code_version=c.code_version("policy_adapter", recipe, "policies"), partitions_def=parts, pool="gpu", ins=_ins(recipe),
        description="An SFT adapter continued with GRPO against the recipe's rewards; its held-out reward, task "
                    "metrics and KL against the SFT start.",
    )
    def policy_adapter(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                       config: c.TrainingRun, adapter: Artifact, sft_dataset: Artifact, base_model: Artifact,
                       **declared_when_used: dict[str, Artifact]) -> dg.Output:
        """Optimized against its rewards, evaluated on held-out prompts beside its SFT start. Its
        version is that of its inputs, code and settings; an existing one is reused (`force` retrains)."""
        return _optimize(context, recipe, compute.resolve(), store.store(recipe.pipeline), adapter, sft_dataset,
                         base_model, declared_when_used.get("reward_model") or {}, cv, config.force)

    return [policy_adapter]


def _ins(recipe: Recipe) -> dict[str, dg.AssetIn]:
    return sampling_ins(recipe, {p: (spec.sft_from, spec.reward_models()) for p, spec in recipe.policies.items()})


def sampling_ins(recipe: Recipe, partitions: dict[str, tuple[str, list[str]]]) -> dict[str, dg.AssetIn]:
    """The inputs of an asset whose partitions sample from an SFT adapter and score with reward models
    (policy_adapter, generated_preferences): `partitions` = {partition: (its adapter's method, the
    reward models it reads)}. `adapter` and `reward_model` mapped to those partitions (no reward
    model read: no `reward_model` input), `sft_dataset` and `base_model`."""
    sources: dict[str, list[str]] = {}
    readers: dict[str, list[str]] = {}
    for name, (method, reward_models) in partitions.items():
        sources.setdefault(method, []).append(name)
        for r in reward_models:
            readers.setdefault(r, []).append(name)
    ins = {"adapter": c.asset_in(recipe, partition_mapping=dg.StaticPartitionMapping(sources)),
           "sft_dataset": c.asset_in(recipe), "base_model": c.asset_in(recipe)}
    if readers:  # {r: artifact} of the reward models a partition reads ({} for one that reads none)
        ins["reward_model"] = c.asset_in(recipe, partition_mapping=dg.StaticPartitionMapping(readers),
                                         metadata={ALL_PARTITIONS: True})
    return ins


def _optimize(context, recipe: Recipe, hw: Compute, store: ArtifactStore, sft: Artifact, dataset: Artifact,
              base_model: Artifact, reward_models: dict[str, Artifact], cv: str, force: bool) -> dg.Output:
    name = context.partition_key
    spec = recipe.policies[name]
    c.check_same_base(sft, spec.sft_from, base_model)
    inputs = c.inputs_of(sft, dataset, base_model, *reward_inputs(name, spec.reward_models(), reward_models))
    derivation = c.derivation(inputs, cv, recipe.section_hash("prompt", "seed", policy=name))
    done = c.reuse_or_say_why(context, store, "policy_adapter", name, derivation, force)
    if done is not None:
        return c.output(done, c.reused_metadata(done))
    ckpts = store.checkpoints("policy_adapter", name, derived_version(derivation))
    request = policy_request(recipe, name, base_model, sft, dataset, reward_models, ckpts.dir)
    with c.training_failures(context, name, user_errors=(launchers.JobFailed,)):
        tuned = launchers.train_method(context, request, recipe.compute, hw, ckpts)
    heldout = policy_eval.evaluate_heldout(request, tuned, hw, max_new_tokens=spec.max_completion_length,
                                           batch_size=recipe.evaluation.batch_size, limit=spec.heldout_prompts)
    art = _write(store, recipe, name, tuned, heldout, inputs, c.forced(derivation, context) if force else derivation,
                 cv, hw.name, sft)
    ckpts.finished()  # the artifact supersedes its checkpoints
    return c.output(art, {**metadata_of(name, spec.sft_from, tuned, heldout, art, hw.name),
                          **launchers.facts(recipe, request)})


def policy_request(recipe: Recipe, name: str, base_model: Artifact, sft: Artifact, dataset: Artifact,
                   reward_models: dict[str, Artifact], checkpoint_dir) -> policy.PolicyRequest:
    """The one description of policy `name`'s run (reward models by their artifact directories)."""
    spec = recipe.policies[name]
    rewards = reward_requests(spec.rewards, reward_models)
    return policy.PolicyRequest(
        name=name, base_dir=str(base_model.dir), sft_adapter_dir=str(sft.dir), sft_dataset_dir=str(dataset.path),
        rewards=rewards, settings=spec.trainer_settings(),
        training=recipe.training_for_policy(name).model_dump(mode="json"), seed=recipe.seed,
        checkpoint_dir=str(checkpoint_dir), max_prompts=spec.max_prompts)


def reward_inputs(name: str, needed: list[str], reward_models: dict[str, Artifact]) -> list[Artifact]:
    """The reward models partition `name` reads, in `needed`'s order; a missing one is a user error."""
    missing = [r for r in needed if r not in reward_models]
    if missing:
        raise c.user_error(RuntimeError(f"{name}: reward_model[{missing[0]}] has no materialization; materialize it "
                                        "first"))
    return [reward_models[r] for r in needed]


def reward_requests(specs: list[RewardSpec], reward_models: dict[str, Artifact]) -> list[dict[str, Any]]:
    """The recipe's rewards as `trainers.rewards.build_rewards` takes them (a reward model by its
    artifact directory)."""
    return [{"type": r.type, "weight": r.weight, **({"pattern": r.pattern} if r.pattern is not None else {}),
             **({"model_dir": str(reward_models[r.reward_model].dir)} if r.reward_model else {})} for r in specs]


def _write(store: ArtifactStore, recipe: Recipe, name: str, tuned: policy.PolicyTraining | policy.TrainedElsewhere,
           heldout: dict[str, Any],
           inputs: dict[str, str], derivation: dict[str, Any], cv: str, device: str, sft: Artifact) -> Artifact:
    spec = recipe.policies[name]
    with store.write("policy_adapter", name, recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed,
                     derivation=derivation) as st:
        st.inputs = inputs
        tuned.save(st.path)
        (st.path / "policy_eval.json").write_text(json.dumps(heldout, indent=2, sort_keys=True) + "\n")
        st.extra["policy"] = {"name": name, "algorithm": spec.algorithm, "spec": spec.model_dump(mode="json"),
                              "training": recipe.training_for_policy(name).model_dump(mode="json"),
                              "sft_adapter": {"method": spec.sft_from, "version": sft.version},
                              "heldout": {k: heldout[k] for k in ("examples", "policy", "start", "kl")}}
        st.extra["train"] = {**tuned.result.summary(), "device": device}
    return st.artifact


def metadata_of(name: str, sft_from: str, tuned: policy.PolicyTraining | policy.TrainedElsewhere,
                heldout: dict[str, Any], art: Artifact, device: str) -> dict[str, Any]:
    result = tuned.result
    png = plots.loss_curve_png(result.rewards, f"{name}: GRPO mean reward per step")
    rows = [{"model": who, "reward": heldout[who]["reward"],
             **{k: heldout[who].get(k) for k in ("exact_match", "token_f1", "rouge_l")}}
            for who in ("policy", "start")]
    return {
        "heldout_reward": heldout["policy"]["reward"],
        "start_heldout_reward": heldout["start"]["reward"],
        "heldout_token_f1": heldout["policy"].get("token_f1"),
        "start_heldout_token_f1": heldout["start"].get("token_f1"),
        "heldout_kl_from_start": heldout["kl"],
        "heldout_prompts": heldout["examples"],
        "heldout": c.table(rows, EVAL_COLUMNS),
        "rewards_by_function": dg.MetadataValue.json({who: heldout[who]["rewards"] for who in ("policy", "start")}),
        "sft_adapter": f"adapter[{sft_from}]",
        "reward_curve": dg.MetadataValue.md(plots.markdown_image(png, f"{name} reward curve")),
        **{cu.shown_as: dg.MetadataValue.json([list(x) for x in getattr(result, cu.field)])
           for cu in result.curves() if getattr(result, cu.field)},
        "train_prompts": tuned.prompts,
        "trainable_parameters": result.trainable_parameters,
        "steps": result.steps,
        "wall_time_s": round(result.wall_s, 2),
        "adapter_bytes": dir_bytes(art.dir),
        "device": device,
    }
