"""Resources: the compute device and the artifact store, plus the IO manager that passes
artifacts between assets as paths (never as pickled models)."""

from __future__ import annotations

import os

import dagster as dg

from ..core.device import Compute, resolve
from ..store import Artifact, ArtifactStore, ft_home


class ComputeResource(dg.ConfigurableResource):
    """Where models run: `auto` picks CUDA when visible (bf16 autocast), else CPU (float32)."""

    device: str = "auto"
    threads: int | None = None

    def resolve(self) -> Compute:
        return resolve(self.device, self.threads)


class StoreResource(dg.ConfigurableResource):
    """Versioned artifact directories under FT_HOME (see `ft_assets.store`)."""

    home: str = ""

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.home or ft_home())


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Assets return an `Artifact` (a finished directory); downstream inputs get it back.

    The artifact itself is written by the asset through the store; this only records and
    reads the store's LATEST pointer for the asset/partition.
    """

    home: str = ""

    def _store(self) -> ArtifactStore:
        return ArtifactStore(self.home or ft_home())

    def handle_output(self, context: dg.OutputContext, obj: Artifact) -> None:
        if obj is None:
            return
        self._store().set_latest(obj)

    def load_input(self, context: dg.InputContext) -> Artifact | dict[str, Artifact]:
        asset = context.asset_key.path[-1]
        store = self._store()
        if context.has_asset_partitions and len(context.asset_partition_keys) > 1:
            found = {p: store.latest(asset, p) for p in context.asset_partition_keys}
            return {p: a for p, a in found.items() if a is not None}
        partition = context.asset_partition_key if context.has_asset_partitions else None
        art = store.latest(asset, partition)
        if art is None:
            raise dg.Failure(
                f"no artifact for {asset}{f'[{partition}]' if partition else ''} in {store.root}; "
                "materialize it first"
            )
        return art


def default_resources() -> dict:
    return {
        "compute": ComputeResource(device=os.environ.get("FT_DEVICE", "auto")),
        "store": StoreResource(home=str(ft_home())),
        "io_manager": ArtifactIOManager(home=str(ft_home())),
    }
