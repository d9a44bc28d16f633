"""Retention: which artifact versions the store may drop, and dropping them.

Kept, per asset/partition slot: the version `LATEST.json` points to and the `keep` newest
versions (by manifest `created`, then the manifest file's mtime); then, transitively, every
version a kept version references: its manifest `inputs` (`asset[partition]: version`), and the
versions continual learning reads outside them (`continual.previous_sft_dataset`,
`forgetting.previous_adapter`/`previous_sft_dataset` of an eval report). Everything else is
dropped. A version named by a kept manifest is never dropped, whatever its age.

Dropping one version: rename its directory to `.deleting-*` in its slot (one atomic step: from then
on no reader finds it, and readers never look at dot-directories), then delete that directory. A
crash in between leaves a `.deleting-*` directory the next prune removes. Directories without a
manifest are not artifacts (a writer's staging area, a foreign file) and are left alone.
Nothing here imports Dagster or torch.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .store import LATEST, MANIFEST, NO_PARTITION, ArtifactStore, dir_bytes

Ref = tuple[str, str | None, str]  # (asset, partition, version)


@dataclass(frozen=True)
class Version:
    asset: str
    partition: str | None
    version: str
    path: Path
    created: str
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
    leftovers: list[Path] = field(default_factory=list)  # `.deleting-*` of an interrupted prune

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
    continual = manifest.get("continual") or {}
    if continual.get("previous_sft_dataset"):
        refs.append(("sft_dataset", None, continual["previous_sft_dataset"]))
    forgetting = manifest.get("forgetting") or {}
    if forgetting.get("previous_sft_dataset"):
        refs.append(("sft_dataset", None, forgetting["previous_sft_dataset"]))
    if forgetting.get("previous_adapter"):
        for key, ver in (manifest.get("inputs") or {}).items():
            asset, part = parse_key(key)
            if asset in ("adapter", "preference_adapter"):
                refs.append((asset, part, forgetting["previous_adapter"]))
    return refs


def versions(store: ArtifactStore) -> dict[Ref, Version]:
    """Every finished version in the store (a directory with a manifest)."""
    out: dict[Ref, Version] = {}
    if not store.root.is_dir():
        return out
    for manifest in sorted(store.root.glob(f"*/*/*/{MANIFEST}")):
        d = manifest.parent
        if d.name.startswith("."):
            continue
        m = json.loads(manifest.read_text())
        part = None if d.parent.name == NO_PARTITION else d.parent.name
        v = Version(d.parent.parent.name, part, d.name, d, m.get("created") or "", dir_bytes(d), tuple(references(m)))
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
        vs.sort(key=lambda v: (v.created, (v.path / MANIFEST).stat().st_mtime_ns), reverse=True)
        pointer = store.slot(asset, part) / LATEST
        latest = json.loads(pointer.read_text())["version"] if pointer.is_file() else None
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
    if store.root.is_dir():
        result.leftovers = sorted(store.root.glob("*/*/.deleting-*"))
    return result


def apply(p: RetentionPlan) -> int:
    """Drop the plan's versions (and an interrupted prune's leftovers); the bytes freed."""
    freed = 0
    for v in p.drop:
        if not (v.path / MANIFEST).is_file():
            continue  # gone meanwhile
        doomed = v.path.parent / f".deleting-{v.version}-{uuid.uuid4().hex[:8]}"
        v.path.rename(doomed)  # from here on no reader finds the version
        shutil.rmtree(doomed)
        freed += v.bytes
    for d in p.leftovers:
        shutil.rmtree(d, ignore_errors=True)
    return freed
