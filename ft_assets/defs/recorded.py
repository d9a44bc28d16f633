"""The artifact versions Dagster recorded: for every asset key and partition of an instance, the
version its latest materialization names (the data version `_common.output` gives it). That is what
`ArtifactIOManager` loads as a downstream input, whatever LATEST says (a step that failed after its
store write, a write by another instance), so `prune` keeps it: these are `retention.plan`'s
`pinned` versions, read here because `ft_assets.artifacts.retention` does not import Dagster.

The instance is the one the user's runs use (`demo.ensure_instance`): $DAGSTER_HOME, else
`dagster/` in the local home beside the store. Where no instance is (no `dagster.yaml`, no SQLite
storage), nothing is recorded and nothing is created; one that exists but cannot be read is an
error (`InstanceUnreadable`): prune then deletes nothing.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

import dagster as dg

from ..artifacts.store import ArtifactStore
from ..config.paths import local_home

Ref = tuple[str, str | None, str]  # (slot's asset, partition, version), as `retention.Ref`
DATA_VERSION_TAG = "dagster/data_version"  # = resources.DATA_VERSION_TAG (not imported: resources imports torch)


class InstanceUnreadable(RuntimeError):
    """The instance exists but cannot be read (storage gone, $FT_PG_URL unset, server down)."""


def instance_home(store: ArtifactStore) -> Path:
    """Where the user's runs keep their instance, as `demo.ensure_instance` decides it."""
    beside = local_home() if store.remote is not None else store.home
    return Path(os.environ.get("DAGSTER_HOME") or beside / "dagster").resolve()


def has_instance(home: Path) -> bool:
    """Whether an instance lives there: its config, or the SQLite storage of one used without config."""
    return (home / "dagster.yaml").is_file() or (home / "history").is_dir() or (home / "storage").is_dir()


@contextlib.contextmanager
def recorded_reader(store: ArtifactStore) -> Iterator[Callable[[], dict[Ref, str]] | None]:
    """A function that reads, each time it is called, the versions recorded in the instance beside
    `store` (`recorded_versions`); None where there is no instance."""
    home = instance_home(store)
    if not has_instance(home):
        yield None
        return
    try:
        instance = dg.DagsterInstance.from_config(str(home))
    except Exception as exc:  # noqa: BLE001 (any storage or config error: one message)
        raise InstanceUnreadable(f"cannot open the Dagster instance at {home} (DAGSTER_HOME): {_short(exc)}") from exc
    with instance:
        yield lambda: recorded_versions(instance, store, home)


def recorded_versions(instance: dg.DagsterInstance, store: ArtifactStore, where: Path | str = "") -> dict[Ref, str]:
    """{(slot, partition, version): "recorded by Dagster run <id>"} for the latest materialization of
    every asset key (any partition, as an unpartitioned input loads it) and of each of its partitions."""
    stores: dict[str | None, ArtifactStore] = {}
    out: dict[Ref, str] = {}
    try:
        for key in instance.get_asset_keys():
            namespace = key.path[0] if len(key.path) > 1 else None  # as ArtifactIOManager maps a key
            if namespace not in stores:
                stores[namespace] = ArtifactStore(store.location, namespace)
            slot = stores[namespace].qualified(key.path[-1])
            for partition in [None, *sorted(instance.get_materialized_partitions(key))]:
                records = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None),
                    limit=1).records
                if not records:
                    continue
                event = records[0].asset_materialization
                version = (event.tags or {}).get(DATA_VERSION_TAG) if event else None
                if version:
                    run = records[0].run_id
                    why = f"recorded by Dagster run {run}" if run else "recorded by Dagster (reported, no run)"
                    out.setdefault((slot, event.partition, version), why)
    except Exception as exc:  # noqa: BLE001 (a storage error mid-read: one message, nothing dropped)
        raise InstanceUnreadable(f"cannot read the materializations of the Dagster instance {where}: "
                                 f"{_short(exc)}") from exc
    return out


def _short(exc: Exception) -> str:
    """The error's type and first line, cut (Dagster's config errors run to pages)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}{'...' if len(first) > 300 else ''}"
