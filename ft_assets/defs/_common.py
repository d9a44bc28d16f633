"""Helpers every stage module uses: versions, outputs, metadata, user-facing failures, and the
reuse rule of trained artifacts (a derivation already made is reused; `force` makes a new one)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import dagster as dg
from pydantic import Field

from ..publish import card
from ..trainers.sft import TrainingFailed
from ..training.preemption import CheckpointBusy, Preempted
from ..training.loop import TrainingDiverged
from ..config.recipe import Recipe
from ..artifacts.store import Artifact, ArtifactStore

# Dagster's run tag: retry this run (with the daemon's run_retries) even though a step failed
RETRY_ON_STEP_FAILURE_TAG = "dagster/retry_on_asset_or_op_failure"

# Bump a stage's number when its code changes what it produces; Dagster then marks that
# stage and everything downstream stale.
STAGE_VERSIONS = {
    "sft_dataset": "2",  # 2: Arrow splits (was JSONL)
    "base_model": "1",
    "quantized_base": "1",
    "adapter": "1",
    "merged_model": "2",  # 2: README.md model card
    "base_eval": "2",
    "eval_report": "2",
    "leaderboard": "2",
    "preference_dataset": "1",
    "preference_adapter": "1",
    "student": "1",
    "best_adapter": "1",
    "model_card": "1",
    "gguf_model": "1",
    "champion": "1",
    "reward_model": "1",
    "policy_adapter": "1",
    "generated_preferences": "1",
}


# -- one pipeline among several (`Recipe.pipeline`): every name the graph gives is prefixed --------
# A recipe loaded alone has no pipeline: its keys are the bare names (`adapter`, `raw/<dataset>`).


def key_prefix(recipe: Recipe) -> list[str] | None:
    """The prefix of the recipe's asset keys (`key_prefix=` of its assets and inputs)."""
    return [recipe.pipeline] if recipe.pipeline else None


def key(recipe: Recipe, *path: str) -> dg.AssetKey:
    """An asset key of the recipe's pipeline, e.g. `key(recipe, "merged_model")`."""
    return dg.AssetKey([*(key_prefix(recipe) or []), *path])


def group(recipe: Recipe, name: str) -> str:
    """The recipe's own asset group (the UI lists each pipeline's groups apart)."""
    return f"{recipe.pipeline}_{name}" if recipe.pipeline else name


def named(recipe: Recipe, name: str) -> str:
    """The name of one of the recipe's jobs, sensors, schedules or multi-asset ops."""
    return f"{recipe.pipeline}__{name}" if recipe.pipeline else name


def asset_in(recipe: Recipe, **kwargs) -> dg.AssetIn:
    """An input from the recipe's own pipeline (the key is the parameter's name under its prefix)."""
    return dg.AssetIn(key_prefix=key_prefix(recipe), **kwargs)


def ins(recipe: Recipe, *names: str) -> dict[str, dg.AssetIn]:
    return {name: asset_in(recipe) for name in names}


def code_version(stage: str, recipe: Recipe, *sections: str) -> str:
    """Stage code version + hash of the recipe sections it reads: editing those re-versions it."""
    return f"{STAGE_VERSIONS[stage]}-{recipe.section_hash(*sections)}" if sections else STAGE_VERSIONS[stage]


class TrainingRun(dg.Config):
    """Run config of the trained assets (the launchpad's `config:` section)."""

    force: bool = Field(default=False, description="Retrain even when an artifact made from the same inputs, "
                                                   "code and settings exists (the new one gets a version of its own).")


def derivation(inputs: dict[str, str], code_version: str, recipe_section: str) -> dict[str, Any]:
    """What makes a trained artifact (its version is the hash of this, see `store.py`)."""
    return {"inputs": dict(sorted(inputs.items())), "code_version": code_version, "recipe": recipe_section}


