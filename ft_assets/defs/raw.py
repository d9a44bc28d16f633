"""Raw data: one observable source asset per dataset file in the recipe.

The data version is the sha256 of the file's bytes, so rewriting or touching a file without
changing it changes nothing downstream; editing one row makes its descendants stale. Files
are observed on the recipe's `automation.observe_data_cron`.
"""


import dagster as dg

from ..recipe import DatasetSpec, Recipe
from ..store import file_hash
from .automation import observe_condition


def raw_key(ds: DatasetSpec) -> dg.AssetKey:
    return dg.AssetKey(["raw", ds.name])


def _observer(recipe: Recipe, ds: DatasetSpec):
    path = recipe.dataset_path(ds)

    @dg.observable_source_asset(
        key=raw_key(ds),
        group_name="raw_data",
        description=f"The dataset file `{path.name}` ({ds.format}); data version = content hash.",
        metadata={"path": dg.MetadataValue.path(str(path)), "format": ds.format},
        automation_condition=observe_condition(recipe),
    )
    def observe_file() -> dg.ObserveResult:
        if not path.is_file():
            return dg.ObserveResult(data_version=dg.DataVersion("missing"), metadata={"exists": False})
        return dg.ObserveResult(
            data_version=dg.DataVersion(file_hash(path)[:16]),
            metadata={"exists": True, "bytes": path.stat().st_size, "sha256": file_hash(path)},
        )

    return observe_file


def build(recipe: Recipe) -> list:
    return [_observer(recipe, ds) for ds in recipe.datasets]
