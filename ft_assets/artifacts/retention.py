"""Retention: which artifact versions the store may drop, and dropping them.

Kept, per asset/partition slot: the version `LATEST.json` points to, the `keep` newest versions
(by manifest `created`, then the manifest file's mtime), and the `pinned` versions: the `prune`
command pins the version the latest Dagster materialization of every asset key and partition
recorded (`ft_assets.defs.recorded`), the one the IO manager loads as the next run's input even
where LATEST has moved past it (a step that failed after its store write, a write by another
instance); then, transitively, every version a kept version references: its manifest `inputs`
(`asset[partition]: version`), and the versions continual learning reads outside them
(`continual.previous_sft_dataset`, `forgetting.previous_adapter`/`previous_sft_dataset` of an eval
report). Everything else is dropped. A version named by a kept manifest is never dropped, whatever
its age.

Concurrent writers (`apply`): each slot is dropped from under its exclusive lock
(`ft_assets.artifacts.slot_locks`), taken without waiting. A writer holds that lock shared for its whole
write, a step reusing a version while it finds it and makes it LATEST, so a slot in use is skipped
(its versions stay; the next prune drops them). Under the locks, what must stay is computed again
(LATEST of every slot now, what Dagster records now, and what they name) and spared. The locks are
`flock`s in the local home: they exclude the writers of this machine only. On an object store
shared by several machines, a writer elsewhere that commits or reuses a version while a prune here
drops it is not excluded; run `prune --delete` on an object store when no other machine is writing
to it. Not covered either: a step still running that loaded an input version which has been
superseded since (neither LATEST nor recorded any more).

Dropping one version (`ArtifactStore.drop`): locally, rename its directory to `.deleting-*` in its
slot (one atomic step: from then on no reader finds it, and readers never look at dot-directories),
then delete that directory; on an object store, a deletion marker, then the manifest (the version is
gone for readers), then its files. A crash in between leaves a `.deleting-*` directory or a marked
prefix the next prune finishes. Directories without a manifest are not artifacts (a writer's
staging area or upload in progress, a foreign file) and are left alone.
Nothing here imports Dagster or torch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from . import slot_locks
from .asset_keys import format_key, parse_key
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
    every: dict[Ref, Version] = field(default_factory=dict, repr=False)  # every finished version seen

    @property
    def drop_bytes(self) -> int:
        return sum(v.bytes for v in self.drop)


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


def plan(store: ArtifactStore, keep: int = 1, pinned: Mapping[Ref, str] | None = None) -> RetentionPlan:
    """What stays (with why) and what goes. `pinned`: versions that stay whatever their age, with why
    (the versions Dagster recorded, `ft_assets.defs.recorded`); one the store lacks is ignored."""
    if keep < 1:
        raise ValueError("keep must be at least 1 (the latest version of every slot always stays)")
    every = versions(store)
    pinned = pinned or {}
    result = RetentionPlan(keep, every=every)
    slots: dict[tuple[str, str | None], list[Version]] = {}
    for v in every.values():
        slots.setdefault((v.asset, v.partition), []).append(v)
    for (asset, part), vs in slots.items():
        vs.sort(key=lambda v: (v.created, v.mtime_ns), reverse=True)
        latest = store.latest_version(asset, part)
        for i, v in enumerate(vs):
            newest = f"among the {keep} newest" if i < keep else None
            why = "latest" if v.version == latest else pinned.get(v.ref) or newest
            if why:
                result.kept[v.ref] = why
    keep_inputs(result.kept, lambda ref: every[ref].refs, every.__contains__)
    result.drop = sorted((v for r, v in every.items() if r not in result.kept), key=lambda v: (v.key, v.created))
    result.leftovers = store.interrupted_drops()
    return result


def keep_inputs(kept: dict[Ref, str], refs_of: Callable[[Ref], Iterable[Ref]], exists: Callable[[Ref], bool]) -> None:
    """Add to `kept`, transitively, every existing version a kept one names (why: an input of it)."""
    todo = list(kept)
    while todo:
        ref = todo.pop()
        for dep in refs_of(ref):
            if dep not in kept and exists(dep):
                kept[dep] = f"an input of {format_key(ref[0], ref[1])} {ref[2]}"
                todo.append(dep)


IN_USE = "in use: a writer, or a step reusing a version, holds the slot's lock; prune again later"


@dataclass
class Applied:
    """What `apply` did: the versions dropped, the planned ones that stayed (and why), bytes freed."""

    dropped: list[Version] = field(default_factory=list)
    spared: dict[Ref, str] = field(default_factory=dict)
    freed: int = 0


def apply(store: ArtifactStore, p: RetentionPlan, recorded: Callable[[], Mapping[Ref, str]] | None = None) -> Applied:
    """Drop the plan's versions, each slot under its exclusive lock (a slot in use is skipped:
    `IN_USE`); under the locks, a version that must stay now (`kept_now`, with `recorded()` read
    again) is spared. Then finish an interrupted prune's leftovers."""
    done = Applied()
    by_slot: dict[tuple[str, str | None], list[Version]] = {}
    for v in p.drop:
        by_slot.setdefault((v.asset, v.partition), []).append(v)
    with contextlib.ExitStack() as locks:
        mine: list[Version] = []
        for (asset, part), vs in by_slot.items():
            if locks.enter_context(slot_locks.exclusive(store.home, store.rel(asset, part))):
                mine += vs
            else:
                done.spared.update((v.ref, IN_USE) for v in vs)
        now = kept_now(store, p, recorded() if recorded else {}) if mine else {}
        for v in mine:
            if v.ref in now:
                done.spared[v.ref] = now[v.ref]
            elif store.read_manifest(v.asset, v.partition, v.version) is not None:  # else gone meanwhile
                store.drop(v.asset, v.partition, v.version)
                done.dropped.append(v)
                done.freed += v.bytes
    for left in p.leftovers:
        store.finish_drop(left)
    return done


def kept_now(store: ArtifactStore, p: RetentionPlan, pinned: Mapping[Ref, str]) -> dict[Ref, str]:
    """What must stay at this moment: the plan's kept versions, what every LATEST names now, the
    `pinned` versions now, and what they name (manifests written since the plan are read)."""
    kept = dict(p.kept)
    for row in store.list_latest():
        kept.setdefault((row["asset"], row["partition"], row["data_version"]), "latest now")
    for ref, why in pinned.items():
        kept.setdefault(ref, why)

    def refs_of(ref: Ref) -> Iterable[Ref]:
        if ref in p.every:
            return p.every[ref].refs
        manifest = store.read_manifest(*ref) if _plain(ref) else None  # a name from elsewhere is no path
        return references(manifest) if manifest else ()

    keep_inputs(kept, refs_of, lambda _ref: True)
    return kept


def _plain(ref: Ref) -> bool:
    """Whether every part of a version's name (from a pin or a manifest) is one plain path component."""
    return all(part is None or (part and part[0] != "." and not any(c in part for c in "/\\\0"))
               for part in ref)
