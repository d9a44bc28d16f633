"""The hybrid loop: `generated_preferences[g]`, one partition per entry g of the recipe's
`generated_preferences:`, pairs a tuned model makes from its own ranked answers.

- inputs, all declared: `adapter[<generator of g>]` (a `StaticPartitionMapping` {generator: g}: the
  UI draws which model made which data, and a new adapter version makes g stale), `sft_dataset` (its
  training prompts and reference answers), `base_model`, and `reward_model[r]` for each reward model
  g ranks by ({r: g}; none: no edge);
- work: `trainers.generated_preferences.run` (sample, rank, pair);
- the artifact: the layout of `preference_dataset` (train.jsonl, eval.jsonl, dataset_info.json;
  rejected.jsonl lists the prompts that made no pair and why) plus `samples.jsonl` (every answer
  with its rewards), so a preference method or reward model with `pairs: g` reads it like human pairs;
- metadata: pairs kept, rewards of chosen vs rejected, the margin, the finished share, a preview.

Versioned like `adapter`: by what made it (input versions, stage code version, g's recipe entry,
the prompt section, seed); the same derivation again reuses the existing version (`force: true`
samples again into a version of its own). Dagster's code version carries the whole section's
hash, so editing it is seen by the automation (entries that did not change are then reused).
"""

import dagster as dg

from ..artifacts.store import Artifact, ArtifactStore
from ..config.recipe import Recipe
from ..data import preferences
from ..data.rows import tokenizer_fingerprint, write_jsonl
from ..models.device import Compute
from ..trainers import generated_preferences as generated
from . import _common as c
from .policy import reward_inputs, reward_requests, sampling_ins
from .resources import ComputeResource, StoreResource

PREVIEW_COLUMNS = ["id", "prompt", "chosen", "chosen_reward", "rejected", "rejected_reward"]


def partitions(recipe: Recipe) -> dg.StaticPartitionsDefinition | None:
    return dg.StaticPartitionsDefinition(list(recipe.generated_preferences)) if recipe.generated_preferences else None


def build(recipe: Recipe) -> list:
    parts = partitions(recipe)
    if parts is None:
        return []
    stage = c.code_version("generated_preferences", recipe)

    @dg.asset(
        key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "data"), kinds={"jsonl"},
        # the section's hash too, so that the automation sees an edit of it (unchanged entries then reuse)
        code_version=c.code_version("generated_preferences", recipe, "generated_preferences"),
        partitions_def=parts, pool="gpu", ins=_ins(recipe),
        description="Preference pairs from a tuned model's own answers, ranked by the recipe's rewards; "
                    "methods and reward models with `pairs:` train on them.",
    )
    def generated_preferences(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                              config: c.TrainingRun, adapter: Artifact, sft_dataset: Artifact, base_model: Artifact,
                              **declared_when_used: dict[str, Artifact]) -> dg.Output:
        """Sampled by the generator, ranked, paired. Its version is that of its inputs, code and
        settings; an existing one is reused (`force` samples again)."""
        return _generate(context, recipe, compute.resolve(), store.store(recipe.pipeline), adapter, sft_dataset,
                         base_model, declared_when_used.get("reward_model") or {}, stage, config.force)

    return [generated_preferences]


def _ins(recipe: Recipe) -> dict[str, dg.AssetIn]:
    return sampling_ins(recipe, {g: (spec.generator, spec.reward_models())
                                 for g, spec in recipe.generated_preferences.items()})


