"""`base_model` and `quantized_base`.

- `base_model`: the recipe's base model as a local safetensors directory (bundled GGUF ->
  dequantized -> saved; hub id from the local HF cache; or a local path). Same content, same
  version: re-materializing an unchanged base changes nothing downstream. A base read from a file
  already read (same file hash, same `base_model` settings: another pipeline's, or an earlier run)
  is reused, not converted again; the hub source always converts (its cache may change).
- `quantized_base`: the base quantized with bitsandbytes (NF4 + double quantization by
  default), saved with `save_pretrained`; records its size against the base and how much the
  eval-set loss moved (against `base_eval`, on the same held-out split).
"""


import json
from pathlib import Path

import dagster as dg

from ..evaluation import heldout as evaluate
from ..models import quantize
from ..models.base_model import LoadOptions, ModelSourceError, base_origin, save_base
from ..config.recipe import QuantizationSpec, Recipe
from ..artifacts.store import Artifact, ArtifactStore, dir_bytes
from . import _common as c
from .resources import ComputeResource, StoreResource

MODEL_BYTES_HEADROOM = 2 * 2**30  # refuse to start writing a model with less free disk than this


def build(recipe: Recipe) -> list:
    """`base_model`, and `quantized_base` when the recipe quantizes."""
    assets = [_base_model_asset(recipe)]
    if recipe.quantization.method != "none":
        assets.append(_quantized_base_asset(recipe))
    return assets


# --------------------------------------------------------------------------------------
# base_model
# --------------------------------------------------------------------------------------


def _base_model_asset(recipe: Recipe) -> dg.AssetsDefinition:
    cv_base = c.code_version("base_model", recipe, "base_model")

    @dg.asset(key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "models"),
              kinds={"pytorch", "safetensors"}, code_version=cv_base, pool="gpu")
    def base_model(context: dg.AssetExecutionContext, store: StoreResource) -> dg.Output:
        """The recipe's base model as a plain safetensors checkpoint with its tokenizer."""
        spec = recipe.base_model
        local = recipe.resolve_path(spec.path, "base_model.path") if spec.source == "local" else None
        artifacts = store.store(recipe.pipeline)
        origin = base_origin(spec.source, local)
        made_from = {**origin, "code_version": cv_base} if origin else None
        done = artifacts.find_made_from("base_model", None, made_from) if made_from else None
        if done is not None:  # find_made_from made it LATEST again
            context.log.info(f"base_model: version {done.version} was read from this same file with these settings: "
                             "reused, nothing converted")
            return c.output(done, {**base_metadata(done.manifest()["model"], done), "reused": True})
        art, facts = _save_base(recipe, cv_base, artifacts, local, made_from)
        return c.output(art, base_metadata(facts, art))

    return base_model


def _save_base(recipe: Recipe, cv: str, artifacts: ArtifactStore, local: Path | None,
               made_from: dict | None) -> tuple[Artifact, dict]:
    """(the written base_model artifact, the model's facts): the base converted to safetensors."""
    spec = recipe.base_model
    with artifacts.write("base_model", recipe_hash=recipe.recipe_hash, code_version=cv,
                         seed=recipe.seed, min_free_bytes=MODEL_BYTES_HEADROOM) as st:
        try:
            facts = save_base(
                spec.source, st.path, hub_id=spec.id, local_path=local, revision=spec.revision,
                allow_download=spec.allow_download,
                options=LoadOptions(spec.trust_remote_code, spec.allow_pickle_weights),
            )
        except ModelSourceError as exc:
            raise c.user_error(exc) from None
        st.extra["model"] = facts
        if made_from:
            st.extra["made_from"] = made_from
    return st.artifact, facts


# --------------------------------------------------------------------------------------
# quantized_base
# --------------------------------------------------------------------------------------


def _quantized_base_asset(recipe: Recipe) -> dg.AssetsDefinition:
    cv_q = c.code_version("quantized_base", recipe, "quantization")

    @dg.asset(key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "models"), kinds={"pytorch", "bitsandbytes"},
              code_version=cv_q, pool="gpu", ins=c.ins(recipe, "base_model", "sft_dataset", "base_eval"))
    def quantized_base(
        context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
        base_model: Artifact, sft_dataset: Artifact, base_eval: Artifact,
    ) -> dg.Output:
        """The base model quantized with bitsandbytes (QLoRA trains on this)."""
        art, dtype_name, eval_loss = _quantize_base(recipe, cv_q, compute, store, base_model, sft_dataset, base_eval)
        return c.output(art, _quantized_metadata(recipe.quantization, dtype_name, base_model, art, eval_loss))

    return quantized_base


def _quantize_base(recipe: Recipe, cv: str, compute: ComputeResource, store: StoreResource, base_model: Artifact,
                   sft_dataset: Artifact, base_eval: Artifact) -> tuple[Artifact, str, dict[str, float]]:
    """(the written quantized_base artifact, its compute dtype's name, {"base", "quantized"} eval-set loss)."""
    q = recipe.quantization
    hw = compute.resolve()
    cdtype = quantize.compute_dtype(q.compute_dtype, hw.device)
    evals = c.eval_examples(recipe, sft_dataset)
    with store.store(recipe.pipeline).write("quantized_base", recipe_hash=recipe.recipe_hash, code_version=cv,
                                            seed=recipe.seed, min_free_bytes=MODEL_BYTES_HEADROOM) as st:
        st.inputs = c.inputs_of(base_model, sft_dataset, base_eval)
        qmodel = quantize.quantize(base_model.dir, st.path, q.method, q.double_quant, cdtype, hw.device)
        q_loss = evaluate.eval_loss(qmodel, evals, qmodel.config.pad_token_id, hw.device)
        base_loss = json.loads((base_eval.dir / "metrics.json").read_text())  # same eval split
        eval_loss = {"base": base_loss["eval_loss"], "quantized": q_loss["eval_loss"]}
        st.extra["eval_loss"] = eval_loss
    return st.artifact, str(cdtype).removeprefix("torch."), eval_loss


def _quantized_metadata(q: QuantizationSpec, dtype_name: str, base_model: Artifact, art: Artifact,
                        eval_loss: dict[str, float]) -> dict:
    base_bytes, q_bytes = dir_bytes(base_model.dir), dir_bytes(art.dir)
    return {
        "method": q.method,
        "double_quant": q.double_quant,
        "compute_dtype": dtype_name,
        "bytes": q_bytes,
        "base_bytes": base_bytes,
        "size_vs_base": round(q_bytes / base_bytes, 3),
        "eval_loss_base": eval_loss["base"],
        "eval_loss_quantized": eval_loss["quantized"],
        "eval_loss_delta": round(eval_loss["quantized"] - eval_loss["base"], 4),
    }


def base_metadata(facts: dict, art: Artifact) -> dict:
    return {key: facts[key] for key in ("origin", "architecture", "parameters", "layers", "dtype")} | {
        "bytes": dir_bytes(art.dir), "content_hash": art.version}
