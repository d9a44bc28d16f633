"""Artifacts and checkpoints on an fsspec filesystem (`s3://bucket/prefix`, `gs://...`, ...).

Layout under the URL is the local store's (`artifacts/<asset>/<partition or _>/<version>/`,
`LATEST.json` per slot, `checkpoints/...`), except where a version's files lie: each writer uploads
them below a private prefix of the version, `<version>/.uploads/<32 hex>/<name>`, and its
`manifest.json` names that prefix (`files_under`); a manifest without one (every version uploaded
before prefixes existed) has its files at `<version>/<name>`. Object stores have no atomic rename, so:
- commit = the marker last: a version's manifest is PUT after all its files (create-only where the
  filesystem offers it: S3's If-None-Match); a prefix without a manifest is an upload in progress or
  one that died, and no reader takes it for a version. A writer re-reads the manifest after its PUT:
  when another writer's won, it deletes its own upload and its cache takes the winner's copy, so two
  machines writing one derived version leave one content (files never interleave: each manifest
  names one writer's prefix). A checkpoint's marker is its `progress.json`, uploaded last.
- `LATEST.json` is one PUT (whole-object replacement is atomic on S3 and GCS).
- reading = syncing to a local cache directory keyed by version (transformers reads local
  directories): files into a private staging directory, checked against the manifest's sizes and
  its content hash, renamed into place with the manifest; a version already in the cache is never
  downloaded again. A copy whose hash differs is refused and nothing of it is kept.
- deleting a version: a `.deleting` marker, then the manifest (from then on no reader sees the
  version), then every object below the version (upload prefixes too), the marker last: an
  interrupted delete is found and finished later.
Whoever can write to the store decides what readers get, but not where it is written: every name
read from the store is checked before it becomes a local path (`safe_relpath`, `check_version`,
`check_slot_name`, `check_step_dir`): relative posix paths without empty, `.` or `..` parts,
backslashes or NUL, that resolve inside their destination; versions of 16 lowercase hex characters
(`content_hash`, `store.derived_version`, `sft_dataset.canonical_version`); slot names without
separators or a leading dot; checkpoint directories `step-<digits>`. Any other name is an
`UnsafeStoreName` error naming the store and the object, raised before anything is written locally.
Credentials and endpoints come from the filesystem's own configuration (for S3: the AWS
variables, `AWS_ENDPOINT_URL` for an S3-compatible server). Nothing here imports Dagster or torch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from ..config.paths import is_url

MANIFEST = "manifest.json"
DELETING = ".deleting"
CHECKPOINT_DONE = "progress.json"  # training.loop writes it last into a checkpoint; so does the upload
UPLOADS = ".uploads"  # <version>/.uploads/<32 hex>/: one writer's files (the module doc)
VERSION_FORMAT = re.compile(r"[0-9a-f]{16}")
STEP_DIR = re.compile(r"step-([0-9]{1,18})")
UPLOAD_PREFIX = re.compile(re.escape(UPLOADS) + r"/[0-9a-f]{32}")


# -- names read from a store --------------------------------------------------------------


class UnsafeStoreName(ValueError):
    """A name read from an object store that must not become a local path: refused before any write."""


def _refuse(where: str, what: str, name: object, problem: str) -> UnsafeStoreName:
    shown = repr(name) if len(repr(name)) <= 300 else repr(name)[:300] + "..."  # a name can be megabytes
    return UnsafeStoreName(
        f"{where}: {what} {shown} {problem}. ft_assets never writes such a name: the object is damaged or "
        "was written by someone else with write access to the store. Nothing was written locally; find out "
        "who wrote it and remove it from the store.")


def safe_relpath(name: object, *, where: str, what: str = "file name") -> str:
    """`name` when it is a relative posix path that stays below the directory it is joined to: no
    empty, `.` or `..` parts, not absolute, no backslash or NUL. `where` names the store and the object."""
    if not isinstance(name, str) or not name:
        raise _refuse(where, what, name, "is not a relative path")
    if "\\" in name or "\0" in name:
        raise _refuse(where, what, name, "contains a backslash or a NUL byte")
    if name.startswith("/"):
        raise _refuse(where, what, name, "is absolute")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise _refuse(where, what, name, "has an empty, '.' or '..' part")
    return name


def inside(root: Path, name: str, *, where: str, what: str = "file name") -> Path:
    """`root / name` after `safe_relpath`, resolved (symlinks too) and checked to lie below `root`."""
    target = (root / safe_relpath(name, where=where, what=what)).resolve()
    if not target.is_relative_to(root.resolve()):
        raise _refuse(where, what, name, f"resolves to {target}, outside {root}")
    return target


def check_version(version: object, *, where: str) -> str:
    """A version as this store makes them: 16 lowercase hex characters."""
    if not isinstance(version, str) or not VERSION_FORMAT.fullmatch(version):
        raise _refuse(where, "version", version, "is not a version of this store (16 lowercase hex characters)")
    return version


def check_slot_name(name: object, *, where: str, what: str = "asset or partition name") -> str:
    """An asset or partition directory name: no separator or NUL, not `.`/`..`, no leading dot."""
    if not isinstance(name, str) or not name or name.startswith("."):
        raise _refuse(where, what, name, "is empty or starts with a dot")
    if any(c in name for c in "/\\\0"):
        raise _refuse(where, what, name, "contains a path separator or a NUL byte")
    return name


def check_step_dir(name: str, *, where: str) -> int:
    """The step of a checkpoint directory `step-<digits>`."""
    m = STEP_DIR.fullmatch(name)
    if m is None:
        raise _refuse(where, "checkpoint directory", name, "is not step-<digits>")
    return int(m.group(1))


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

    def where(self, rel: str) -> str:
        """For messages: the store and one object of it."""
        return f"object store {self.url}, object {self.url_of(rel)}"

    def read_json(self, rel: str) -> Any | None:
        try:
            raw = self.fs.cat_file(self.key(rel))
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{self.where(rel)}: not JSON ({exc}); the object is damaged or was written by "
                             "hand") from None

    def write_json(self, rel: str, obj: Any) -> None:
        self.fs.pipe_file(self.key(rel), _json_bytes(obj))

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching `pattern` (relative too)."""
        return sorted(r for r in (self.rel_of(k) for k in self.fs.glob(self.key(pattern))) if r is not None)

    # -- versions -----------------------------------------------------------------------

    def upload_version(self, local_dir: Path, rel: str) -> tuple[bool, dict[str, Any]]:
        """Upload a finished local version directory to `rel`: its files below a private upload prefix,
        then its manifest naming that prefix (the commit). Returns (True, the manifest committed, also
        written into `local_dir`), or (False, the manifest on the store) when another writer's copy of
        the version was committed first (a rerun, a twin): this upload then leaves nothing behind."""
        committed = self.read_manifest(rel)
        if committed is not None:
            return False, committed
        prefix = f"{UPLOADS}/{uuid.uuid4().hex}"
        ours = {**json.loads((local_dir / MANIFEST).read_text()), "files_under": prefix}
        for f in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            name = f.relative_to(local_dir).as_posix()
            if name != MANIFEST:
                self.fs.put_file(str(f), self.key(f"{rel}/{prefix}/{name}"))
        body = _json_bytes(ours)
        if self.read_json(f"{rel}/{MANIFEST}") is None:  # a twin may have committed while we uploaded
            self._create(f"{rel}/{MANIFEST}", body)
        committed = self.read_manifest(rel)  # whose commit won (a plain PUT: the last one)
        if committed is None:
            raise OSError(f"{self.url_of(rel)} was deleted while being written; write it again")
        if committed.get("files_under") != prefix:
            self.delete_prefix(f"{rel}/{prefix}")
            return False, committed
        _write_bytes_atomic(local_dir / MANIFEST, body)
        return True, ours

    def _create(self, rel: str, body: bytes) -> None:
        """PUT `body` at `rel` unless an object is there: atomically where the filesystem can (S3's
        If-None-Match), else a plain PUT; the caller re-reads to learn whose object it is."""
        if self.protocol not in ("s3", "s3a"):
            self.fs.pipe_file(self.key(rel), body)
            return
        try:
            self.fs.pipe_file(self.key(rel), body, mode="create")
        except FileExistsError:
            pass  # another writer's commit is there
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            self.fs.pipe_file(self.key(rel), body)  # a server without conditional writes

    def read_manifest(self, rel: str) -> dict[str, Any] | None:
        """The committed manifest of the version at `rel` (None: none), checked before any of it is
        used: its version is the one it lies at, its file names are safe relative paths with sizes,
        its upload prefix (if any) is one `upload_version` makes, its content hash has the version format."""
        where = self.where(f"{rel}/{MANIFEST}")
        m = self.read_json(f"{rel}/{MANIFEST}")
        if m is None:
            return None
        if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
            raise _refuse(where, "manifest", type(m.get("files") if isinstance(m, dict) else m).__name__,
                          "has no mapping of file names to sizes")
        if check_version(m.get("version"), where=where) != rel.rsplit("/", 1)[-1]:
            raise _refuse(where, "version", m["version"], f"is not the version it lies at ({self.url_of(rel)})")
        check_version(m.get("content_hash"), where=f"{where} (its content_hash)")
        for name, size in m["files"].items():
            if safe_relpath(name, where=where) == MANIFEST:
                raise _refuse(where, "file name", name, "is the manifest's own name")
            if type(size) is not int or size < 0:
                raise _refuse(where, f"size of {name!r}", size, "is not a byte count")
        prefix = m.get("files_under")
        if prefix is not None and not (isinstance(prefix, str) and UPLOAD_PREFIX.fullmatch(prefix)):
            raise _refuse(where, "upload prefix", prefix, f"is not {UPLOADS}/<32 hex characters>")
        return m

    def download_version(self, rel: str, dest: Path, identity: dict[str, Any] | None = None) -> bool:
        """Copy the committed version at `rel` into the local directory `dest` (absent), atomically:
        False when `rel` has no manifest. The manifest is checked first (`read_manifest`, and the
        fields in `identity`, such as asset and partition); every file it lists is fetched from its
        upload prefix (or from `rel` itself for a manifest naming none), its size and the content hash
        of all of them checked. A copy failing a check is an error, and nothing of it is kept."""
        manifest = self.read_manifest(rel)
        if manifest is None:
            return False
        for field, want in (identity or {}).items():
            if manifest.get(field) != want:
                raise _refuse(self.where(f"{rel}/{MANIFEST}"), field, manifest.get(field), f"is not {want!r}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".download-{dest.name}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            self._fetch_files(rel, manifest, tmp)
            (tmp / MANIFEST).write_bytes(_json_bytes(manifest))
            try:
                os.rename(tmp, dest)
            except OSError:
                if not (dest / MANIFEST).is_file():
                    raise  # else a concurrent reader put the same version in place first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    def _fetch_files(self, rel: str, manifest: dict[str, Any], tmp: Path) -> None:
        """The manifest's files into `tmp`: every target checked to lie inside `tmp` before the first
        byte is fetched; sizes, then the content hash (the manifest excluded) verified."""
        where = self.where(f"{rel}/{MANIFEST}")
        src = f"{rel}/{manifest['files_under']}" if manifest.get("files_under") else rel
        targets = {name: inside(tmp, name, where=where) for name in manifest["files"]}
        for name, target in targets.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self.key(f"{src}/{name}"), str(target))
            if target.stat().st_size != manifest["files"][name]:
                raise DamagedVersion(f"{self.url_of(f'{src}/{name}')}: {target.stat().st_size} bytes, the manifest "
                                     f"says {manifest['files'][name]}; the object store copy of {self.url_of(rel)} "
                                     "is damaged or was tampered with; nothing of it was kept")
        got = content_hash(tmp)
        if got != manifest["content_hash"]:
            raise DamagedVersion(f"{self.url_of(rel)}: its files hash to {got}, its manifest says "
                                 f"{manifest['content_hash']}: the object store copy is damaged or was tampered "
                                 "with; nothing of it was kept. Delete the version on the store and write it again")

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

    def newest_checkpoint(self, rel: str) -> tuple[int, str] | None:
        """(step, directory name) of the newest complete checkpoint below `rel` on the store."""
        found = []
        for r in self.glob(f"{rel}/step-*/{CHECKPOINT_DONE}"):
            name = r.split("/")[-2]
            found.append((check_step_dir(name, where=self.where(r)), name))
        return max(found, default=None)

    def newest_checkpoint_step(self, rel: str) -> int | None:
        newest = self.newest_checkpoint(rel)
        return newest[0] if newest else None

    def pull_checkpoint(self, rel: str, local_root: Path) -> int | None:
        """Bring the newest complete remote checkpoint into `local_root` when it is newer than the
        newest local one (a run resumed on another node); the step it has now, or None. The local
        directories change only once the checkpoint and `best` are both fetched whole."""
        newest = self.newest_checkpoint(rel)
        local = [int(p.name.split("-", 1)[1]) for p in local_root.glob("step-*") if (p / CHECKPOINT_DONE).is_file()]
        if newest is None or (local and max(local) >= newest[0]):
            return max(local, default=None)
        step, name = newest
        local_root.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        tmp, tmp_best = local_root / f".tmp-pull-{tag}", local_root / f".tmp-pull-best-{tag}"
        try:
            self._get_tree(f"{rel}/{name}", tmp)
            if not (tmp / CHECKPOINT_DONE).is_file():
                raise OSError(f"{self.url_of(rel)}/{name} lost its {CHECKPOINT_DONE} while being read")
            self._get_tree(f"{rel}/best", tmp_best)
            best = local_root / "best"
            shutil.rmtree(best, ignore_errors=True)
            if tmp_best.is_dir():
                os.rename(tmp_best, best)
            os.rename(tmp, local_root / f"step-{step:06d}")  # training.loop's name: it sorts steps by name
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(tmp_best, ignore_errors=True)
        return step

    def _get_tree(self, rel: str, dest: Path) -> None:
        """Every object below `rel` into the local directory `dest` (relative paths kept); every key is
        checked to stay inside `dest` before the first one is fetched."""
        below = self.key(rel) + "/"
        plan = []
        for k in self.fs.find(self.key(rel)):
            where = self.where(self.rel_of(k) or k)
            if not k.startswith(below):
                raise _refuse(where, "object", k, f"is not below {self.url_of(rel)}")
            plan.append((k, inside(dest, k[len(below):], where=where, what="object name")))
        for k, target in plan:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(k, str(target))

    def delete_prefix(self, rel: str) -> None:
        if self.fs.exists(self.key(rel)):
            self.fs.rm(self.key(rel), recursive=True)


class DamagedVersion(OSError):
    """A downloaded version whose bytes are not what its manifest says (sizes, content hash)."""


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
