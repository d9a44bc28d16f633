"""Preference tuning: `preference_dataset[d]` and `preference_adapter[d]`, one partition per
preference method d of the recipe (dpo, orpo, simpo, kto: `methods/preference.py`).

- `preference_dataset[d]`: the recipe's prompt/chosen/rejected pairs (text, or TRL's
  conversational form; a file or `format: hf`), or with `schema: unpaired` its prompt/completion/label
  answers (TRL's KTO form, for kto only) -> validated, chat-rendered, seeded train/eval
  splits of pairs (labelled answers). Same contract as `sft_dataset`: a file that cannot be parsed
  fails with file and line; unusable rows are counted, written to `rejected.jsonl` and fail the
  asset above `preferences.max_rejected_fraction`; the split is a seeded hash of each pair's id.
  `raw/<preferences.name>` is an observable source. Blocking check `usable`: a non-empty training
  split whose answers all end with end-of-turn. Every partition holds the same pairs; a method or
  reward model with `pairs: g` has no partition here (it reads `generated_preferences[g]`).
- `preference_adapter[d]`: `adapter[<sft_from of d>]` continued with d's objective (TRL's trainer
  for it) on `preference_dataset[d]`, or on `generated_preferences[g]` when d says `pairs: g`
  (`trainers.preference.run`; in the step, or under torchrun as `compute.launcher` says:
  `defs.launchers`). Every input is declared: the SFT adapter
  through a `StaticPartitionMapping` {sft_from: d} (another asset's partition, so the UI draws the
  edge and a new SFT adapter version makes d stale), the pairs likewise (`pairs_ins`). Versioned
  like `adapter`: by what made it (inputs, code, d's recipe section, seed); an identical request
  reuses the existing version (`force` retrains). `merged_model[d]` and `eval_report[d]` read it.
"""


import dagster as dg

from ..data import rows as data, preferences
from ..trainers import preference as tuning
from ..evaluation import plots
from ..models.device import Compute
from ..models.base_model import load_tokenizer
from ..config.recipe import Recipe
from ..data.hfdata import source_version
from ..artifacts.store import Artifact, ArtifactStore, derived_version, dir_bytes
from . import _common as c, launchers
from .automation import recipe_method_key
from .raw import raw_key
from .resources import ComputeResource, StoreResource

PREVIEW_COLUMNS = ["id", "prompt", "chosen", "rejected", "tokens"]
UNPAIRED_PREVIEW_COLUMNS = ["id", "prompt", "completion", "label", "tokens"]  # schema unpaired


def preference_partitions(recipe: Recipe) -> dg.StaticPartitionsDefinition | None:
    """`preference_adapter`'s partitions: the preference methods."""
    names = recipe.preference_methods()
    return dg.StaticPartitionsDefinition(names) if names else None


def pair_readers(recipe: Recipe) -> dg.StaticPartitionsDefinition | None:
    """`preference_dataset`'s partitions: one per preference method and reward model that trains on
    the recipe's pairs (each reads the same pairs through its own partition, so each re-runs on its own)."""
    names = recipe.pairs_readers().get(None, [])
    return dg.StaticPartitionsDefinition(names) if names else None


def pairs_ins(recipe: Recipe, readers: list[str], identity: bool = False) -> dict[str, dg.AssetIn]:
    """The inputs through which each of `readers` (partitions of the reading asset: preference methods
    or reward models) gets its pairs: `preference_dataset[d]` for a reader of the recipe's pairs,
    `generated_preferences[g]` for one with `pairs: g`; each declared only when some reader uses it, so
    the other one loads as None. `identity`: the recipe's pairs through the identity mapping when
    every reader reads them (one run can then hold a partition's chain)."""
    by_pairs = recipe.pairs_readers()
    human = [r for r in readers if r in by_pairs.get(None, [])]
    ins = {}
    if human:
        same = identity and len(human) == len(readers) == len(by_pairs[None])
        ins["preference_dataset"] = c.asset_in(recipe, **({} if same else {
            "partition_mapping": dg.StaticPartitionMapping({r: r for r in human})}))
    generated = {g: [r for r in names if r in readers] for g, names in by_pairs.items() if g is not None}
    generated = {g: names for g, names in generated.items() if names}
    if generated:
        ins["generated_preferences"] = c.asset_in(recipe, partition_mapping=dg.StaticPartitionMapping(generated))
    return ins


