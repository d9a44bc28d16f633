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
Nothing here imports Dagster or torch.
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

MANIFEST = "manifest.json"
LATEST = "LATEST.json"
NO_PARTITION = "_"
REPO_ROOT = Path(__file__).resolve().parent.parent


def ft_home() -> Path:
    """Where artifacts and the Dagster instance live: $FT_HOME (a relative one resolves against the
    current directory), default `.ft_home/` in the repo."""
    return Path(os.environ.get("FT_HOME") or REPO_ROOT / ".ft_home").resolve()


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
    def __init__(self, home: str | Path | None = None):
        self.home = Path(home).resolve() if home else ft_home()
        self.root = self.home / "artifacts"

    # -- paths -------------------------------------------------------------------------

    def slot(self, asset: str, partition: str | None) -> Path:
        return self.root / asset / (partition or NO_PARTITION)

    def path(self, asset: str, partition: str | None, version: str) -> Path:
        return self.slot(asset, partition) / version

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
        slot = self.slot(asset, partition)
        slot.mkdir(parents=True, exist_ok=True)
        if min_free_bytes:
            check_free_space(slot, min_free_bytes)
        staging = Staging(asset, partition, slot / f".staging-{uuid.uuid4().hex[:12]}")
        staging.path.mkdir()
        try:
            yield staging
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
            try:
                os.rename(staging.path, final)
            except OSError:
                if not (final / MANIFEST).is_file():
                    raise
                # Same version already stored (a rerun, or a concurrent twin): keep the first.
                shutil.rmtree(staging.path, ignore_errors=True)
            staging.artifact = Artifact(asset, partition, version, str(final))
            self.set_latest(staging.artifact)
        finally:
            if staging.path.exists():
                shutil.rmtree(staging.path, ignore_errors=True)

    def set_latest(self, art: Artifact) -> None:
        _write_json_atomic(self.slot(art.asset, art.partition) / LATEST, asdict(art))

    # -- reading -----------------------------------------------------------------------

    def latest(self, asset: str, partition: str | None = None) -> Artifact | None:
        pointer = self.slot(asset, partition) / LATEST
        if not pointer.is_file():
            return None
        art = Artifact(**json.loads(pointer.read_text()))
        return art if (art.dir / MANIFEST).is_file() else None

    def find_derived(self, asset: str, partition: str | None, derivation: dict[str, Any]) -> Artifact | None:
        """The finished artifact made by exactly `derivation`: the latest version if its own
        derivation (a forced retrain's nonce aside) is this one, else the derived version."""
        latest = self.latest(asset, partition)
        if latest is not None:
            made_by = dict(latest.manifest().get("derivation") or {})
            made_by.pop("forced_by", None)
            if made_by == json.loads(json.dumps(derivation)):
                return latest
        return self.get(asset, partition, derived_version(derivation))

    def get(self, asset: str, partition: str | None, version: str) -> Artifact | None:
        p = self.path(asset, partition, version)
        return Artifact(asset, partition, version, str(p)) if (p / MANIFEST).is_file() else None

    def list_latest(self) -> list[dict[str, Any]]:
        """The latest artifact of every asset/partition: asset, partition, path, version, created."""
        rows = []
        if not self.root.is_dir():
            return rows
        for pointer in sorted(self.root.glob(f"*/*/{LATEST}")):
            art = Artifact(**json.loads(pointer.read_text()))
            if not (art.dir / MANIFEST).is_file():
                continue
            rows.append({
                "asset": art.asset,
                "partition": art.partition,
                "path": art.path,
                "data_version": art.version,
                "created": art.manifest().get("created"),
            })
        return rows

    def find_by_path(self, path: str | Path) -> Artifact | None:
        p = Path(path).resolve()
        for candidate in (p, *p.parents):
            if (candidate / MANIFEST).is_file():
                m = json.loads((candidate / MANIFEST).read_text())
                return Artifact(m["asset"], m["partition"], m["version"], str(candidate))
        return None


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def content_hash(directory: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> str:
    """sha256 over relative paths and bytes of every file below `directory` (16 hex chars)."""
    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = f.relative_to(directory).as_posix()
        if rel in exclude:
            continue
        h.update(rel.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


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
        if p.is_file() and p.name != MANIFEST
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
