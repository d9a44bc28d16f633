"""Versioned, immutable artifact directories under FT_HOME.

Layout::

    $FT_HOME/artifacts/<asset>/<partition or _>/<version>/   the artifact, with manifest.json
    $FT_HOME/artifacts/<asset>/<partition or _>/LATEST.json  pointer to the newest version
    $FT_HOME/artifacts/<asset>/<partition or _>/.staging-*   work in progress (never read)

An artifact is written into a private staging directory and renamed into place only when
complete, so a crash leaves no directory that looks finished, and a failed run leaves the
previous good version untouched. Version dirs are never overwritten. The version is either
- the content hash of the files (manifest excluded), for artifacts derived from data: equal
  content gives one directory; or
- the hash of a derivation (input versions, code version, recipe section, seed), for trained
  artifacts, whose bytes differ between identical runs (GPU kernels, several processes): the
  same request gives the same version, and `find_derived` finds it done; or
- a canonical content version the writer computes and sets (`Staging.version`), for data whose
  file layout varies with how it was built (Arrow shards depend on the worker count): the hash
  of a layout-free form of the content, so the same data keeps one version on any machine.
The manifest records the content hash of the files in every case, as a fact.
FT_HOME may also be a URL (`s3://bucket/prefix`, any fsspec filesystem): the same layout lives
there, written manifest-last and read through a local cache keyed by version
(`ft_assets.artifacts.object_store`); `Artifact.path` is then the cached copy, so readers are the same. Every
name read from such a store (slots, versions, file names) is checked before it becomes a cache path,
a download is verified against its manifest's content hash, and a writer that finds another
machine's copy of its version committed first takes that copy into its cache.
Several pipelines (recipes) in one store: a store opened with `namespace=<pipeline>` keeps each
asset in the slot `<pipeline>.<asset>`, except the `SHARED_ASSETS` (the base model, whose version
is its content): pipelines reading the same base file share one version.
Each slot has a lock in `<home>/.locks/` (`ft_assets.artifacts.slot_locks`, one machine): a writer holds it
shared for its whole write, a reuser while it finds a version (`find_derived`, `find_made_from`) and
makes it LATEST; `prune` holds it exclusively while it drops versions of the slot. Nothing here
imports Dagster or torch.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import slot_locks
from ..config.paths import is_url, local_home, store_location
from .object_store import (MANIFEST, ObjectStore, UnsafeStoreName, check_slot_name, check_version,
                           content_hash)

LATEST = "LATEST.json"
SHARED_ASSETS = frozenset({"base_model"})  # one slot for every pipeline (see the module doc)
NO_PARTITION = "_"
@dataclass(frozen=True)
class Artifact:
    """A finished artifact: what downstream steps receive (a path, never pickled weights)."""

    asset: str
    partition: str | None
    version: str
    path: str

    @property
    def dir(self) -> Path:
        return Path(self.path)

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.dir / MANIFEST).read_text())


@dataclass(frozen=True)
class StoredVersion:
    """A finished version as the store lists it (`ArtifactStore.stored_versions`)."""

    asset: str
    partition: str | None
    version: str
    manifest: dict[str, Any]
    location: str  # its directory, or its URL on a remote store
    bytes: int
    mtime_ns: int  # the manifest file's (0 on a remote store): orders versions created in one second


@dataclass(frozen=True)
class Checkpoints:
    """A training run's checkpoint directory (`ArtifactStore.checkpoints`)."""

    dir: Path
    remote: ObjectStore | None
    rel: str

    def saved(self, _checkpoint: Path) -> None:
        """`training.loop`'s on_checkpoint: mirror the newest checkpoint to the object store."""
        if self.remote is not None:
            self.remote.push_checkpoint(self.dir, self.rel)

    def finished(self) -> None:
        """The artifact is written: its checkpoints go, here and on the object store."""
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.remote is not None:
            self.remote.delete_prefix(self.rel)


@dataclass
class Staging:
    """A directory being written. Fill `path`, add `inputs`/`extra`, then leave the block."""

    asset: str
    partition: str | None
    path: Path
    inputs: dict[str, str] = field(default_factory=dict)  # "asset[partition]" -> version
    extra: dict[str, Any] = field(default_factory=dict)
    version: str | None = None  # set inside the block: a canonical content version (see the module doc)
    artifact: Artifact | None = None  # set when the block exits cleanly