def pairs_of(inputs: dict[str, Artifact | None]) -> Artifact:
    """The pairs a reader of `pairs_ins` received: the one input that holds a partition."""
    found = [a for a in (inputs.get("preference_dataset"), inputs.get("generated_preferences")) if a is not None]
    if len(found) != 1:
        raise RuntimeError(f"expected the pairs of one asset, got {len(found)}")
    return found[0]


def preference_mapping(recipe: Recipe) -> dg.StaticPartitionMapping:
    """Partition d of a preference-partitioned asset feeds partition d of a method-partitioned one (and
    nothing else: the other methods' partitions read no preference partition)."""
    return dg.StaticPartitionMapping({n: n for n in recipe.preference_methods()})


def sft_sources(recipe: Recipe) -> dict[str, list[str]]:
    """{sft method: the preference methods that continue it}."""
    out: dict[str, list[str]] = {}
    for d in recipe.preference_methods():
        out.setdefault(recipe.methods[d].sft_from, []).append(d)
    return out


def check_usable(pairs: list[preferences.PreferencePair] | list[preferences.LabelledAnswer], eos_id: int) -> list[str]:
    problems = [] if pairs else ["the training split is empty"]
    for p in pairs:
        answers = [p.completion_ids] if isinstance(p, preferences.LabelledAnswer) else [p.chosen_ids, p.rejected_ids]
        if any(not ids or ids[-1] != eos_id for ids in answers):
            what = "answer" if isinstance(p, preferences.LabelledAnswer) else "pair"
            problems.append(f"{what} {p.id} (line {p.line}) has an answer that does not end with end-of-turn")
    return problems


def build(recipe: Recipe) -> list:
    readers, parts = pair_readers(recipe), preference_partitions(recipe)
    if readers is None or recipe.preferences is None:
        return []
    return [_preference_dataset_asset(recipe, readers), *([_preference_adapter_asset(recipe, parts)] if parts else [])]


# --------------------------------------------------------------------------------------
# preference_dataset[d]
# --------------------------------------------------------------------------------------


def _preference_dataset_asset(recipe: Recipe, parts: dg.StaticPartitionsDefinition) -> dg.AssetsDefinition:
    cv = c.code_version("preference_dataset", recipe, "preferences", "prompt", "seed")

    @dg.asset(
        key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "data"),
        kinds={"jsonl"},
        deps=[raw_key(recipe, recipe.preferences)],
        ins=c.ins(recipe, "base_model"),
        code_version=cv,
        partitions_def=parts,
        check_specs=[dg.AssetCheckSpec("usable", asset=c.key(recipe, "preference_dataset"), blocking=True, partitions_def=parts,
                                       description="non-empty training split; every answer ends with end-of-turn")],
    )
    def preference_dataset(context: dg.AssetExecutionContext, store: StoreResource, base_model: Artifact):
        """Validated, chat-rendered prompt/chosen/rejected pairs (schema unpaired: prompt/completion/label
        answers), split train/eval (one partition per preference method and reward model: the same pairs)."""
        tok = load_tokenizer(base_model.path)
        art, built = _write_preference_dataset(context, recipe, cv, store, tok, base_model)
        yield c.output(art, _preference_dataset_metadata(built, recipe.evaluation.preview_rows))
        yield _usable(built, tok.eos_token_id)

    return preference_dataset