def _generate(context, recipe: Recipe, hw: Compute, store: ArtifactStore, adapter: Artifact, dataset: Artifact,
              base_model: Artifact, reward_models: dict[str, Artifact], stage: str, force: bool) -> dg.Output:
    name = context.partition_key
    spec = recipe.generated_preferences[name]
    c.check_same_base(adapter, spec.generator, base_model)
    inputs = c.inputs_of(adapter, dataset, base_model, *reward_inputs(name, spec.reward_models(), reward_models))
    derivation = c.derivation(inputs, stage, recipe.section_hash("prompt", "seed", generated_preferences=name))
    done = c.reuse_or_say_why(context, store, "generated_preferences", name, derivation, force)
    if done is not None:
        return c.output(done, c.reused_metadata(done))
    try:
        made = generated.run(request(recipe, name, base_model, adapter, dataset, reward_models), hw,
                             log=lambda msg: context.log.info(f"{name}: {msg}"))
    except ValueError as exc:
        raise c.user_error(RuntimeError(f"generated_preferences[{name}]: {exc}")) from None
    art = _write(store, recipe, name, made, inputs, c.forced(derivation, context) if force else derivation, stage,
                 adapter)
    return c.output(art, metadata_of(spec.generator, adapter, made, recipe.evaluation.preview_rows))


def request(recipe: Recipe, name: str, base_model: Artifact, adapter: Artifact, dataset: Artifact,
            reward_models: dict[str, Artifact]) -> generated.GeneratedPreferencesRequest:
    """The one description of entry `name`'s sampling (reward models by their artifact directories)."""
    spec = recipe.generated_preferences[name]
    return generated.GeneratedPreferencesRequest(
        name=name, base_dir=str(base_model.dir), adapter_dir=str(adapter.dir), sft_dataset_dir=str(dataset.path),
        rewards=reward_requests(spec.rank_by, reward_models), answers_per_prompt=spec.answers_per_prompt, max_new_tokens=spec.max_new_tokens,
        temperature=spec.temperature, top_p=spec.top_p, max_prompts=spec.max_prompts, min_margin=spec.min_margin,
        finished_only=spec.finished_only, eval_fraction=spec.eval_fraction, max_length=recipe.prompt.max_length, seed=recipe.seed)


def _write(store: ArtifactStore, recipe: Recipe, name: str, made: generated.GeneratedPreferences,
           inputs: dict[str, str], derivation: dict, stage: str, adapter: Artifact) -> Artifact:
    spec = recipe.generated_preferences[name]
    tok = made.tokenizer
    meta = {"tokenizer_fingerprint": tokenizer_fingerprint(tok), "max_length": recipe.prompt.max_length,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    with store.write("generated_preferences", name, recipe_hash=recipe.recipe_hash, code_version=stage,
                     seed=recipe.seed, derivation=derivation) as st:
        st.inputs = inputs
        preferences.save_preferences(made.built, st.path, meta)
        write_jsonl(st.path / "samples.jsonl", (g.to_json(tok) for g in made.groups))
        st.extra["generated_preferences"] = {"name": name, "spec": spec.model_dump(mode="json"),
                                             "generator": {"method": spec.generator, "version": adapter.version},
                                             "summary": made.summary()}
    return st.artifact


def metadata_of(generator: str, adapter: Artifact, made: generated.GeneratedPreferences, preview_rows: int) -> dict:
    summary = made.summary()
    preview = []
    for g in [g for g in made.groups if g.pair][:preview_rows]:
        chosen, rejected = (g.answers[i] for i in g.pair)
        preview.append({"id": g.example_id, "prompt": g.to_json(made.tokenizer)["prompt"], "chosen": chosen.text,
                        "chosen_reward": round(chosen.reward, 4), "rejected": rejected.text,
                        "rejected_reward": round(rejected.reward, 4)})
    unpaired = [{"id": g.example_id, "why": g.why} for g in made.groups if not g.pair][:50]
    return {
        "generator": f"adapter[{generator}] {adapter.version}",
        **{k: summary[k] for k in ("prompts", "answers", "pairs", "train_pairs", "eval_pairs")},
        **{k: summary[k] for k in ("mean_chosen_reward", "mean_rejected_reward", "mean_margin", "mean_reward",
                                   "finished_fraction") if summary[k] is not None},
        "preview": c.table(preview, PREVIEW_COLUMNS),
        "no_pair": c.table(unpaired, ["id", "why"]),
        "wall_time_s": summary["wall_time_s"],
    }
