"""Hugging Face datasets and Arrow files as row sources (`format: hf` and `format: arrow`).

Contract:
- `format: hf` reads, offline only: a `save_to_disk` directory (`datasets.load_from_disk`;
  a DatasetDict needs `split:` unless it has one split), any other local directory in Hub
  layout (data files, optional README configs: `datasets.load_dataset(dir)`), or a dataset id
  found in the local Hugging Face hub cache (its snapshot directory, read like a local one).
  Nothing is ever downloaded: an id missing from the cache is an error saying so.
- `format: arrow` reads one Arrow IPC file (file or stream format, as `save_to_disk` writes).
- Rows are numbered 1..N in dataset order; errors say "row N". Both readers are generators that
  hold one record batch at a time (the dataset or file is memory-mapped), never every row; a
  row over `data.MAX_ROW_BYTES` comes as an `UnreadableRow` (rejected), never converted. Arrow
  itself refuses types nested deeper than `data.MAX_ROW_DEPTH` (the file is unreadable).
- `source_version` is the content hash of the data: a file's bytes, or a directory's files
  (relative names + bytes, sorted; `state.json` and hidden files, which hold fingerprints and
  locks rather than data, are left out). Same data, same version, on any machine. A process
  reads a file's bytes again only when its size, mtime, ctime, inode or device moved since it
  last hashed it (`file_sha256`; the observation sensor asks every tick), or when it had changed
  within `SETTLED_S` of that hash (a write in the same timestamp tick would not show).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

from .types import DataFileError, batch_rows

NOT_DATA = ("state.json",)
SETTLED_S = 2.0  # a file changed this recently is hashed again next time (covers 1-2 s timestamp granularity)
# file_sha256's cache: (device, inode) -> ((size, mtime_ns, ctime_ns), sha256 hex)
_DIGESTS: dict[tuple[int, int], tuple[tuple[int, int, int], str]] = {}
_DIGESTS_KEPT = 100_000  # entries before the cache starts over (a long-lived sensor process)
ROWS_PER_BATCH = 4096


def hub_snapshot(dataset_id: str) -> Path | None:
    """The local hub-cache snapshot of a dataset id (HF_HUB_CACHE / HF_HOME honoured), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=dataset_id, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):  # ValueError: not a valid repo id
        return None


def locate(path: Path) -> Path:
    """A local directory for `path`: itself when it exists, else the hub-cache snapshot of the
    id it spells (`path` is then the recipe's string, relative)."""
    if path.exists():
        return path
    if not path.is_absolute():
        snap = hub_snapshot(path.as_posix())
        if snap is not None:
            return snap
    raise DataFileError(path, "no such directory, and no dataset with this id in the local Hugging Face cache "
                              "(nothing is downloaded at run time: download it once with "
                              "`hf download --repo-type dataset ID`, or point datasets[].path at a "
                              "save_to_disk directory)")


def read_hf(path: Path, split: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets

    where = locate(path)
    if where.is_file():
        raise DataFileError(path, "format hf expects a directory or a dataset id; for a single file use "
                                  "format jsonl, csv, parquet or arrow")
    try:
        if (where / "dataset_dict.json").is_file() or (where / "state.json").is_file():
            loaded = datasets.load_from_disk(str(where))
        else:
            loaded = datasets.load_dataset(str(where), split=None)
    except Exception as exc:  # datasets raises many types for unreadable directories
        raise DataFileError(path, f"not a readable Hugging Face dataset ({type(exc).__name__}: {exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = sorted(loaded)
        if split is None and len(names) != 1:
            raise DataFileError(path, f"the dataset has splits {names}; choose one with datasets[].split")
        key = split if split is not None else names[0]
        if key not in loaded:
            raise DataFileError(path, f"no split {key!r}; the dataset has {names}")
        loaded = loaded[key]
    elif split is not None and split != "train":
        raise DataFileError(path, f"split {split!r} asked for, but this directory holds a single dataset "
                                  "(no splits); remove datasets[].split")
    line = 0
    for batch in loaded.with_format("arrow").iter(batch_size=ROWS_PER_BATCH):
        for row in batch_rows(batch):
            line += 1
            yield line, row


def read_arrow(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow as pa

    table = None
    for opener in (pa.ipc.open_file, pa.ipc.open_stream):
        try:
            with pa.memory_map(str(path)) as source:
                table = opener(source).read_all()
            break
        except (pa.ArrowInvalid, OSError):
            continue
    if table is None:
        raise DataFileError(path, "not a readable Arrow IPC file (file or stream format)")
    line = 0
    for batch in table.to_batches(max_chunksize=ROWS_PER_BATCH):
        for row in batch_rows(batch):
            line += 1
            yield line, row


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of a file's bytes; reused while the open file's size, mtime, ctime (which
    no tool can set back), inode and device are the ones seen when it was read."""
    seen_at = time.time_ns()
    with path.open("rb") as fh:
        info = os.fstat(fh.fileno())  # of the file read, even if `path` is replaced meanwhile
        key, stamp = (info.st_dev, info.st_ino), (info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        known = _DIGESTS.get(key)
        if known is not None and known[0] == stamp:
            return known[1]
        digest = _sha256_of_bytes(fh)
    if seen_at - max(info.st_mtime_ns, info.st_ctime_ns) > SETTLED_S * 1e9:
        if len(_DIGESTS) >= _DIGESTS_KEPT:
            _DIGESTS.clear()
        _DIGESTS[key] = (stamp, digest)
    return digest


def _sha256_of_bytes(fh) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def source_version(path: Path) -> str:
    """16 hex digits of the data's content hash ("missing" when there is nothing to read)."""
    if path.is_file():
        return file_sha256(path)[:16]
    if not path.exists():
        snap = None if path.is_absolute() else hub_snapshot(path.as_posix())
        if snap is None:
            return "missing"
        path = snap
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if f.name in NOT_DATA or any(part.startswith(".") for part in rel.parts):
            continue
        h.update(rel.as_posix().encode() + b"\0" + bytes.fromhex(source_version(f)) + b"\0")
    return h.hexdigest()[:16]