def _write_preference_dataset(context, recipe: Recipe, cv: str, store: StoreResource, tok,
                              base_model: Artifact) -> tuple[Artifact, preferences.BuiltPreferences]:
    """(the written preference_dataset artifact, the pairs): the recipe's pairs validated, rendered
    with `tok`'s chat template and split; a file that cannot be parsed fails with file and line."""
    spec = recipe.preferences
    src = preferences.preference_source(recipe)
    try:
        built = preferences.build_preference_dataset(src, tok, system=recipe.prompt.system,
                                                     max_length=recipe.prompt.max_length,
                                                     chat_template=recipe.chat_template_text())
    except data.DataFileError as exc:
        raise c.user_error(exc) from None
    meta = {"tokenizer_fingerprint": data.tokenizer_fingerprint(tok), "max_length": recipe.prompt.max_length,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    with store.store(recipe.pipeline).write("preference_dataset", context.partition_key, recipe_hash=recipe.recipe_hash,
                                            seed=recipe.seed, code_version=cv) as st:
        st.inputs = {f"raw/{spec.name}": source_version(src.path), **c.inputs_of(base_model)}
        preferences.save_preferences(built, st.path, meta)
    for rej in built.rejected[:20]:
        context.log.warning(f"rejected {spec.name} line {rej.line}: {rej.reason}")
    return st.artifact, built


def _preference_dataset_metadata(built: preferences.BuiltPreferences, preview_rows: int) -> dict:
    unpaired = preferences.is_unpaired(built.train)
    columns = UNPAIRED_PREVIEW_COLUMNS if unpaired else PREVIEW_COLUMNS
    preview = [{**{k: getattr(p, k) for k in columns[:-1]}, "tokens": preferences.sequence_tokens(p)}
               for p in built.train[:preview_rows]]
    rejected = [{"line": r.line, "field": r.field, "reason": r.reason} for r in built.rejected[:50]]
    unit = "answers" if unpaired else "pairs"
    return {
        "rows_kept": built.stats["kept"],
        "rows_rejected": built.stats["rejected_rows"],
        f"train_{unit}": built.stats["train_rows"],
        f"eval_{unit}": built.stats["eval_rows"],
        **({k: built.stats[k] for k in ("form", "train_desirable", "train_undesirable")} if unpaired else {}),
        "token_lengths": dg.MetadataValue.json(built.stats["tokens"]),
        "preview": c.table(preview, columns),
        "rejected": c.table(rejected, ["line", "field", "reason"]),
    }


def _usable(built: preferences.BuiltPreferences, eos_id: int) -> dg.AssetCheckResult:
    problems = check_usable(built.train, eos_id)
    return dg.AssetCheckResult(
        check_name="usable", passed=not problems,
        metadata={"problems": dg.MetadataValue.json(problems[:20]),
                  f"train_{'answers' if preferences.is_unpaired(built.train) else 'pairs'}": len(built.train)},
    )


# --------------------------------------------------------------------------------------
# preference_adapter[d]
# --------------------------------------------------------------------------------------


def _preference_adapter_asset(recipe: Recipe, parts: dg.StaticPartitionsDefinition) -> dg.AssetsDefinition:
    cv_tuned = c.code_version("preference_adapter", recipe)

    @dg.asset(
        key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "training"), kinds={"pytorch", "peft"}, code_version=cv_tuned, partitions_def=parts, pool="gpu",
        deps=[dg.AssetDep(recipe_method_key(recipe), partition_mapping=dg.StaticPartitionMapping({d: d for d in parts.get_partition_keys()}))],
        ins={"adapter": c.asset_in(recipe, partition_mapping=dg.StaticPartitionMapping(sft_sources(recipe))),
             **pairs_ins(recipe, parts.get_partition_keys(), identity=True), "base_model": c.asset_in(recipe)},
    )
    def preference_adapter(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                           config: c.TrainingRun, adapter: Artifact, base_model: Artifact, **pairs: Artifact | None):
        """The SFT adapter (`sft_from`) continued on its pairs (the recipe's, or generated ones) by the
        method's objective (DPO, ORPO, SimPO, KTO). Its version is that
        of its inputs, code and settings; an existing one is reused (`force` retrains)."""
        return _tune(context, recipe, compute.resolve(), store.store(recipe.pipeline), adapter, pairs_of(pairs),
                     base_model, cv_tuned, config.force)

    return preference_adapter


