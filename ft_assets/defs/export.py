"""`gguf_model[method]`: the method's champion as GGUF files for llama.cpp / Ollama, plus a Modelfile.

Built only when the recipe lists `export.gguf` types. Partitioned like `champion` (one partition
per method, identity mapping): it converts the merged model the champion's record names (the
model in use, not the newest one: a retrain that failed the gate exports nothing new), with one
`publish.gguf.export_gguf` call into the store, then metadata (bytes per type, converter, the
Modelfile's FROM/SYSTEM/stop). A method whose merged_model is not mergeable, or that has no
champion yet, has no weights to convert: the partition still materializes, with
`export_status.json` {"exported": false, "reason": ...} and a warning, as merged_model does.
"""


import dagster as dg

from ..publish import gguf as export
from ..config.recipe import Recipe
from ..artifacts.store import Artifact, ArtifactStore
from . import _common as c
from .adapters import methods_partitions
from .champion import champion_artifacts
from .models import MODEL_BYTES_HEADROOM
from .resources import StoreResource

GGUF_MODEL = "The merged model as GGUF (one file per recipe export.gguf type) and an Ollama Modelfile."


def build(recipe: Recipe) -> list:
    types = list(recipe.export.gguf)
    if not types:
        return []
    cv = c.code_version("gguf_model", recipe, "export", "prompt")

    @dg.asset(key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "export"), kinds={"gguf", "ollama"}, code_version=cv, partitions_def=methods_partitions(recipe),
              ins={"champion": c.asset_in(recipe)}, description=GGUF_MODEL)
    def gguf_model(context: dg.AssetExecutionContext, store: StoreResource, champion: Artifact) -> dg.Output:
        name = context.partition_key
        artifacts = store.store(recipe.pipeline)
        merged_model, reason = champion_merged_model(artifacts, champion)
        status = merged_model is not None
        with artifacts.write("gguf_model", name, recipe_hash=recipe.recipe_hash, code_version=cv,
                                 seed=recipe.seed, min_free_bytes=MODEL_BYTES_HEADROOM) as st:
            st.inputs = c.inputs_of(champion, merged_model)
            if not status:
                c.write_json(st.path / "export_status.json", {"exported": False, "reason": reason})
                st.extra["exported"] = False
            else:
                try:
                    facts = export.export_gguf(merged_model.dir, st.path, types, recipe.prompt.system,
                                               log=lambda msg: context.log.info(f"{name}: {msg}"))
                except export.ExportError as exc:
                    raise c.user_error(RuntimeError(f"gguf_model[{name}]: {exc}")) from None
                c.write_json(st.path / "export_status.json", {"exported": True})
                st.extra["exported"] = True
                st.extra["gguf"] = facts.to_json()
        if not status:
            context.log.warning(reason)
            return c.output(st.artifact, {"exported": False, "reason": reason})
        return c.output(st.artifact, {
            "exported": True,
            "types": ", ".join(types),
            **{f"bytes_{t}": facts.bytes[t] for t in types},
            "converter": facts.converter,
            "modelfile_from": facts.modelfile_from,
            "modelfile_stop": ", ".join(facts.stop),
            "chat_template_in_gguf": "tokenizer.chat_template" in facts.metadata,
            "modelfile_template": facts.template_family or "none (Ollama reads the GGUF's own)",
            "eos_token_id": facts.metadata.get("tokenizer.ggml.eos_token_id", -1),
        })

    return [gguf_model]


def champion_merged_model(artifacts: ArtifactStore, champion: Artifact) -> tuple[Artifact | None, str]:
    """(the champion's merged_model, "") or (None, why there is none to export)."""
    name, held = champion.partition, champion_artifacts(artifacts, champion)
    if held is None:
        return None, f"champion[{name}] holds no model yet (none passed evaluation.gate), so there is no GGUF"
    if not held.merged_model.manifest().get("mergeable"):
        return None, f"merged_model[{name}] has no merged weights (method {name} cannot merge), so there is no GGUF"
    return held.merged_model, ""
