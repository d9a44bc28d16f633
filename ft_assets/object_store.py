"""Artifacts and checkpoints on an fsspec filesystem (`s3://bucket/prefix`, `gs://...`, ...).

Layout under the URL is the local store's (`artifacts/<asset>/<partition or _>/<version>/`,
`LATEST.json` per slot, `checkpoints/...`). Object stores have no atomic rename, so:
- commit = the marker last: a version's files are uploaded under its final prefix, then its
  `manifest.json`; a prefix without a manifest is an upload in progress or one that died, and no
  reader takes it for a version. A checkpoint's marker is its `progress.json`, uploaded last.
- `LATEST.json` is one PUT (whole-object replacement is atomic on S3 and GCS).
- reading = syncing to a local cache directory keyed by version (transformers reads local
  directories): files into a private staging directory, checked against the manifest's sizes,
  renamed into place with the manifest; a version already in the cache is never downloaded again.
- deleting a version: a `.deleting` marker, then the manifest (from then on no reader sees the
  version), then the files, the marker last: an interrupted delete is found and finished later.
Credentials and endpoints come from the filesystem's own configuration (for S3: the AWS
variables, `AWS_ENDPOINT_URL` for an S3-compatible server). Nothing here imports Dagster or torch.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
DELETING = ".deleting"
CHECKPOINT_DONE = "progress.json"  # core.train writes it last into a checkpoint; so does the upload


def is_url(location: str | os.PathLike) -> bool:
    """A remote location (`s3://...`); `file://` URLs and plain paths are local directories."""
    s = str(location)
    return "://" in s and not s.startswith("file://")


class ObjectStore:
    """One fsspec filesystem and a base prefix; paths below are relative to the base (posix)."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        # no listing cache: another process (a worker on another node) may have written meanwhile
        self.fs, self.base = fsspec.core.url_to_fs(self.url, use_listings_cache=False)
        self.base = self.base.rstrip("/")
        self.protocol = self.url.split("://", 1)[0]

    def key(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def rel_of(self, url_or_key: str) -> str | None:
        """`s3://bucket/prefix/a/b` or `bucket/prefix/a/b` -> `a/b` (None: not below the base)."""
        s = url_or_key.split("://", 1)[1] if "://" in url_or_key else url_or_key
        s = s.rstrip("/")
        if s == self.base:
            return ""
        return s[len(self.base) + 1:] if s.startswith(self.base + "/") else None

    # -- small objects ---------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.key(rel))

    def read_json(self, rel: str) -> Any | None:
        try:
            return json.loads(self.fs.cat_file(self.key(rel)))
        except FileNotFoundError:
            return None

    def write_json(self, rel: str, obj: Any) -> None:
        self.fs.pipe_file(self.key(rel), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching `pattern` (relative too)."""
        return sorted(r for r in (self.rel_of(k) for k in self.fs.glob(self.key(pattern))) if r is not None)

    # -- versions -----------------------------------------------------------------------

    def upload_version(self, local_dir: Path, rel: str) -> bool:
        """Upload a finished local version directory to `rel`, manifest last. False when the
        version is already there (a rerun, or a twin that finished first): nothing is written."""
        if self.exists(f"{rel}/{MANIFEST}"):
            return False
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
        for f in files:
            self.fs.put_file(str(f), self.key(f"{rel}/{f.relative_to(local_dir).as_posix()}"))
        self.fs.put_file(str(local_dir / MANIFEST), self.key(f"{rel}/{MANIFEST}"))  # the commit
        return True

    def download_version(self, rel: str, dest: Path) -> bool:
        """Copy the committed version at `rel` into the local directory `dest` (absent), atomically:
        False when `rel` has no manifest. Every file the manifest lists is fetched and its size checked."""
        manifest = self.read_json(f"{rel}/{MANIFEST}")
        if manifest is None:
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".download-{dest.name}-{uuid.uuid4().hex[:8]}"
        try:
            for name, size in (manifest.get("files") or {}).items():
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(self.key(f"{rel}/{name}"), str(target))
                if target.stat().st_size != size:
                    raise OSError(f"{self.url_of(rel)}/{name}: {target.stat().st_size} bytes, the manifest says "
                                  f"{size}; the object store copy is damaged")
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            try:
                os.rename(tmp, dest)
            except OSError:
                if not (dest / MANIFEST).is_file():
                    raise  # else a concurrent reader put the same version in place first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    def delete_version(self, rel: str) -> None:
        """Marker, manifest (the version is gone for readers from here), files, marker."""
        self.fs.pipe_file(self.key(f"{rel}/{DELETING}"), b"")
        self.fs.rm(self.key(f"{rel}/{MANIFEST}"))
        self.finish_delete(rel)

    def finish_delete(self, rel: str) -> None:
        rest = [k for k in self.fs.find(self.key(rel)) if not k.endswith(f"/{DELETING}")]
        if rest:
            self.fs.rm(rest)
        self.fs.rm(self.key(f"{rel}/{DELETING}"))

    # -- checkpoints ------------------------------------------------------------------

    def push_checkpoint(self, local_root: Path, rel: str) -> None:
        """Mirror the newest complete checkpoint under `local_root` (and the best weights beside it)
        to `rel`: its files, `progress.json` last; then drop remote checkpoints older than it."""
        steps = sorted(p for p in local_root.glob("step-*") if (p / CHECKPOINT_DONE).is_file())
        if not steps:
            return
        newest = steps[-1]
        best = local_root / "best"
        for d, prefix in ((best, "best"), (newest, newest.name)):
            if not d.is_dir():
                continue
            for f in sorted(p for p in d.rglob("*") if p.is_file() and p.name != CHECKPOINT_DONE):
                self.fs.put_file(str(f), self.key(f"{rel}/{prefix}/{f.relative_to(d).as_posix()}"))
        self.fs.put_file(str(newest / CHECKPOINT_DONE), self.key(f"{rel}/{newest.name}/{CHECKPOINT_DONE}"))
        keep_best = {p.name for p in best.glob("step-*")} if best.is_dir() else set()
        for old in self.glob(f"{rel}/step-*"):
            if old.rsplit("/", 1)[1] != newest.name:
                self.fs.rm(self.key(old), recursive=True)
        for old in self.glob(f"{rel}/best/step-*"):
            if old.rsplit("/", 1)[1] not in keep_best:
                self.fs.rm(self.key(old), recursive=True)

    def newest_checkpoint_step(self, rel: str) -> int | None:
        done = [r.split("/")[-2] for r in self.glob(f"{rel}/step-*/{CHECKPOINT_DONE}")]
        return max((int(name.split("-", 1)[1]) for name in done), default=None)

    def pull_checkpoint(self, rel: str, local_root: Path) -> int | None:
        """Bring the newest complete remote checkpoint into `local_root` when it is newer than the
        newest local one (a run resumed on another node); the step it has now, or None."""
        remote = self.newest_checkpoint_step(rel)
        local = [int(p.name.split("-", 1)[1]) for p in local_root.glob("step-*") if (p / CHECKPOINT_DONE).is_file()]
        if remote is None or (local and max(local) >= remote):
            return max(local, default=None)
        local_root.mkdir(parents=True, exist_ok=True)
        tmp = local_root / f".tmp-pull-{uuid.uuid4().hex[:8]}"
        name = f"step-{remote:06d}"
        try:
            self._get_tree(f"{rel}/{name}", tmp)
            if not (tmp / CHECKPOINT_DONE).is_file():
                raise OSError(f"{self.url_of(rel)}/{name} lost its {CHECKPOINT_DONE} while being read")
            best = local_root / "best"
            shutil.rmtree(best, ignore_errors=True)
            self._get_tree(f"{rel}/best", best)
            os.rename(tmp, local_root / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return remote

    def _get_tree(self, rel: str, dest: Path) -> None:
        """Every object below `rel` into the local directory `dest` (relative paths kept)."""
        for k in self.fs.find(self.key(rel)):
            target = dest / k[len(self.key(rel)) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(k, str(target))

    def delete_prefix(self, rel: str) -> None:
        if self.fs.exists(self.key(rel)):
            self.fs.rm(self.key(rel), recursive=True)