def _tune(context, recipe: Recipe, hw: Compute, store: ArtifactStore, sft: Artifact, prefs: Artifact,
          base_model: Artifact, cv: str, force: bool) -> dg.Output:
    name = context.partition_key
    spec = recipe.methods[name]
    c.check_same_base(sft, spec.sft_from, base_model)
    inputs = c.inputs_of(sft, prefs, base_model)
    derivation = c.derivation(inputs, cv, recipe.section_hash("seed", method=name))
    done = c.reuse_or_say_why(context, store, "preference_adapter", name, derivation, force)
    if done is not None:
        return c.output(done, c.reused_metadata(done))
    # keyed like adapter's: a re-run of this derivation resumes (on an object store, on any node)
    ckpts = store.checkpoints("preference_adapter", name, derived_version(derivation))
    context.log.info(f"{name}: continues adapter[{spec.sft_from}] {sft.version}")
    request = preference_request(recipe, name, base_model, sft, prefs, ckpts.dir)
    with c.training_failures(context, name, user_errors=(launchers.JobFailed,)):
        tuned = launchers.train_method(context, request, recipe.compute, hw, ckpts)
    art = tuning.write_preference_adapter(
        store, name, tuned, inputs=inputs, derivation=c.forced(derivation, context) if force else derivation,
        facts=_tuned_facts(recipe, name, sft, prefs, {**tuned.result.summary(), "device": hw.name}),
        recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed)
    ckpts.finished()  # the artifact supersedes its checkpoints
    return c.output(art, {**_tuned_metadata(name, spec, sft, prefs, tuned.pairs, tuned.result, art, hw.name),
                          **launchers.facts(recipe, request)})


def preference_request(recipe: Recipe, name: str, base_model: Artifact, sft: Artifact, prefs: Artifact,
                       checkpoint_dir) -> tuning.PreferenceRequest:
    """The one description of preference method `name`'s run."""
    spec = recipe.methods[name]
    return tuning.PreferenceRequest(
        method=name, objective=spec.type, base_dir=str(base_model.dir), sft_adapter_dir=str(sft.dir),
        preference_dataset_dir=str(prefs.path), training=recipe.training_for(name).model_dump(mode="json"),
        seed=recipe.seed, settings=spec.trainer_settings(), max_length=recipe.prompt.max_length,
        checkpoint_dir=str(checkpoint_dir))


def _tuned_facts(recipe: Recipe, name: str, sft: Artifact, prefs: Artifact, summary: dict) -> dict:
    """The manifest's record of a preference run: the method, what it continued and on which pairs
    (under the method's type, with its objective's settings), the run."""
    spec = recipe.methods[name]
    return {"method": {"name": name, "type": spec.type, "spec": spec.model_dump(mode="json"),
                       "training": recipe.training_for(name).model_dump(mode="json")},
            spec.type: {"sft_adapter": {"method": spec.sft_from, "version": sft.version, "path": sft.path},
                        prefs.asset: prefs.version, **spec.trainer_settings()},  # preference_dataset or generated_preferences
            "train": summary}


def _tuned_metadata(name: str, spec, sft: Artifact, prefs: Artifact, n_pairs: int, result: tuning.PreferenceResult,
                    art: Artifact, device: str) -> dict:
    summary = result.summary()
    objective = tuning.OBJECTIVES[spec.type]
    png = plots.loss_curve_png(result.losses, f"{name}: {objective.name} loss")
    return {
        "method": spec.type,
        "sft_adapter": f"adapter[{spec.sft_from}] {sft.version}",
        prefs.asset: prefs.version,
        "pairs": c.key_of(prefs),  # preference_dataset[d], or generated_preferences[g] (made by a model)
        f"train_{'answers' if result.unpaired else 'pairs'}": n_pairs,
        "beta": spec.beta,
        "trainable_parameters": result.trainable_parameters,
        "trainable_percent": round(100 * result.trainable_parameters / result.total_parameters, 4),
        "loss_curve": dg.MetadataValue.md(plots.markdown_image(png, f"{name} {objective.name} loss curve")),
        "losses": dg.MetadataValue.json([[s_, l] for s_, l in result.losses]),
        **{c.shown_as: dg.MetadataValue.json([list(x) for x in getattr(result, c.field)]) for c in objective.curves},
        "first_loss": summary["first_loss"],
        "final_loss": summary["final_loss"],
        "steps": result.steps,
        "wall_time_s": round(result.wall_s, 2),
        "adapter_bytes": dir_bytes(art.dir),
        "device": device,
    }