class ArtifactStore:
    """The store at `home` (default $FT_HOME): a local directory, or a URL with a local cache.
    `home`/`root` are always local directories (for a URL: the cache); `location` names the store."""

    def __init__(self, home: str | Path | None = None, namespace: str | None = None):
        self.location = store_location(home)
        self.namespace = namespace
        self.remote = ObjectStore(self.location) if is_url(self.location) else None
        if self.remote is not None:
            slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.location.replace("://", "_"))
            self.home = local_home() / "remote" / f"{slug[:80]}-{hashlib.sha256(self.location.encode()).hexdigest()[:8]}"
        else:
            self.home = Path(self.location)
        self.root = self.home / "artifacts"

    @property
    def artifacts_location(self) -> str:
        """Where the versions are, for messages: the URL's `artifacts/` or the local directory."""
        return self.remote.url_of("artifacts") if self.remote else str(self.root)

    # -- paths -------------------------------------------------------------------------

    def qualified(self, asset: str) -> str:
        """The slot name of `asset` in this store's namespace (`<pipeline>.<asset>`); a name already
        qualified, a shared asset, or any name in a store without a namespace is kept."""
        if self.namespace is None or asset in SHARED_ASSETS or "." in asset:
            return asset
        return f"{self.namespace}.{asset}"

    def slot(self, asset: str, partition: str | None) -> Path:
        return self.root / self.qualified(asset) / (partition or NO_PARTITION)

    def path(self, asset: str, partition: str | None, version: str) -> Path:
        return self.slot(asset, partition) / version

    def rel(self, asset: str, partition: str | None, version: str | None = None) -> str:
        """The slot (or version) below the store's root, as a posix path: `artifacts/<asset>/<part>[/<v>]`."""
        return f"artifacts/{self.qualified(asset)}/{partition or NO_PARTITION}" + (f"/{version}" if version else "")

    # -- writing -----------------------------------------------------------------------

    @contextlib.contextmanager
    def write(
        self,
        asset: str,
        partition: str | None = None,
        *,
        recipe_hash: str = "",
        code_version: str = "",
        seed: int | None = None,
        min_free_bytes: int = 0,
        derivation: dict[str, Any] | None = None,
    ) -> Iterator[Staging]:
        """Stage an artifact; on clean exit hash it, write its manifest and rename it into place.
        With `derivation`, the version is `derived_version(derivation)`; else `staging.version` when
        the block set it (a canonical content hash); else the content hash of the files.

        On any exception the staging directory is removed and the exception propagates: the
        previous version and LATEST pointer are untouched.
        """
        asset = self.qualified(asset)
        slot = self.slot(asset, partition)
        slot.mkdir(parents=True, exist_ok=True)
        if min_free_bytes:
            check_free_space(slot, min_free_bytes)
        staging = Staging(asset, partition, slot / f".staging-{uuid.uuid4().hex[:12]}")
        in_use = contextlib.ExitStack()  # the slot's lock, to the end: meanwhile a prune leaves the slot alone
        in_use.enter_context(self.slot_in_use(asset, partition))
        staging.path.mkdir()
        try:
            yield staging
            self._commit(staging, slot, derivation, recipe_hash=recipe_hash, code_version=code_version, seed=seed)
        finally:
            if staging.path.exists():
                shutil.rmtree(staging.path, ignore_errors=True)
            in_use.close()

    def _commit(self, staging: Staging, slot: Path, derivation: dict[str, Any] | None, *, recipe_hash: str,
                code_version: str, seed: int | None) -> None:
        """The staged files hashed, their manifest written, renamed into `slot` as their version, LATEST moved."""
        asset, partition = staging.asset, staging.partition
        content = content_hash(staging.path)
        if derivation is not None and staging.version is not None:
            raise ValueError(f"{asset}: a version is either derived or set, not both")
        basis = "derivation" if derivation is not None else "canonical" if staging.version else "content"
        version = {"derivation": derived_version(derivation) if derivation is not None else "",
                   "canonical": staging.version or "", "content": content}[basis]
        final = slot / version
        manifest = {
            "asset": asset,
            "partition": partition,
            "version": version,
            "content_hash": content,
            "version_basis": basis,
            **({"derivation": derivation} if derivation is not None else {}),
            "inputs": staging.inputs,
            "recipe_hash": recipe_hash,
            "code_version": code_version,
            "seed": seed,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "libraries": library_versions(),
            "files": _file_list(staging.path),
            **staging.extra,
        }
        _write_json_atomic(staging.path / MANIFEST, manifest)
        _fsync_tree(staging.path)
        if self.remote is not None:  # committed remotely (manifest last) before the cache has it
            self._commit_remote(staging.path, self.rel(asset, partition, version), final)
        try:
            os.rename(staging.path, final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            # Same version already stored (a rerun, or a concurrent twin): keep the first.
            shutil.rmtree(staging.path, ignore_errors=True)
        staging.artifact = Artifact(asset, partition, version, str(final))
        self.set_latest(staging.artifact)

    def slot_in_use(self, asset: str, partition: str | None):
        """The slot's shared lock (`ft_assets.artifacts.slot_locks`): while it is held, no prune drops a version
        of the slot. Writers hold it for the whole write, reusers while they find and re-point LATEST."""
        return slot_locks.shared(self.home, self.rel(asset, partition))

    def _reused(self, found: Artifact | None) -> Artifact | None:
        """A version found for reuse becomes LATEST before the slot's lock (held by the caller) goes:
        a prune that re-checks the slot afterwards keeps it."""
        if found is not None and self.latest_version(found.asset, found.partition) != found.version:
            self.set_latest(found)
        return found

    def _commit_remote(self, staging_dir: Path, rel: str, final: Path) -> None:
        """Upload the staged version. When another writer's copy of it was committed first (a rerun,
        or a twin on another machine), the staging directory takes that copy: its manifest, and its
        bytes unless the content hashes agree, so one version has one content in every cache."""
        won, committed = self.remote.upload_version(staging_dir, rel)
        if won or (final / MANIFEST).is_file():
            return  # ours is the store's; or the cache has the version already (the rename keeps it)
        if committed["content_hash"] == content_hash(staging_dir):
            _write_json_atomic(staging_dir / MANIFEST, committed)  # the same bytes: only the manifest differs
            return
        shutil.rmtree(staging_dir)
        if not self.remote.download_version(rel, staging_dir):
            raise OSError(f"{self.remote.url_of(rel)} was deleted while being written; write it again")

    def set_latest(self, art: Artifact) -> None:
        self.slot(art.asset, art.partition).mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.slot(art.asset, art.partition) / LATEST, asdict(art))
        if self.remote is not None:
            rel = self.rel(art.asset, art.partition, art.version)
            self.remote.write_json(f"{self.rel(art.asset, art.partition)}/{LATEST}",
                                   {**asdict(art), "path": self.remote.url_of(rel)})

    # -- reading -----------------------------------------------------------------------

    def latest_version(self, asset: str, partition: str | None = None) -> str | None:
        """The version LATEST names (on the store itself; nothing is downloaded)."""
        if self.remote is not None:
            rel = f"{self.rel(asset, partition)}/{LATEST}"
            pointer = self.remote.read_json(rel)
            if pointer is None:
                return None
            return check_version(pointer.get("version") if isinstance(pointer, dict) else pointer,
                                 where=self.remote.where(rel))
        f = self.slot(asset, partition) / LATEST
        return json.loads(f.read_text())["version"] if f.is_file() else None

    def latest(self, asset: str, partition: str | None = None) -> Artifact | None:
        version = self.latest_version(asset, partition)
        return self.get(asset, partition, version) if version else None

    def find_derived(self, asset: str, partition: str | None, derivation: dict[str, Any]) -> Artifact | None:
        """The finished artifact made by exactly `derivation`: the latest version if its own
        derivation (a forced retrain's nonce aside) is this one, else the derived version, which then
        becomes LATEST (found and re-pointed under the slot's lock: a concurrent prune keeps it)."""
        with self.slot_in_use(asset, partition):
            latest = self.latest(asset, partition)
            if latest is not None:
                made_by = dict(latest.manifest().get("derivation") or {})
                made_by.pop("forced_by", None)
                if made_by == json.loads(json.dumps(derivation)):
                    return latest
            return self._reused(self.get(asset, partition, derived_version(derivation)))

    def find_made_from(self, asset: str, partition: str | None, made_from: dict[str, Any]) -> Artifact | None:
        """A finished content-versioned artifact whose manifest records it was made from exactly
        `made_from` (its writer's `extra["made_from"]`): a costly making not to repeat, such as the
        base model read from the same file by another pipeline. The one found becomes LATEST (found
        and re-pointed under the slot's lock: a concurrent prune keeps it)."""
        with self.slot_in_use(asset, partition):
            return self._reused(self._find_made_from(asset, partition, made_from))

    def _find_made_from(self, asset: str, partition: str | None, made_from: dict[str, Any]) -> Artifact | None:
        want = json.loads(json.dumps(made_from))
        latest = self.latest(asset, partition)
        if latest is not None and latest.manifest().get("made_from") == want:
            return latest
        if self.remote is not None:
            versions = [check_version(r.split("/")[-2], where=self.remote.where(r))
                        for r in self.remote.glob(f"{self.rel(asset, partition)}/*/{MANIFEST}")]
        else:
            versions = [f.parent.name for f in sorted(self.slot(asset, partition).glob(f"*/{MANIFEST}"))]
        for version in versions:
            manifest = None if version.startswith(".") else self.read_manifest(asset, partition, version)
            if manifest is not None and manifest.get("made_from") == want:
                return self.get(asset, partition, version)
        return None

    def get(self, asset: str, partition: str | None, version: str) -> Artifact | None:
        """The finished version, or None. On a remote store the remote manifest decides (a version
        pruned there is gone even if cached here); its files are synced to the cache once, checked
        (`ObjectStore.download_version`). On a remote store the names must be the store's own (they
        become cache paths): else `UnsafeStoreName`."""
        asset = self.qualified(asset)
        p = self.path(asset, partition, version)
        if self.remote is not None:
            rel = self.rel(asset, partition, version)
            self._check_slot(asset, partition, rel)
            check_version(version, where=self.remote.where(rel))
            if not self.remote.exists(f"{rel}/{MANIFEST}"):
                return None
            if not (p / MANIFEST).is_file() and not self.remote.download_version(
                    rel, p, identity={"asset": asset, "partition": partition}):
                return None
        return Artifact(asset, partition, version, str(p)) if (p / MANIFEST).is_file() else None

    def list_latest(self) -> list[dict[str, Any]]:
        """The latest artifact of every asset/partition: asset, partition, path, version, created
        (on a remote store `path` is the version's URL, and nothing is downloaded)."""
        rows = []
        if self.remote is not None:
            pointers = self.remote.glob(f"artifacts/*/*/{LATEST}")
        else:
            pointers = [p.relative_to(self.home).as_posix() for p in sorted(self.root.glob(f"*/*/{LATEST}"))]
        for rel in pointers:
            _, asset, part, _ = rel.split("/")
            if self.remote is not None:
                self._check_slot(asset, part, rel)
            partition = None if part == NO_PARTITION else part
            version = self.latest_version(asset, partition)
            manifest = self.read_manifest(asset, partition, version) if version else None
            if manifest is None:
                continue
            rows.append({
                "asset": asset,
                "partition": partition,
                "path": self.remote.url_of(self.rel(asset, partition, version)) if self.remote
                else str(self.path(asset, partition, version)),
                "data_version": version,
                "created": manifest.get("created"),
            })
        return rows

    def read_manifest(self, asset: str, partition: str | None, version: str) -> dict[str, Any] | None:
        """A version's manifest as the store holds it (None: no such finished version); no download."""
        if self.remote is not None:
            return self.remote.read_json(f"{self.rel(asset, partition, version)}/{MANIFEST}")
        f = self.path(asset, partition, version) / MANIFEST
        return json.loads(f.read_text()) if f.is_file() else None

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoints(self, asset: str, partition: str | None, run_version: str) -> Checkpoints:
        """Where one training run checkpoints: `checkpoints/<asset>/<partition>/<run version>`, a local
        directory. On a remote store it mirrors the same path there: the newest complete remote
        checkpoint is pulled first when it is newer than the local one (a run resumed on another
        node), and `Checkpoints.saved` pushes each new one."""
        rel = f"checkpoints/{self.qualified(asset)}/{partition or NO_PARTITION}/{run_version}"
        ck = Checkpoints(self.home / rel, self.remote, rel)
        if self.remote is not None:
            self.remote.pull_checkpoint(rel, ck.dir)
        return ck

    # -- every version (retention) --------------------------------------------------------

    def stored_versions(self) -> list[StoredVersion]:
        """Every finished version on the store (a manifest), with where it is and its size."""
        out = []
        if self.remote is not None:
            for rel in self.remote.glob(f"artifacts/*/*/*/{MANIFEST}"):
                _, asset, part, version, _ = rel.split("/")
                self._check_slot(asset, part, rel)
                check_version(version, where=self.remote.where(rel))
                m = self.remote.read_manifest(rel.rsplit("/", 1)[0])  # checked: its sizes are counted
                if m is None:
                    continue
                size = sum((m.get("files") or {}).values())
                out.append(StoredVersion(asset, None if part == NO_PARTITION else part, version, m,
                                         self.remote.url_of(rel.rsplit("/", 1)[0]), size, 0))
            return out
        for f in sorted(self.root.glob(f"*/*/*/{MANIFEST}")) if self.root.is_dir() else []:
            d = f.parent
            if d.name.startswith("."):
                continue
            out.append(StoredVersion(d.parent.parent.name, None if d.parent.name == NO_PARTITION else d.parent.name,
                                     d.name, json.loads(f.read_text()), str(d), dir_bytes(d), f.stat().st_mtime_ns))
        return out

    def drop(self, asset: str, partition: str | None, version: str) -> None:
        """Delete one version so that no reader finds it from the first step on: locally a rename to
        `.deleting-*` then the delete; remotely the manifest goes first (`ObjectStore.delete_version`).
        A cached copy goes too."""
        local = self.path(asset, partition, version)
        if self.remote is not None:
            self.remote.delete_version(self.rel(asset, partition, version))
        if (local / MANIFEST).is_file() or local.is_dir():
            doomed = local.parent / f".deleting-{version}-{uuid.uuid4().hex[:8]}"
            local.rename(doomed)
            shutil.rmtree(doomed)

    def interrupted_drops(self) -> list[str]:
        """What an interrupted `drop` left: `.deleting-*` directories, and remote versions with a
        deletion marker."""
        left = [str(d) for d in sorted(self.root.glob("*/*/.deleting-*"))] if self.root.is_dir() else []
        if self.remote is not None:
            left += [self.remote.url_of(r.rsplit("/", 1)[0]) for r in self.remote.glob("artifacts/*/*/*/.deleting")]
        return left

    def finish_drop(self, leftover: str) -> None:
        if self.remote is not None and is_url(leftover):
            self.remote.finish_delete(self.remote.rel_of(leftover))
        else:
            shutil.rmtree(leftover, ignore_errors=True)

    def remote_ref(self, url: str) -> tuple[str, str | None, str] | None:
        """(asset, partition, version) of a URL at or below a version of this remote store."""
        parts = (self.remote.rel_of(url) or "").split("/") if self.remote else []
        if len(parts) < 4 or parts[0] != "artifacts":
            return None
        try:  # a URL whose names are not the store's is not one of its versions
            self._check_slot(parts[1], parts[2], url)
            check_version(parts[3], where=url)
        except UnsafeStoreName:
            return None
        return parts[1], None if parts[2] == NO_PARTITION else parts[2], parts[3]

    def _check_slot(self, asset: str, partition: str | None, rel: str) -> None:
        """The asset and partition names of a slot of a remote store are directory names (they
        become paths in the cache): `UnsafeStoreName` naming the object `rel` otherwise."""
        where = self.remote.where(rel) if "://" not in rel else f"object store {self.remote.url}, object {rel}"
        check_slot_name(asset, where=where, what="asset name")
        check_slot_name(partition or NO_PARTITION, where=where, what="partition name")

    def find_by_path(self, path: str | Path) -> Artifact | None:
        """The version a path lies in: a local directory (or file) inside a version, or on a remote
        store a URL below one (synced to the cache)."""
        if self.remote is not None and is_url(str(path)):
            ref = self.remote_ref(str(path))
            return self.get(*ref) if ref else None
        p = Path(path).resolve()
        for candidate in (p, *p.parents):
            if (candidate / MANIFEST).is_file():
                m = json.loads((candidate / MANIFEST).read_text())
                return Artifact(m["asset"], m["partition"], m["version"], str(candidate))
        return None


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def derived_version(derivation: dict[str, Any]) -> str:
    """sha256 of the derivation as canonical JSON (16 hex chars)."""
    return hashlib.sha256(json.dumps(derivation, sort_keys=True).encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def check_free_space(where: Path, need: int) -> None:
    free = shutil.disk_usage(where).free
    if free < need:
        raise OSError(
            f"not enough free disk space in {where}: {free / 2**30:.2f} GiB free, "
            f"{need / 2**30:.2f} GiB needed; free space or point FT_HOME at a larger disk"
        )


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "dagster"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _file_list(directory: Path) -> dict[str, int]:
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST  # as content_hash
    }


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_tree(directory: Path) -> None:
    for f in directory.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
