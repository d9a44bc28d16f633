"""Resources: the compute device and the artifact store, plus the IO manager that passes
artifacts between assets as paths (never as pickled models)."""

from __future__ import annotations

import os

import dagster as dg

from ..models import gpu_leases
from ..models.device import Compute, resolve
from ..artifacts.store import Artifact, ArtifactStore
from ..config.paths import store_location

DATA_VERSION_TAG = "dagster/data_version"  # where Dagster keeps a materialization's data version
ALL_PARTITIONS = "ft_assets/all_partitions"  # AssetIn metadata: load {partition: artifact} of every partition


def all_partitions(key: dg.AssetKey | None = None) -> dg.AssetIn:
    """An input that receives every materialized partition of a partitioned upstream (`key`, else
    the parameter's name), as a dict."""
    return dg.AssetIn(key=key, metadata={ALL_PARTITIONS: True})


class ComputeResource(dg.ConfigurableResource):
    """Where models run: `auto` picks CUDA when visible (bf16 autocast), else CPU (float32)."""

    device: str = "auto"
    threads: int | None = None

    def resolve(self) -> Compute:
        hw = resolve(self.device, self.threads)
        if hw.device == "cuda":  # steps at once (a gpu pool above 1) each on a GPU of their own
            gpu_leases.hold_for_process()
        return hw


class StoreResource(dg.ConfigurableResource):
    """Versioned artifact directories under FT_HOME, a directory or a URL (see `ft_assets.artifacts.store`).
    One store serves every pipeline of the deployment, each in its namespace (`Recipe.pipeline`)."""

    home: str = ""

    def store(self, namespace: str | None = None) -> ArtifactStore:
        return ArtifactStore(self.home or None, namespace)


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Assets return an `Artifact` (a finished directory); downstream inputs get back exactly the
    version Dagster recorded for the upstream's latest materialization (its data version), never
    whatever the store's LATEST pointer says now: a newer directory written by a run Dagster has
    not recorded (another instance, a run still in flight) cannot slip under the lineage the UI
    shows. The artifact itself is written by the asset through the store; this only moves the
    LATEST pointer on output. A key `<pipeline>/<asset>` is the asset in that pipeline's store
    namespace (several recipes in one deployment).
    """

    home: str = ""

    def _store(self, key: dg.AssetKey | None = None) -> ArtifactStore:
        return ArtifactStore(self.home or None, key.path[0] if key is not None and len(key.path) > 1 else None)

    def handle_output(self, context: dg.OutputContext, obj: Artifact) -> None:
        if obj is None:
            return
        self._store(context.asset_key).set_latest(obj)

    def load_input(self, context: dg.InputContext) -> Artifact | dict[str, Artifact] | None:
        if (context.definition_metadata or {}).get(ALL_PARTITIONS):
            # {partition: artifact} of the partitions materialized so far (the reader says which are missing)
            found = {p: self._recorded(context, p) for p in context.asset_partition_keys}
            return {p: a for p, a in found.items() if a is not None}
        if context.has_asset_partitions and not context.asset_partition_keys:
            return None  # the partition mapping gives this partition no upstream partition (see adapters.py)
        partition = context.asset_partition_key if context.has_asset_partitions else None
        art = self._recorded(context, partition)
        if art is None:
            label = f"{context.asset_key.to_user_string()}{f'[{partition}]' if partition else ''}"
            raise dg.Failure(f"Dagster has no materialization of {label} with an artifact in {self._store().artifacts_location}; "
                             "materialize it first (in this Dagster instance)")
        return art

    def _recorded(self, context: dg.InputContext, partition: str | None) -> Artifact | None:
        """The artifact of the data version Dagster recorded for the latest materialization."""
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=[partition] if partition else None),
            limit=1).records
        if not records:
            return None
        version = (records[0].asset_materialization.tags or {}).get(DATA_VERSION_TAG)
        return self._store(context.asset_key).get(context.asset_key.path[-1], partition, version) if version else None


def default_resources() -> dict:
    return {
        "compute": ComputeResource(device=os.environ.get("FT_DEVICE", "auto")),
        "store": StoreResource(home=store_location()),
        "io_manager": ArtifactIOManager(home=store_location()),
    }
