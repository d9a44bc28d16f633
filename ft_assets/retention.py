"""Retention: which artifact versions the store may drop, and dropping them.

Kept, per asset/partition slot: the version `LATEST.json` points to and the `keep` newest
versions (by manifest `created`, then the manifest file's mtime); then, transitively, every
version a kept version references: its manifest `inputs` (`asset[partition]: version`), and the
versions continual learning reads outside them (`continual.previous_sft_dataset`,
`forgetting.previous_adapter`/`previous_sft_dataset` of an eval report). Everything else is
dropped. A version named by a kept manifest is never dropped, whatever its age.

Dropping one version (`ArtifactStore.drop`): locally, rename its directory to `.deleting-*` in its
slot (one atomic step: from then on no reader finds it, and readers never look at dot-directories),
then delete that directory; on an object store, a deletion marker, then the manifest (the version is
gone for readers), then its files. A crash in between leaves a `.deleting-*` directory or a marked
prefix the next prune finishes. Directories without a manifest are not artifacts (a writer's
staging area or upload in progress, a foreign file) and are left alone.
Nothing here imports Dagster or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .store import ArtifactStore

Ref = tuple[str, str | None, str]  # (asset, partition, version)


@dataclass(frozen=True)
class Version:
    asset: str
    partition: str | None
    version: str
    location: str  # its directory, or its URL on an object store
    created: str
    mtime_ns: int
    bytes: int
    refs: tuple[Ref, ...]  # what its manifest names (`references`)

    @property
    def ref(self) -> Ref:
        return (self.asset, self.partition, self.version)

    @property
    def key(self) -> str:
        return f"{self.asset}[{self.partition}]" if self.partition else self.asset


@dataclass
class RetentionPlan:
    keep: int
    kept: dict[Ref, str] = field(default_factory=dict)  # version -> why it stays
    drop: list[Version] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # what an interrupted prune left

    @property
    def drop_bytes(self) -> int:
        return sum(v.bytes for v in self.drop)


def parse_key(key: str) -> tuple[str, str | None]:
    """`adapter[lora]` -> ("adapter", "lora"); `sft_dataset` -> ("sft_dataset", None)."""
    name, _, part = key.partition("[")
    return name, (part[:-1] if part.endswith("]") else None)


def references(manifest: dict) -> list[Ref]:
    """The store versions a manifest names: its inputs and what continual learning reads besides."""
    refs = [(*parse_key(k), v) for k, v in (manifest.get("inputs") or {}).items() if isinstance(v, str)]
    # the manifest's own pipeline namespace (`finance.adapter`: several recipes in one store)
    namespace, _, _ = str(manifest.get("asset") or "").rpartition(".")
    sft_dataset = f"{namespace}.sft_dataset" if namespace else "sft_dataset"
    continual = manifest.get("continual") or {}
    if continual.get("previous_sft_dataset"):
        refs.append((sft_dataset, None, continual["previous_sft_dataset"]))
    forgetting = manifest.get("forgetting") or {}
    if forgetting.get("previous_sft_dataset"):
        refs.append((sft_dataset, None, forgetting["previous_sft_dataset"]))
    if forgetting.get("previous_adapter"):
        for key, ver in (manifest.get("inputs") or {}).items():
            asset, part = parse_key(key)
            if asset.rsplit(".", 1)[-1] in ("adapter", "preference_adapter"):
                refs.append((asset, part, forgetting["previous_adapter"]))
    return refs


def versions(store: ArtifactStore) -> dict[Ref, Version]:
    """Every finished version in the store (one with a manifest)."""
    out: dict[Ref, Version] = {}
    for sv in store.stored_versions():
        m = sv.manifest
        v = Version(sv.asset, sv.partition, sv.version, sv.location, m.get("created") or "", sv.mtime_ns, sv.bytes,
                    tuple(references(m)))
        out[v.ref] = v
    return out


def plan(store: ArtifactStore, keep: int = 1) -> RetentionPlan:
    if keep < 1:
        raise ValueError("keep must be at least 1 (the latest version of every slot always stays)")
    every = versions(store)
    result = RetentionPlan(keep)
    slots: dict[tuple[str, str | None], list[Version]] = {}
    for v in every.values():
        slots.setdefault((v.asset, v.partition), []).append(v)
    todo: list[Ref] = []
    for (asset, part), vs in slots.items():
        vs.sort(key=lambda v: (v.created, v.mtime_ns), reverse=True)
        latest = store.latest_version(asset, part)
        for i, v in enumerate(vs):
            why = "latest" if v.version == latest else f"among the {keep} newest" if i < keep else None
            if why:
                result.kept[v.ref] = why
                todo.append(v.ref)
    while todo:  # everything a kept version names stays too
        ref = todo.pop()
        for dep in every[ref].refs:
            if dep in every and dep not in result.kept:
                result.kept[dep] = f"an input of {every[ref].key} {ref[2]}"
                todo.append(dep)
    result.drop = sorted((v for r, v in every.items() if r not in result.kept), key=lambda v: (v.key, v.created))
    result.leftovers = store.interrupted_drops()
    return result


def apply(store: ArtifactStore, p: RetentionPlan) -> int:
    """Drop the plan's versions (and an interrupted prune's leftovers); the bytes freed."""
    freed = 0
    for v in p.drop:
        if store.read_manifest(v.asset, v.partition, v.version) is None:
            continue  # gone meanwhile
        store.drop(v.asset, v.partition, v.version)
        freed += v.bytes
    for left in p.leftovers:
        store.finish_drop(left)
    return freed
