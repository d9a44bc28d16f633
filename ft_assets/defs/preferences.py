"""`preference_dataset`: the recipe's prompt/chosen/rejected file -> validated, chat-rendered,
seeded train/eval splits of preference pairs (what `dpo` methods train and are evaluated on).

Same contract as `sft_dataset`: a file that cannot be parsed fails with file and line; rows
that cannot be used are counted, written to `rejected.jsonl` and fail the asset above
`preferences.max_rejected_fraction`; prompts are rendered with the base model's chat template
(and `prompt.system`); the split is a seeded hash of each pair's id. `raw/<preferences.name>`
is an observable source, so editing the file re-runs it (and, downstream, the dpo partitions).

Partitioned by the recipe's dpo methods (usually one: `dpo`): every partition holds the same
pairs, and `adapter`/`eval_report` depend on it partition-to-partition, so a change in the
pairs re-trains the dpo partitions only, never lora/qlora.

Blocking check `usable`: a non-empty training split whose answers all end with end-of-turn.
"""


import dagster as dg

from ..core import data, preferences
from ..core.models import load_tokenizer
from ..recipe import Recipe
from ..store import Artifact, file_hash
from . import _common as c
from .raw import raw_key
from .resources import StoreResource

PREVIEW_COLUMNS = ["id", "prompt", "chosen", "rejected", "tokens"]


def dpo_partitions(recipe: Recipe) -> dg.StaticPartitionsDefinition | None:
    names = recipe.methods_of_type("dpo")
    return dg.StaticPartitionsDefinition(names) if names else None


def preference_dep(recipe: Recipe) -> list[dg.AssetDep]:
    """The partition-to-partition dependency of adapter/eval_report on preference_dataset."""
    names = recipe.methods_of_type("dpo")
    if not names:
        return []
    return [dg.AssetDep("preference_dataset", partition_mapping=dg.StaticPartitionMapping({n: n for n in names}))]


def check_usable(pairs: list[preferences.PreferencePair], eos_id: int) -> list[str]:
    problems = [] if pairs else ["the training split is empty"]
    for p in pairs:
        if not p.chosen_ids or p.chosen_ids[-1] != eos_id or not p.rejected_ids or p.rejected_ids[-1] != eos_id:
            problems.append(f"pair {p.id} (line {p.line}) has an answer that does not end with end-of-turn")
    return problems


def build(recipe: Recipe) -> list:
    parts = dpo_partitions(recipe)
    if parts is None or recipe.preferences is None:
        return []
    spec = recipe.preferences
    cv = c.code_version("preference_dataset", recipe, "preferences", "prompt", "seed")

    @dg.asset(
        group_name="data",
        kinds={"jsonl"},
        deps=[raw_key(spec)],
        code_version=cv,
        partitions_def=parts,
        check_specs=[dg.AssetCheckSpec("usable", asset="preference_dataset", blocking=True, partitions_def=parts,
                                       description="non-empty training split; every answer ends with end-of-turn")],
    )
    def preference_dataset(context: dg.AssetExecutionContext, store: StoreResource, base_model: Artifact):
        """Validated, chat-rendered prompt/chosen/rejected pairs, split train/eval (one partition per dpo method)."""
        tok = load_tokenizer(base_model.path)
        src = preferences.preference_source(recipe)
        try:
            built = preferences.build_preference_dataset(src, tok, system=recipe.prompt.system,
                                                         max_length=recipe.prompt.max_length)
        except data.DataFileError as exc:
            raise c.user_error(exc) from None
        meta = {"tokenizer_fingerprint": data.tokenizer_fingerprint(tok), "max_length": recipe.prompt.max_length,
                "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        with store.store().write("preference_dataset", context.partition_key, recipe_hash=recipe.recipe_hash,
                                 seed=recipe.seed, code_version=cv) as st:
            st.inputs = {f"raw/{spec.name}": file_hash(src.path)[:16], **c.inputs_of(base_model)}
            preferences.save_preferences(built, st.path, meta)
        art = st.artifact
        for rej in built.rejected[:20]:
            context.log.warning(f"rejected {spec.name} line {rej.line}: {rej.reason}")
        preview = [{"id": p.id, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                    "tokens": len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))}
                   for p in built.train[: recipe.evaluation.preview_rows]]
        rejected = [{"line": r.line, "field": r.field, "reason": r.reason} for r in built.rejected[:50]]
        yield c.output(art, {
            "rows_kept": built.stats["kept"],
            "rows_rejected": built.stats["rejected_rows"],
            "train_pairs": built.stats["train_rows"],
            "eval_pairs": built.stats["eval_rows"],
            "token_lengths": dg.MetadataValue.json(built.stats["tokens"]),
            "preview": c.table(preview, PREVIEW_COLUMNS),
            "rejected": c.table(rejected, ["line", "field", "reason"]),
        })
        problems = check_usable(built.train, tok.eos_token_id)
        yield dg.AssetCheckResult(
            check_name="usable", passed=not problems,
            metadata={"problems": dg.MetadataValue.json(problems[:20]), "train_pairs": len(built.train)},
        )

    return [preference_dataset]
