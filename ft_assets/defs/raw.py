"""Raw data: one observable source asset per dataset file in the recipe.

The data version is the sha256 of the file's bytes (a `format: hf` directory or cached id:
of its data files, `data.hfdata.source_version`), so rewriting or touching a file without
changing it changes nothing downstream; editing one row makes its descendants stale. The
`ft_assets_observe_sources` sensor (defs/automation.py) hashes the files every
`automation.observe_interval_s` seconds; "Observe" in the UI does the same by hand. A file whose
size, mtime, ctime, inode and device are those of its last hash in this process is not read
again (`data.hfdata.file_sha256`): a tick costs a stat per unchanged file, not its bytes.
"""


import dagster as dg

from ..data.rows import source_path
from ..data.hfdata import source_version
from ..config.recipe import DatasetSpec, PreferenceDataSpec, Recipe
from . import _common as c


def raw_key(recipe: Recipe, ds: DatasetSpec | PreferenceDataSpec) -> dg.AssetKey:
    return c.key(recipe, "raw", ds.name)


def file_version(path) -> str:
    """A data file's version: the first 16 hex digits of the sha256 of its bytes (a directory's
    or a cached dataset id's: of its data files); "missing" when there is none."""
    return source_version(path)


def _observer(recipe: Recipe, ds: DatasetSpec | PreferenceDataSpec):
    path = source_path(recipe, ds)

    @dg.observable_source_asset(
        key=raw_key(recipe, ds),
        group_name=c.group(recipe, "raw_data"),
        description=f"The dataset file `{path.name}` ({ds.format}); data version = content hash.",
        metadata={"path": dg.MetadataValue.path(str(path)), "format": ds.format},
    )
    def observe_file() -> dg.ObserveResult:
        version = file_version(path)
        return dg.ObserveResult(data_version=dg.DataVersion(version), metadata={"exists": version != "missing"})

    return observe_file


def data_files(recipe: Recipe) -> list[DatasetSpec | PreferenceDataSpec]:
    """Every data file the recipe reads: its datasets and, when it has one, its preference file."""
    return [*recipe.datasets, *([recipe.preferences] if recipe.preferences else [])]


def build(recipe: Recipe) -> list:
    return [_observer(recipe, ds) for ds in data_files(recipe)]