def forced(made_by: dict[str, Any], context) -> dict[str, Any]:
    """A forced retrain gets a version of its own (new bytes, so downstream re-runs)."""
    return {**made_by, "forced_by": context.run_id}


def reuse_or_say_why(context, store: ArtifactStore, asset: str, partition: str | None, made_by: dict[str, Any],
                     force: bool) -> Artifact | None:
    """The finished artifact of exactly this derivation (now LATEST again), or None after logging
    why this run has to train: forced, or what differs from the latest version."""
    label = f"{asset}[{partition}]" if partition else asset
    done = None if force else store.find_derived(asset, partition, made_by)
    if done is not None:  # find_derived made it LATEST again
        context.log.info(f"{label}: version {done.version} was made from these same inputs, code and settings: "
                         "reused, nothing trained (config force: true retrains)")
        return done
    latest = store.latest(asset, partition)
    if force:
        why = "force: true"
    elif latest is None:
        why = "no earlier version"
    else:
        why = "; ".join(changes(latest.manifest().get("derivation") or {}, made_by)) or "earlier version has no derivation"
    context.log.info(f"{label}: training ({why})")
    return None


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs between two derivations, in words."""
    out = []
    old_in, new_in = before.get("inputs", {}), after.get("inputs", {})
    for key in sorted(set(old_in) | set(new_in)):
        if old_in.get(key) != new_in.get(key):
            out.append(f"{key} {old_in.get(key, 'none')} -> {new_in.get(key, 'none')}")
    if before.get("code_version") != after.get("code_version"):
        out.append(f"code version {before.get('code_version')} -> {after.get('code_version')}")
    if before.get("recipe") != after.get("recipe"):
        out.append("recipe settings changed")
    return out


def reused_metadata(art: Artifact) -> dict[str, Any]:
    manifest = art.manifest()
    train = manifest.get("train", {})
    return {"reused": True, "made_by_run_at": manifest.get("created", ""), "content_hash": manifest.get("content_hash", ""),
            **{k: train[k] for k in ("steps", "tokens_trained", "wall_s", "final_loss") if k in train}}


def key_of(art: Artifact) -> str:
    return f"{art.asset}[{art.partition}]" if art.partition else art.asset


def inputs_of(*arts: Artifact | None) -> dict[str, str]:
    return {key_of(a): a.version for a in arts if a is not None}


def output(art: Artifact, metadata: dict[str, Any], output_name: str = "result") -> dg.Output:
    manifest = art.manifest()
    return dg.Output(
        art,
        output_name=output_name,
        data_version=dg.DataVersion(art.version),
        metadata={
            "path": dg.MetadataValue.path(art.path),
            "data_version": art.version,
            "inputs": dg.MetadataValue.json(manifest.get("inputs", {})),
            "recipe_hash": manifest.get("recipe_hash", ""),
            **metadata,
        },
    )


def check_same_base(adapter: Artifact, method: str, base_model: Artifact) -> None:
    """What continues or samples from adapter[method] needs the base_model version it was trained on."""
    if adapter.manifest().get("inputs", {}).get("base_model") != base_model.version:
        raise user_error(RuntimeError(f"adapter[{method}] {adapter.version} was trained on another base_model; "
                                      f"materialize adapter[{method}] first"))


def user_error(exc: Exception, what_to_do: str = "") -> dg.Failure:
    """A failure whose description is the message a user should read (no traceback hunt)."""
    return dg.Failure(description=f"{exc}{(' ' + what_to_do) if what_to_do else ''}", allow_retries=False)


@contextmanager
def training_failures(context, label: str, user_errors: tuple[type[Exception], ...] = ()):
    """What training raises, as step failures a user reads. None retries within the step (a
    `RetryPolicy` would re-run in the process being stopped, or repeat a user error):
    - diverged / out of memory / checkpoint dir in use / the trainer's own `user_errors`: the
      message, no retry;
    - preempted (SIGTERM/SIGINT, checkpoint written): the message, and the run is tagged so that
      the daemon's run retries (`run_retries` in dagster.yaml, `make ui`) re-run it, resuming there.
    """
    try:
        yield
    except (TrainingFailed, TrainingDiverged, CheckpointBusy, *user_errors) as exc:
        raise user_error(RuntimeError(f"{label}: {exc}")) from None
    except Preempted as exc:
        context.instance.add_run_tags(context.run_id, {RETRY_ON_STEP_FAILURE_TAG: "true"})
        raise dg.Failure(description=f"{label}: {exc}", allow_retries=False) from None


def table(rows: list[dict[str, Any]], columns: Iterable[str]) -> dg.TableMetadataValue:
    columns = list(columns)
    records = [dg.TableRecord({c: _cell(r.get(c)) for c in columns}) for r in rows]
    schema = dg.TableSchema(columns=[dg.TableColumn(c, _type(rows, c)) for c in columns])
    return dg.MetadataValue.table(records=records, schema=schema)


def frame_table(df, preview_rows: int | None = None) -> dg.TableMetadataValue:
    """A pandas DataFrame (its first `preview_rows` rows) as a UI table, columns typed from its dtypes."""
    from ..evaluation.tables import column_kinds, records

    shown = df if preview_rows is None else df.head(preview_rows)
    schema = dg.TableSchema(columns=[dg.TableColumn(c, kind) for c, kind in column_kinds(df).items()])
    rows = [dg.TableRecord({k: _cell(v) for k, v in r.items()}) for r in records(shown)]
    return dg.MetadataValue.table(records=rows, schema=schema)


def table_facts(df) -> dict[str, Any]:
    """The asset's own table, as Dagster's standard keys: `dagster/column_schema`, `dagster/row_count`."""
    from ..evaluation.tables import column_kinds

    schema = dg.TableSchema(columns=[dg.TableColumn(c, kind) for c, kind in column_kinds(df).items()])
    return {"dagster/column_schema": dg.MetadataValue.table_schema(schema),
            "dagster/row_count": dg.MetadataValue.int(len(df))}


def _cell(v: Any) -> Any:
    if v is None or isinstance(v, (str, int, float, bool)):
        return v if not isinstance(v, str) or len(v) < 400 else v[:397] + "..."
    return json.dumps(v)


def _type(rows: list[dict[str, Any]], col: str) -> str:
    vals = [r.get(col) for r in rows if r.get(col) is not None]
    if vals and all(isinstance(v, bool) for v in vals):
        return "bool"
    if vals and all(isinstance(v, int) for v in vals):
        return "int"
    if vals and all(isinstance(v, (int, float)) for v in vals):
        return "float"
    return "string"


def eval_examples(recipe: Recipe, sft_dataset: Artifact):
    """The held-out split every evaluation uses (capped by evaluation.max_examples)."""
    from ..data.sft_dataset import load_split

    examples = load_split(sft_dataset.path, "eval")
    return examples[: recipe.evaluation.max_examples] if recipe.evaluation.max_examples else examples


PENDING = ("`eval_report[{m}]` measures it; the complete card, with the metrics and the weights beside it, "
           "is the `model_card[{m}]` artifact (`python -m ft_assets artifacts`).")


def write_card(out_dir: Path, recipe: Recipe, lin: card.Lineage, what: str, uses_quantized_base: bool,
               metrics: dict[str, Any] | None = None, repo: str = "REPO") -> str:
    """Write README.md (a Hugging Face model card) for the weights in `out_dir`; metrics None: says
    they are pending. `repo`: the name the usage snippet loads from."""
    text = card.card_text(lin, what=what, weights_dir=out_dir, uses_quantized_base=uses_quantized_base,
                          dataset_names=[d.name for d in recipe.datasets], recipe_name=recipe.name, metrics=metrics,
                          pending_note=PENDING.format(m=lin.method), license=recipe.publish.license, repo=repo)
    (out_dir / card.README).write_text(text, encoding="utf-8")
    return text


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
