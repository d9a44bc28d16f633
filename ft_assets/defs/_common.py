"""Helpers every stage module uses: versions, outputs, metadata, user-facing failures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import dagster as dg

from ..recipe import Recipe
from ..store import Artifact

# Bump a stage's number when its code changes what it produces; Dagster then marks that
# stage and everything downstream stale.
STAGE_VERSIONS = {
    "sft_dataset": "1",
    "base_model": "1",
    "quantized_base": "1",
    "adapter": "1",
    "merged_model": "1",
    "base_eval": "1",
    "eval_report": "1",
    "leaderboard": "1",
    "preference_dataset": "1",
    "student": "1",
}


def code_version(stage: str, recipe: Recipe, *sections: str) -> str:
    """Stage code version + hash of the recipe sections it reads: editing those re-versions it."""
    return f"{STAGE_VERSIONS[stage]}-{recipe.section_hash(*sections)}" if sections else STAGE_VERSIONS[stage]


def key_of(art: Artifact) -> str:
    return f"{art.asset}[{art.partition}]" if art.partition else art.asset


def inputs_of(*arts: Artifact | None) -> dict[str, str]:
    return {key_of(a): a.version for a in arts if a is not None}


def output(art: Artifact, metadata: dict[str, Any]) -> dg.Output:
    manifest = art.manifest()
    return dg.Output(
        art,
        data_version=dg.DataVersion(art.version),
        metadata={
            "path": dg.MetadataValue.path(art.path),
            "data_version": art.version,
            "inputs": dg.MetadataValue.json(manifest.get("inputs", {})),
            "recipe_hash": manifest.get("recipe_hash", ""),
            **metadata,
        },
    )


def user_error(exc: Exception, what_to_do: str = "") -> dg.Failure:
    """A failure whose description is the message a user should read (no traceback hunt)."""
    return dg.Failure(description=f"{exc}{(' ' + what_to_do) if what_to_do else ''}", allow_retries=False)


def table(rows: list[dict[str, Any]], columns: Iterable[str]) -> dg.TableMetadataValue:
    columns = list(columns)
    records = [dg.TableRecord({c: _cell(r.get(c)) for c in columns}) for r in rows]
    schema = dg.TableSchema(columns=[dg.TableColumn(c, _type(rows, c)) for c in columns])
    return dg.MetadataValue.table(records=records, schema=schema)


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
    from ..core.data import load_split

    examples = load_split(sft_dataset.path, "eval")
    return examples[: recipe.evaluation.max_examples] if recipe.evaluation.max_examples else examples


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
