"""Per-slot locks between the store's writers and `prune`, on one machine.

A slot's lock is an `flock` on `<store home>/.locks/<sha256 of the slot>.lock` (the store home is
FT_HOME, or the local cache directory of a remote store; never inside `artifacts/`, so a lock file
is no artifact):
- shared (`shared`): held by a writer for its whole `ArtifactStore.write`, and by a step reusing a
  version while it finds it and makes it LATEST; any number at once. Taken within `WAIT_S` or the
  writer fails before it has done any work;
- exclusive (`exclusive`), never waited for: held by `prune` while it re-checks and drops versions
  of the slot; a busy slot is skipped, its versions stay.
The directory is created with mode 0700 (plus the group bits of the home, for a home a group
shares) and opened without following a symlink; a `.locks` that is a symlink, not a directory,
writable by others, or owned by neither this user nor the home's owner is refused. Lock files are
created 0660 inside it, opened O_NOFOLLOW, never truncated nor written. `flock` excludes processes
of one machine only (and is not reliable on every network file system): on an object store it does
not exclude a writer on another machine (see `ft_assets.artifacts.retention`). Nothing here imports Dagster.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import time
from pathlib import Path
from typing import Iterator

LOCK_DIR = ".locks"
WAIT_S = 600.0  # a prune holds a slot for as long as it deletes a few versions: seconds


class SlotLockError(OSError):
    """The slot's lock cannot be had safely (a suspicious lock directory, or held too long)."""


def lock_name(slot: str) -> str:
    """The lock file of a slot (`artifacts/<asset>/<partition>`): a hash, whatever the names hold."""
    return hashlib.sha256(slot.encode()).hexdigest()[:32] + ".lock"


def _lock_dir(home: Path) -> int:
    """An open descriptor of `<home>/.locks`, created if missing, checked (see the module doc)."""
    home.mkdir(parents=True, exist_ok=True)
    home_fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        home_st = os.fstat(home_fd)
        with contextlib.suppress(FileExistsError):
            os.mkdir(LOCK_DIR, 0o700 | (home_st.st_mode & 0o070), dir_fd=home_fd)
        try:
            fd = os.open(LOCK_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=home_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise SlotLockError(f"{home / LOCK_DIR} is a symlink or not a directory: refusing to keep the store's "
                                    "locks there; remove it (ft_assets creates it again)") from None
            raise
    finally:
        os.close(home_fd)
    st = os.fstat(fd)
    if st.st_mode & stat.S_IWOTH or st.st_uid not in (os.getuid(), home_st.st_uid):
        os.close(fd)
        raise SlotLockError(f"{home / LOCK_DIR} is writable by others or owned by another user (uid {st.st_uid}): "
                            "refusing to keep the store's locks there; remove it (ft_assets creates it again)")
    return fd


def _open(home: Path, slot: str) -> int:
    dir_fd = _lock_dir(home)
    try:
        fd = os.open(lock_name(slot), os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SlotLockError(f"{home / LOCK_DIR / lock_name(slot)} is not a regular file; remove it")
    return fd


def _try(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def shared(home: Path, slot: str, wait_s: float | None = None) -> Iterator[None]:
    """Hold the slot's lock shared (a writer or a reuser) for the block; waits while a prune holds
    it, `wait_s` at most (default `WAIT_S`), then fails."""
    wait_s = WAIT_S if wait_s is None else wait_s
    fd = _open(home, slot)
    try:
        deadline, pause = time.monotonic() + wait_s, 0.01
        while not _try(fd, fcntl.LOCK_SH):
            if time.monotonic() > deadline:
                where = home / LOCK_DIR / lock_name(slot)
                raise SlotLockError(f"{slot}: a prune has held this slot's lock ({where}) for over {wait_s:.0f} s; "
                                    "is a `python -m ft_assets prune` stuck? Stop it and retry")
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the flock


@contextlib.contextmanager
def exclusive(home: Path, slot: str) -> Iterator[bool]:
    """Try to hold the slot's lock exclusively (prune) for the block, without waiting: yields
    whether it is held (False: a writer or reuser is in the slot)."""
    fd = _open(home, slot)
    try:
        yield _try(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)
