"""`model_card[method]`: the publishable repo of one method, complete with its metrics.

Its directory is what `hf upload REPO $FT_HOME/artifacts/model_card/<method>/<version>` publishes:
the merged model's files (or, for a method that cannot merge, the adapter's), hard-linked from
those immutable artifacts, and README.md, a Hugging Face model card whose `model-index` holds the
scores of `eval_report[method]` (`publish/card.py` renders it). `adapter` and `merged_model` carry
cards too, written before any evaluation, that say the metrics are pending: artifacts are
immutable, so the complete card is this downstream asset, and Dagster records which report,
merge, adapter, base and dataset versions it describes (all declared inputs, no store lookups).

With `publish.push: true` it uploads the directory to `publish.repo_id` ({method} replaced)
after writing it; without the token variable the step fails before writing or uploading
anything. Off by default; nothing here touches the network otherwise.
"""


import hashlib
import json

import dagster as dg

from ..publish import card
from ..methods import get_method
from ..config.recipe import Recipe
from ..artifacts.store import Artifact, dir_bytes
from . import _common as c
from .adapters import adapter_mapping, methods_partitions
from .preferences import preference_mapping
from .resources import StoreResource


def build(recipe: Recipe) -> list:
    parts = methods_partitions(recipe)
    pub = recipe.publish
    # what of `publish` the card's text shows (push/private/token_env change only the upload)
    shown = hashlib.sha256(json.dumps([pub.repo_id, pub.license]).encode()).hexdigest()[:8]
    cv = f"{c.code_version('model_card', recipe)}-{shown}"
    trained_in = {"adapter": c.asset_in(recipe, partition_mapping=adapter_mapping(recipe)),
                  **({"preference_adapter": c.asset_in(recipe, partition_mapping=preference_mapping(recipe))}
                     if recipe.preference_methods() else {})}

    @dg.asset(key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "publishing"), kinds={"huggingface", "markdown"}, code_version=cv, partitions_def=parts,
              ins={"eval_report": c.asset_in(recipe), "merged_model": c.asset_in(recipe), **trained_in,
                   "base_model": c.asset_in(recipe), "sft_dataset": c.asset_in(recipe)})
    def model_card(context: dg.AssetExecutionContext, store: StoreResource, **inputs) -> dg.Output:
        """The method's weights with a complete Hugging Face model card (lineage, usage, model-index
        metrics): a directory `hf upload` publishes as is; uploaded when `publish.push` is on."""
        name = context.partition_key
        merged, report = inputs["merged_model"], inputs["eval_report"]
        trained: Artifact = inputs.get("preference_adapter") or inputs["adapter"]
        repo_id = card.repo_id_for(pub.repo_id, name) if pub.repo_id else "REPO"
        try:
            token = card.check_push(repo_id, pub.token_env) if pub.push else None
        except card.PushError as exc:
            raise c.user_error(exc) from None
        weights = merged if merged.manifest().get("mergeable") else trained
        lin = card.lineage_from(trained.manifest(), inputs["base_model"].manifest(), inputs["sft_dataset"].manifest())
        lin.extra.update({"Merged model version": merged.version, "Evaluation report version": report.version})
        what = (f"`{c.key_of(trained)}` merged into the base weights: a plain transformers checkpoint with its "
                "tokenizer." if weights is merged else
                f"The `{name}` adapter as ft_assets saved it (method type `{lin.method_type}` cannot be merged).")
        uses_q = weights is trained and get_method(lin.method_type).uses_quantized_base
        with store.store(recipe.pipeline).write("model_card", name, recipe_hash=recipe.recipe_hash, code_version=cv,
                                 seed=recipe.seed) as st:
            st.inputs = c.inputs_of(report, merged, trained, inputs["base_model"], inputs["sft_dataset"])
            files = card.link_files(st.path, weights.dir)
            text = c.write_card(st.path, recipe, lin, what, uses_q, json.loads((report.dir / "metrics.json").read_text()),
                                repo=repo_id)
            st.extra["card"] = {"weights_from": c.key_of(weights), "files": [*files, card.README]}
        pushed = None
        if token is not None:
            try:
                pushed = card.push(st.artifact.dir, repo_id, token, pub.private, f"{recipe.name} {name} "
                                   f"model_card {st.artifact.version}")
            except card.PushError as exc:
                raise c.user_error(exc, "The artifact is written; re-materialize to retry the upload.") from None
        return c.output(st.artifact, {
            "card": dg.MetadataValue.md(text),
            "weights_from": c.key_of(weights),
            "files": dg.MetadataValue.json([*files, card.README]),
            "bytes": dir_bytes(st.artifact.dir),
            "pushed_to": dg.MetadataValue.url(pushed.url) if pushed else "not pushed (publish.push is false)",
        })

    return [model_card]
