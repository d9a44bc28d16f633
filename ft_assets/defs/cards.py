"""`model_card[method]`: the publishable repo of the method's champion, complete with its metrics.

Its directory is what `hf upload REPO $FT_HOME/artifacts/model_card/<method>/<version>` publishes:
the champion's merged model files (or, for a method that cannot merge, its adapter's), hard-linked
from those immutable artifacts, and README.md, a Hugging Face model card whose `model-index` holds
the scores of the `eval_report` that promoted it (`publish/card.py` renders it). It reads
`champion[method]` (declared) and the versions its record names: a retrain that failed the gate
publishes nothing new; until a model passes, the partition materializes with `card_status.json`
{"published": false, "reason": ...} and a warning. `adapter` and `merged_model` carry cards too,
written before any evaluation, that say the metrics are pending.

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
from ..artifacts.store import Artifact, ArtifactStore, dir_bytes
from . import _common as c
from .adapters import methods_partitions
from .champion import ChampionArtifacts, champion_artifacts
from .resources import StoreResource


def build(recipe: Recipe) -> list:
    parts = methods_partitions(recipe)
    pub = recipe.publish
    # what of `publish` the card's text shows (push/private/token_env change only the upload)
    shown = hashlib.sha256(json.dumps([pub.repo_id, pub.license]).encode()).hexdigest()[:8]
    cv = f"{c.code_version('model_card', recipe)}-{shown}"

    @dg.asset(key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "publishing"), kinds={"huggingface", "markdown"}, code_version=cv, partitions_def=parts,
              ins={"champion": c.asset_in(recipe)})
    def model_card(context: dg.AssetExecutionContext, store: StoreResource, champion: Artifact) -> dg.Output:
        """The champion's weights with a complete Hugging Face model card (lineage, usage, model-index
        metrics): a directory `hf upload` publishes as is; uploaded when `publish.push` is on."""
        name = context.partition_key
        repo_id = card.repo_id_for(pub.repo_id, name) if pub.repo_id else "REPO"
        try:
            token = card.check_push(repo_id, pub.token_env) if pub.push else None
        except card.PushError as exc:
            raise c.user_error(exc) from None
        artifacts = store.store(recipe.pipeline)
        held = champion_artifacts(artifacts, champion)
        if held is None:
            return _no_champion(recipe, cv, artifacts, context, champion)
        art, text, files, weights = _write_card(recipe, cv, artifacts, name, repo_id, champion, held)
        pushed = None
        if token is not None:
            try:
                pushed = card.push(art.dir, repo_id, token, pub.private, f"{recipe.name} {name} model_card {art.version}")
            except card.PushError as exc:
                raise c.user_error(exc, "The artifact is written; re-materialize to retry the upload.") from None
        return c.output(art, {
            "card": dg.MetadataValue.md(text),
            "weights_from": c.key_of(weights),
            "files": dg.MetadataValue.json([*files, card.README]),
            "bytes": dir_bytes(art.dir),
            "pushed_to": dg.MetadataValue.url(pushed.url) if pushed else "not pushed (publish.push is false)",
        })

    return [model_card]


def _write_card(recipe: Recipe, cv: str, artifacts: ArtifactStore, name: str, repo_id: str, champion: Artifact,
                held: ChampionArtifacts) -> tuple[Artifact, str, list[str], Artifact]:
    """(the written model_card artifact, its README text, the weight files, the artifact they came from)."""
    merged, report, trained = held.merged_model, held.eval_report, held.trained
    weights = merged if merged.manifest().get("mergeable") else trained
    lin = card.lineage_from(trained.manifest(), held.base_model.manifest(), held.sft_dataset.manifest())
    lin.extra.update({"Merged model version": merged.version, "Evaluation report version": report.version})
    what = (f"`{c.key_of(trained)}` merged into the base weights: a plain transformers checkpoint with its "
            "tokenizer." if weights is merged else
            f"The `{name}` adapter as ft_assets saved it (method type `{lin.method_type}` cannot be merged).")
    uses_q = weights is trained and get_method(lin.method_type).uses_quantized_base
    with artifacts.write("model_card", name, recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed) as st:
        st.inputs = c.inputs_of(report, merged, trained, held.base_model, held.sft_dataset, champion)
        files = card.link_files(st.path, weights.dir)
        text = c.write_card(st.path, recipe, lin, what, uses_q, json.loads((report.dir / "metrics.json").read_text()),
                            repo=repo_id)
        st.extra["card"] = {"weights_from": c.key_of(weights), "files": [*files, card.README]}
    return st.artifact, text, files, weights


def _no_champion(recipe: Recipe, cv: str, artifacts: ArtifactStore, context, champion: Artifact) -> dg.Output:
    """A partition whose champion holds no model yet: nothing to publish, and says why."""
    name = context.partition_key
    reason = f"champion[{name}] holds no model yet (none passed evaluation.gate), so there is no card to publish"
    with artifacts.write("model_card", name, recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed) as st:
        st.inputs = c.inputs_of(champion)
        c.write_json(st.path / "card_status.json", {"published": False, "reason": reason})
    context.log.warning(reason)
    return c.output(st.artifact, {"published": False, "reason": reason})
